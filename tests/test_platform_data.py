"""Reading, validating and writing platform folders (common.platform_data and the readers and
writer it uses)."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pytest

import common.platform_data as platform_data
import common.platform_writer as platform_writer
from common import platform_format
from common.errors import DataError
from common.platform_data import find_file, platform_dirs, read_dataset, read_platform
from common.platform_writer import PlatformTables, write_dataset

VALID = Path(__file__).resolve().parent / "fixtures" / "valid"


def write(folder: Path, files: dict[str, str | bytes]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, content in files.items():
        data = content if isinstance(content, bytes) else content.encode("utf-8")
        (folder / name).write_bytes(data)
    return folder


def jsonl(*records: dict[str, object]) -> str:
    return "".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def utc(*args: int) -> float:
    return datetime(*args, tzinfo=UTC).timestamp()


# ------------------------------------------------------------------ read_platform: CSV ratings


def test_csv_rating_platform_arrays():
    data = read_platform(VALID / "csv_ratings")
    assert data.name == "csv_ratings"
    assert data.label_kind == "rating"
    assert data.num_interactions == 8
    assert data.users.tolist() == ["u1"] * 5 + ["u2", "u2", "u3"]
    assert data.items.tolist() == ["m1", "m2", "m3", "m4", "m5", "m2", "m6", "m1"]
    assert data.ratings.dtype == np.float64
    assert data.ratings.tolist() == [5, 4, 2, 5, 4.5, 3, 5, 4]
    assert data.labels.dtype == np.int8
    assert data.labels.tolist() == [-1] * 8
    assert data.timestamps.dtype == np.float64
    assert data.timestamps[0] == 1_700_000_000
    assert data.positives(4.0).tolist() == [True, True, False, True, True, False, True, True]
    assert data.positives(4.75).tolist() == [True, False, False, True, False, False, True, False]
    assert data.warnings == []


def test_item_text_is_title_then_named_optional_columns():
    text = read_platform(VALID / "csv_ratings").item_text
    assert sorted(text) == ["m1", "m2", "m3", "m4", "m5", "m6"]
    assert text["m1"] == "The Quiet Harbor. genres: Drama. year: 1998"
    # A quoted comma stays in the title; an empty optional column is left out.
    assert text["m2"] == "Rocket Summer, Part II. genres: Sci-Fi. year: 2003"
    assert text["m3"] == "Laugh Track. genres: Comedy"


def test_name_override():
    assert read_platform(VALID / "csv_ratings", name="shop").name == "shop"


# ------------------------------------------------------------------ JSONL labels, ISO times, ids


def test_jsonl_label_platform_with_iso_timestamps_and_numeric_ids():
    data = read_platform(VALID / "jsonl_labels")
    assert data.label_kind == "label"
    assert data.users.tolist() == ["7", "7", "7", "7", "8"]
    assert data.items.tolist() == ["101", "102", "103", "104", "101"]
    assert data.labels.tolist() == [1, 0, 1, 1, 1]
    assert np.isnan(data.ratings).all()
    # The threshold does not matter on a label platform.
    assert data.positives(4.0).tolist() == data.positives(100.0).tolist() == [1, 0, 1, 1, 1]
    assert data.timestamps.tolist() == [
        utc(2024, 1, 5, 10),  # "...Z"
        utc(2024, 1, 6, 10),
        utc(2024, 1, 7),  # a bare date is midnight UTC
        1_704_844_800,  # Unix seconds mixed in
        utc(2024, 2, 1, 7, 30),  # "+01:00" offset
    ]
    assert data.item_text == {
        "101": "Trail Shoes. category: sports",
        "102": "Rain Jacket. category: outdoor",
        "103": "Camp Stove",
        "104": "Head Lamp. category: outdoor",
    }


def test_jsonl_numeric_ids_match_their_string_form(tmp_path: Path):
    folder = write(
        tmp_path / "p",
        {
            "items.jsonl": jsonl({"item_id": 5, "title": "Five"}, {"item_id": "6", "title": 6}),
            "interactions.jsonl": jsonl(
                {"user_id": 1, "item_id": 5.0, "rating": "4", "timestamp": "1000"},
                {"user_id": "1", "item_id": 6, "rating": 2.5, "timestamp": 1001.5},
                {"user_id": 1.0, "item_id": "5", "rating": 3, "timestamp": 1002},
            ),
        },
    )
    data = read_platform(folder)
    assert data.users.tolist() == ["1", "1", "1"]
    assert data.items.tolist() == ["5", "6", "5"]
    assert data.ratings.tolist() == [4.0, 2.5, 3.0]
    assert data.timestamps.tolist() == [1000.0, 1001.5, 1002.0]
    assert data.item_text == {"5": "Five", "6": "6"}


def test_jsonl_fractional_id_is_rejected(tmp_path: Path):
    folder = write(
        tmp_path / "p",
        {
            "items.jsonl": jsonl({"item_id": 1.5, "title": "A"}),
            "interactions.jsonl": jsonl({"user_id": 1, "item_id": 1, "label": 1, "timestamp": 1}),
        },
    )
    with pytest.raises(DataError) as caught:
        read_platform(folder)
    assert str(caught.value) == (
        f"{folder / 'items.jsonl'}, row 1, column 'item_id': expected an identifier, got 1.5"
    )


@pytest.mark.parametrize("suffix", [".csv", ".tsv", ".jsonl"])
def test_the_three_formats_read_the_same(tmp_path: Path, suffix: str):
    items = [{"item_id": "a", "title": "Alpha", "genres": "x"}, {"item_id": "b", "title": "Beta"}]
    inter = [
        {"user_id": "u", "item_id": "a", "label": 1, "timestamp": "2020-01-01T00:00:00"},
        {"user_id": "u", "item_id": "b", "label": 0, "timestamp": 1577836861},
    ]

    def render(rows: list[dict[str, object]], columns: list[str]) -> str:
        if suffix == ".jsonl":
            return jsonl(*rows)
        sep = "," if suffix == ".csv" else "\t"
        lines = [sep.join(columns)]
        lines += [sep.join(str(row.get(c, "")) for c in columns) for row in rows]
        return "\n".join(lines) + "\n"

    folder = write(
        tmp_path / "p",
        {
            f"items{suffix}": render(items, ["item_id", "title", "genres"]),
            f"interactions{suffix}": render(inter, ["user_id", "item_id", "label", "timestamp"]),
        },
    )
    data = read_platform(folder)
    assert data.label_kind == "label"
    assert data.labels.tolist() == [1, 0]
    assert data.timestamps.tolist() == [utc(2020, 1, 1), utc(2020, 1, 1, 0, 1, 1)]
    assert data.item_text == {"a": "Alpha. genres: x", "b": "Beta"}


def test_bom_crlf_and_blank_lines_keep_editor_row_numbers(tmp_path: Path):
    folder = write(
        tmp_path / "p",
        {
            "items.csv": "\ufeffitem_id,title\r\nm1,One\r\n\r\nm2,Two\r\n",
            "interactions.csv": "user_id,item_id,rating,timestamp\r\n"
            "u1,m1,5,10\r\n"
            "\r\n"
            "u1,m2,bad,20\r\n",
        },
    )
    with pytest.raises(DataError) as caught:
        read_platform(folder)
    assert (caught.value.row, caught.value.column) == (4, "rating")
    (folder / "interactions.csv").write_text("user_id,item_id,rating,timestamp\r\nu1,m2,4,20\r\n")
    data = read_platform(folder)
    assert data.item_text == {"m1": "One", "m2": "Two"}
    assert data.ratings.tolist() == [4.0]


def test_unicode_line_separators_inside_values_are_not_line_breaks(tmp_path: Path):
    # U+2028 is legal inside a JSON string and \f inside a quoted CSV field; neither ends a row.
    folder = write(
        tmp_path / "p",
        {
            "items.jsonl": jsonl(
                {"item_id": "a", "title": "Line\u2028Separated"}, {"item_id": "b", "title": "B"}
            ),
            "interactions.csv": 'user_id,item_id,rating,timestamp\nu1,a,5,1\n"u\x0c2",b,x,2\n',
        },
    )
    with pytest.raises(DataError) as caught:
        read_platform(folder)
    assert (caught.value.row, caught.value.column) == (3, "rating")
    (folder / "interactions.csv").write_text(
        'user_id,item_id,rating,timestamp\nu1,a,5,1\n"u\x0c2",b,3,2\n'
    )
    data = read_platform(folder)
    assert data.item_text["a"] == "Line\u2028Separated"
    assert data.users.tolist() == ["u1", "u\x0c2"]


def test_long_text_is_truncated_with_a_warning():
    data = read_platform(VALID / "long_description")
    prefix = "The Long Book. description: "
    assert data.item_text["b1"].startswith(prefix)
    assert len(data.item_text["b1"]) == len(prefix) + platform_format.MAX_TEXT_CHARS
    assert data.item_text["b2"] == "A Short Book. description: Brief."
    assert len(data.warnings) == 1
    assert (
        "row 2, column 'description': text of 1739 characters truncated to 1000"
        in (data.warnings[0])
    )


def test_overlong_identifier_is_an_error(tmp_path: Path):
    long_id = "x" * (platform_format.MAX_ID_CHARS + 1)
    folder = write(
        tmp_path / "p",
        {
            "items.csv": "item_id,title\nm1,One\n",
            "interactions.csv": f"user_id,item_id,rating,timestamp\n{long_id},m1,5,1\n",
        },
    )
    with pytest.raises(DataError, match="identifier longer than 256 characters") as caught:
        read_platform(folder)
    assert (caught.value.row, caught.value.column) == (2, "user_id")


# ------------------------------------------------------------------ folders and errors


def test_data_error_renders_one_line():
    error = DataError("a/b.csv", "bad\n   value", row=3, column="x")
    assert str(error) == "a/b.csv, row 3, column 'x': bad value"
    assert str(DataError("a", "gone")) == "a: gone"


def test_platform_dirs_and_read_dataset(tmp_path: Path):
    assert platform_dirs(VALID / "csv_ratings") == [VALID / "csv_ratings"]
    assert platform_dirs(VALID) == [
        VALID / "csv_ratings",
        VALID / "jsonl_labels",
        VALID / "long_description",
    ]
    assert [p.name for p in read_dataset(VALID)] == [
        "csv_ratings",
        "jsonl_labels",
        "long_description",
    ]
    with pytest.raises(DataError, match="folder does not exist"):
        platform_dirs(tmp_path / "missing")
    with pytest.raises(DataError, match="platform folder does not exist"):
        read_platform(tmp_path / "missing")


def test_find_file_refuses_to_guess(tmp_path: Path):
    write(tmp_path, {"items.csv": "item_id,title\n", "items.jsonl": "{}\n"})
    with pytest.raises(DataError, match=r"several items files \(items.csv, items.jsonl\)"):
        find_file(tmp_path, "items")
    with pytest.raises(DataError, match="no interactions file"):
        find_file(tmp_path, "interactions")


# ------------------------------------------------------------------ write_dataset


def tables(name: str, rating: int = 5) -> PlatformTables:
    return PlatformTables(
        name=name,
        interactions=[
            {"user_id": "u1", "item_id": f"{name}-1", "rating": rating, "timestamp": 100},
            {"user_id": "u2", "item_id": f"{name}-2", "rating": 2, "timestamp": 200},
        ],
        items=[
            {"item_id": f"{name}-1", "title": f"{name} one", "genres": "Drama, Comedy"},
            {"item_id": f"{name}-2", "title": f'{name} "two"\tquoted', "genres": ""},
        ],
    )


def test_write_dataset_round_trip(tmp_path: Path):
    out = write_dataset(tmp_path / "out", [tables("a"), tables("b", rating=3)])
    assert out == tmp_path / "out"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left
    assert sorted(p.name for p in out.iterdir()) == ["a", "b"]
    assert sorted(p.name for p in (out / "a").iterdir()) == ["interactions.tsv", "items.tsv"]
    a, b = read_dataset(out)
    assert (a.name, b.name) == ("a", "b")
    assert a.ratings.tolist() == [5.0, 2.0]
    assert b.ratings.tolist() == [3.0, 2.0]
    assert a.item_text == {"a-1": "a one. genres: Drama, Comedy", "a-2": 'a "two"\tquoted'}


def fail_on_second_call(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    real = platform_writer._write_tsv
    calls: list[Path] = []

    def flaky(path: Path, rows: list[dict[str, object]]) -> None:
        calls.append(path)
        if len(calls) == 2:
            raise OSError("disk full")
        real(path, rows)

    monkeypatch.setattr(platform_writer, "_write_tsv", flaky)
    return calls


def test_write_dataset_failure_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    calls = fail_on_second_call(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        write_dataset(tmp_path / "out", [tables("a"), tables("b")])
    assert len(calls) == 2  # the failure really happened mid-write
    assert list(tmp_path.iterdir()) == []  # neither the target nor a staging folder


def test_write_dataset_interrupt_leaves_nothing_behind(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    def interrupted(path: Path, rows: list[dict[str, object]]) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr(platform_writer, "_write_tsv", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_dataset(tmp_path / "nested" / "out", [tables("a")])
    assert list((tmp_path / "nested").iterdir()) == []


def test_write_dataset_refuses_existing_target_without_force(tmp_path: Path):
    out = write_dataset(tmp_path / "out", [tables("old")])
    with pytest.raises(DataError) as caught:
        write_dataset(out, [tables("new")])
    assert str(caught.value) == f"{out}: already exists (pass --force to replace it)"
    assert [p.name for p in out.iterdir()] == ["old"]  # untouched


def test_write_dataset_force_replaces_target(tmp_path: Path):
    out = write_dataset(tmp_path / "out", [tables("old")])
    (out / "stray.txt").write_text("left by hand")
    write_dataset(out, [tables("new")], force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging or trash left
    assert [p.name for p in out.iterdir()] == ["new"]
    assert [p.name for p in read_dataset(out)] == ["new"]


def test_write_dataset_failed_force_keeps_old_target(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
):
    out = write_dataset(tmp_path / "out", [tables("old")])
    fail_on_second_call(monkeypatch)
    with pytest.raises(OSError, match="disk full"):
        write_dataset(out, [tables("new"), tables("newer")], force=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert [p.name for p in read_dataset(out)] == ["old"]


def test_a_file_path_is_named_as_a_file(tmp_path: Path) -> None:
    path = tmp_path / "interactions.csv"
    path.write_text("user_id,item_id,rating,timestamp\n", encoding="utf-8")
    with pytest.raises(DataError, match="is a file"):
        read_dataset(path)


def test_an_empty_platform_is_refused_before_anything_is_written(tmp_path: Path) -> None:
    empty = PlatformTables(name="p0", interactions=[], items=[{"item_id": "1", "title": "t"}])
    with pytest.raises(DataError, match="no items or no interactions"):
        write_dataset(tmp_path / "out", [empty])
    assert list(tmp_path.iterdir()) == []


# ------------------------------------------------------------------ long text, large files


def test_a_one_megabyte_title_is_truncated_not_rejected(tmp_path: Path):
    # csv's default field limit (128 KiB) used to reject it before it could be truncated.
    folder = write(
        tmp_path / "p",
        {
            "items.csv": f"item_id,title\nm1,{'x' * 1_000_000}\n",
            "interactions.csv": "user_id,item_id,rating,timestamp\nu1,m1,5,1\n",
        },
    )
    data = read_platform(folder)
    assert data.item_text == {"m1": "x" * platform_format.MAX_TEXT_CHARS}
    assert data.warnings == [
        f"{folder / 'items.csv'}, row 2, column 'title': text of 1000000 characters "
        "truncated to 1000"
    ]


ITEMS_CSV = "item_id,title\nm1,One\nm2,Two\nm3,Three\n7,Seven\n"
HEADER = "user_id,item_id,rating,timestamp\n"

# Interactions files both readers must read alike: value forms pyarrow converts itself, forms
# left to the row reader's functions, blank rows, quoted line breaks, ids written as numbers.
SAME_RESULT = {
    "csv_forms": HEADER + '" u1 ",m1, 4 ,1700000000\nu1,"m2",4.5,2024-01-05T10:00:00Z\n,,,\n'
    "u2,m3,1e0,2024-01-05 10:00\nu2,m1,+2,2024-01-05T10:00:00.5+01:00\n"
    "u3,m2,1_0,1600-01-01\nu3,7,.5,2024-01-05T10\n",
    "tsv_quoted_line_break": "user_id\titem_id\tlabel\ttimestamp\tnote\r\n"
    'u1\tm1\t1\t10\t"two\r\nlines"\r\nu1\tm2\t0\t11\t\r\n',
    "jsonl_numbers": jsonl(
        {"user_id": 1, "item_id": "m1", "label": 1, "timestamp": "2024-01-05T10:00:00Z"},
        {"user_id": 2.0, "item_id": "m2", "label": 0.0, "timestamp": "2024-01-06"},
    )
    + "\n",
}

# Bad files: each error must name the row and column the row reader names.
SAME_ERROR = {
    "csv_row_after_quoted_line_break": "user_id,item_id,rating,timestamp,note\n"
    'u1,m1,4,1,"a\nb"\nu1,m2,x,2,\n',
    "csv_unknown_item_after_blank_lines": HEADER + "u1,m1,4,1\n\n\nu1,m9,4,2\n",
    "csv_duplicate_after_blank_rows": HEADER + "u1,m1,4,1\n,,,\nu2,m1,4,1\n u1 ,m1,5,1.0\n",
    "csv_thirtieth_of_february": HEADER + "u1,m1,4,2024-01-05\nu1,m2,4,2023-02-30\n",
    "csv_first_of_two_problems": HEADER + "u1,m1,4,1\nu1,m1,4,1\nu2,,4,3\n",
    "csv_label_two": "user_id,item_id,label,timestamp\nu1,m1,1,1\nu1,m2,2,2\n",
    "jsonl_object_over_lines": '{"user_id": "u1", "item_id": "m1", "rating": 4,\n"timestamp": 1}\n',
    "jsonl_two_objects_on_a_line": jsonl(
        {"user_id": "u1", "item_id": "m1", "rating": 4, "timestamp": 1}
    ).strip()
    + jsonl({"user_id": "u1", "item_id": "m2", "rating": 4, "timestamp": 2}),
    "jsonl_nan_rating": '{"user_id": "u1", "item_id": "m1", "rating": NaN, "timestamp": 1}\n',
    "jsonl_fractional_user": jsonl(
        {"user_id": 1, "item_id": "m1", "rating": 4, "timestamp": 1},
        {"user_id": 1.5, "item_id": "m1", "rating": 4, "timestamp": 2},
    ),
    "jsonl_bad_utf8_in_value": b'{"user_id": "u\xe9", "item_id": "m1", "rating": 4, '
    b'"timestamp": 1}\n',
}


def platform(tmp_path: Path, case: str, interactions: str | bytes) -> Path:
    suffix = "." + case.split("_")[0]
    return write(tmp_path / case, {"items.csv": ITEMS_CSV, f"interactions{suffix}": interactions})


def read_by_rows(folder: Path, monkeypatch: pytest.MonkeyPatch) -> platform_data.PlatformData:
    """read_platform with the columnar reader switched off: the reference behaviour."""
    with monkeypatch.context() as patch:
        patch.setattr(platform_data, "_columnar_interactions", lambda path, item_text: None)
        return read_platform(folder)


@pytest.mark.parametrize("case", sorted(SAME_RESULT))
def test_columnar_reader_reads_valid_files_like_the_row_reader(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
):
    folder = platform(tmp_path, case, SAME_RESULT[case])
    expected = read_by_rows(folder, monkeypatch)

    def not_expected(path: Path, item_text: dict[str, str]) -> None:
        raise AssertionError(f"{path} left the columnar reader")

    monkeypatch.setattr(platform_data, "_row_interactions", not_expected)
    data = read_platform(folder)
    for name in ("users", "items", "labels", "timestamps"):
        assert getattr(data, name).tolist() == getattr(expected, name).tolist(), name
        assert getattr(data, name).dtype == getattr(expected, name).dtype, name
    np.testing.assert_array_equal(data.ratings, expected.ratings)
    assert data.label_kind == expected.label_kind


@pytest.mark.parametrize("case", sorted(SAME_ERROR))
def test_columnar_reader_names_the_row_readers_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, case: str
):
    folder = platform(tmp_path, case, SAME_ERROR[case])
    with pytest.raises(DataError) as expected:
        read_by_rows(folder, monkeypatch)
    with pytest.raises(DataError) as caught:
        read_platform(folder)
    assert str(caught.value) == str(expected.value)
    assert caught.value.row is not None


def test_error_deep_in_a_large_file_names_its_row(tmp_path: Path):
    # Far past pyarrow's first block (1 MiB), behind blank lines that shift line numbers.
    lines = [f"u{k % 97},m{1 + k % 3},{1 + k % 5},{k}" for k in range(120_000)]
    lines[60_000] = ""
    lines[110_000] = "u1,m1,five,110000"
    folder = write(
        tmp_path / "p", {"items.csv": ITEMS_CSV, "interactions.csv": HEADER + "\n".join(lines)}
    )
    with pytest.raises(DataError) as caught:
        read_platform(folder)
    assert str(caught.value) == (
        f"{folder / 'interactions.csv'}, row 110002, column 'rating': expected a number, got 'five'"
    )
