"""The embedded datasets: MovieLens-100K as five genre platforms, and the synthetic generator."""

from __future__ import annotations

from pathlib import Path

import pytest

from common.errors import DataError
from common.movielens import GENRE_GROUPS, build_ml100k, primary_group
from common.platform_data import read_dataset
from common.platform_writer import PlatformTables, write_dataset
from common.synthetic import SyntheticConfig, generate
from server.cli import main

ML_PLATFORMS = ["kids_family", "action_scifi", "thriller_crime", "comedy", "drama_romance"]


# ------------------------------------------------------------------ MovieLens-100K


@pytest.fixture(scope="module")
def ml100k() -> list[PlatformTables]:
    return build_ml100k()


@pytest.fixture(scope="module")
def ml100k_written(ml100k: list[PlatformTables], tmp_path_factory: pytest.TempPathFactory):
    out = write_dataset(tmp_path_factory.mktemp("ml") / "ml100k", ml100k)
    return {platform.name: platform for platform in read_dataset(out)}


def test_ml100k_has_the_five_genre_platforms(ml100k: list[PlatformTables]):
    assert [t.name for t in ml100k] == ML_PLATFORMS
    assert list(GENRE_GROUPS) == ML_PLATFORMS


def test_ml100k_each_movie_in_exactly_one_platform(ml100k: list[PlatformTables]):
    ids = [item["item_id"] for t in ml100k for item in t.items]
    assert len(ids) == len(set(ids)) == 1682
    for table in ml100k:
        own = {item["item_id"] for item in table.items}
        assert own, table.name
        assert all(row["item_id"] in own for row in table.interactions), table.name


def test_ml100k_platform_is_the_primary_group_of_the_genres(ml100k: list[PlatformTables]):
    for table in ml100k:
        for item in table.items:
            assert primary_group(str(item["genres"]).split(", ")) == table.name, item


def test_ml100k_all_interactions_kept(ml100k: list[PlatformTables]):
    rows = [row for t in ml100k for row in t.interactions]
    assert len(rows) == 100_000
    assert {row["rating"] for row in rows} == {1, 2, 3, 4, 5}
    assert all(isinstance(row["timestamp"], int) for row in rows)
    assert len({(row["user_id"], row["item_id"]) for row in rows}) == 100_000
    assert all(t.interactions for t in ml100k)


def test_ml100k_item_has_title_year_and_genres(ml100k: list[PlatformTables]):
    by_id = {item["item_id"]: (t.name, item) for t in ml100k for item in t.items}
    assert by_id["1"] == (
        "kids_family",
        {"item_id": "1", "title": "Toy Story (1995)", "genres": "Animation, Children's, Comedy"},
    )
    assert by_id["2"] == (
        "action_scifi",
        {"item_id": "2", "title": "GoldenEye (1995)", "genres": "Action, Adventure, Thriller"},
    )
    assert by_id["3"][0] == "thriller_crime"


def test_ml100k_users_overlap(ml100k: list[PlatformTables]):
    users = {t.name: {row["user_id"] for row in t.interactions} for t in ml100k}
    everyone = set().union(*users.values())
    assert len(everyone) == 943
    on_all = set.intersection(*users.values())
    assert len(on_all) > 100
    assert all(len(users[a] & users[b]) > 0 for a in users for b in users)


def test_ml100k_written_platforms_read_back(ml100k_written):
    assert sorted(ml100k_written) == sorted(ML_PLATFORMS)
    assert sum(p.num_interactions for p in ml100k_written.values()) == 100_000
    kids = ml100k_written["kids_family"]
    assert kids.label_kind == "rating"
    assert kids.item_text["1"] == "Toy Story (1995). genres: Animation, Children's, Comedy"
    assert "1" not in ml100k_written["comedy"].item_text


@pytest.mark.parametrize(
    ("genres", "group"),
    [
        (["Animation", "Children's", "Comedy"], "kids_family"),
        (["Comedy", "Fantasy"], "kids_family"),
        (["Children's", "Drama"], "kids_family"),
        (["Musical", "Romance"], "kids_family"),
        (["Sci-Fi"], "action_scifi"),
        (["Adventure", "Comedy"], "action_scifi"),
        (["War", "Drama"], "action_scifi"),
        (["Horror"], "thriller_crime"),
        (["Mystery", "Romance"], "thriller_crime"),
        (["Action", "Thriller"], "action_scifi"),
        (["Drama", "Western"], "action_scifi"),
        (["Comedy", "Crime"], "thriller_crime"),
        (["Drama", "Film-Noir"], "thriller_crime"),
        (["Comedy", "Romance"], "comedy"),
        (["Comedy"], "comedy"),
        (["Drama", "Romance"], "drama_romance"),
        (["Documentary"], "drama_romance"),
        (["unknown"], "drama_romance"),
        (["NoSuchGenre"], "drama_romance"),
        ([], "drama_romance"),
    ],
)
def test_primary_group(genres: list[str], group: str):
    assert primary_group(genres) == group


def write_atomic(folder: Path, item_rows: list[str], inter_rows: list[str]) -> Path:
    folder.mkdir()
    header = "item_id:token\tmovie_title:token_seq\trelease_year:token\tclass:token_seq\n"
    (folder / "ml-100k.item").write_text(header + "".join(r + "\n" for r in item_rows))
    (folder / "ml-100k.inter").write_text(
        "user_id:token\titem_id:token\trating:float\ttimestamp:float\n"
        + "".join(r + "\n" for r in inter_rows)
    )
    return folder


def test_build_ml100k_from_a_small_source(tmp_path: Path):
    source = write_atomic(
        tmp_path / "src",
        ["1\tToy Story\t1995\tAnimation Children's Comedy", "7\tOld Reel\t\tDrama"],
        ["10\t1\t4\t881250949", "11\t7\t2.0\t881250950.0"],
    )
    result = {t.name: t for t in build_ml100k(source)}
    assert list(result) == ML_PLATFORMS
    assert result["kids_family"].items == [
        {"item_id": "1", "title": "Toy Story (1995)", "genres": "Animation, Children's, Comedy"}
    ]
    assert result["drama_romance"].items == [
        {"item_id": "7", "title": "Old Reel", "genres": "Drama"}
    ]
    assert result["drama_romance"].interactions == [
        {"user_id": "11", "item_id": "7", "rating": 2, "timestamp": 881250950}
    ]
    assert result["comedy"].items == result["comedy"].interactions == []


def test_build_ml100k_reports_bad_source_rows(tmp_path: Path):
    source = write_atomic(tmp_path / "a", ["1\tToy Story\t1995\tAnimation"], ["10\t9\t4\t1"])
    with pytest.raises(DataError) as caught:
        build_ml100k(source)
    assert (caught.value.path.name, caught.value.row, caught.value.column) == (
        "ml-100k.inter",
        2,
        "item_id",
    )
    source = write_atomic(tmp_path / "b", ["1\tToy Story\t1995\t"], [])
    with pytest.raises(DataError, match="movie has no genre"):
        build_ml100k(source)
    with pytest.raises(DataError, match="file not found"):
        build_ml100k(tmp_path / "missing")


# ------------------------------------------------------------------ synthetic generator


def users_of(table: PlatformTables) -> set[object]:
    return {row["user_id"] for row in table.interactions}


def test_synthetic_same_seed_same_tables():
    config = SyntheticConfig(platforms=3, users=10, items=15, interactions_per_user=5, seed=7)
    assert generate(config) == generate(config)


def test_synthetic_different_seed_different_tables():
    first = generate(SyntheticConfig(seed=1))
    second = generate(SyntheticConfig(seed=2))
    assert [t.interactions for t in first] != [t.interactions for t in second]
    assert [t.items for t in first] != [t.items for t in second]


def test_synthetic_shape():
    config = SyntheticConfig(platforms=4, users=10, items=15, interactions_per_user=6)
    result = generate(config)
    assert [t.name for t in result] == ["p0", "p1", "p2", "p3"]
    for table in result:
        assert [item["item_id"] for item in table.items] == [
            f"{table.name}-i{k}" for k in range(15)
        ]
        assert len(users_of(table)) == 10
        assert len(table.interactions) == 10 * 6
        per_user: dict[object, list[object]] = {}
        for row in table.interactions:
            per_user.setdefault(row["user_id"], []).append(row["item_id"])
        assert all(len(set(items)) == 6 for items in per_user.values())
        assert all(1 <= row["rating"] <= 5 and "label" not in row for row in table.interactions)


def test_synthetic_interactions_capped_by_catalogue():
    (table,) = generate(SyntheticConfig(platforms=1, users=3, items=4, interactions_per_user=9))
    assert len(table.interactions) == 3 * 4


def test_synthetic_overlap_zero_shares_no_user():
    result = generate(SyntheticConfig(platforms=3, users=12, overlap=0.0))
    users = [users_of(t) for t in result]
    assert all(len(u) == 12 for u in users)
    assert all(not (users[a] & users[b]) for a in range(3) for b in range(a + 1, 3))


def test_synthetic_overlap_one_shares_every_user():
    result = generate(SyntheticConfig(platforms=3, users=12, overlap=1.0))
    users = [users_of(t) for t in result]
    assert users[0] == users[1] == users[2]
    assert len(users[0]) == 12


def test_synthetic_partial_overlap():
    result = generate(SyntheticConfig(platforms=2, users=40, overlap=0.25))
    assert len(users_of(result[0]) & users_of(result[1])) == 10


def test_synthetic_implicit_writes_labels(tmp_path: Path):
    result = generate(SyntheticConfig(platforms=2, users=8, implicit=True))
    rows = [row for t in result for row in t.interactions]
    assert all("rating" not in row and row["label"] in (0, 1) for row in rows)
    assert {row["label"] for row in rows} == {0, 1}
    platforms = read_dataset(write_dataset(tmp_path / "syn", result))
    assert [p.label_kind for p in platforms] == ["label", "label"]
    header = (tmp_path / "syn" / "p0" / "interactions.tsv").read_text().splitlines()[0]
    assert header.split("\t") == ["user_id", "item_id", "label", "timestamp"]


def test_synthetic_explicit_writes_ratings(tmp_path: Path):
    platforms = read_dataset(write_dataset(tmp_path / "syn", generate(SyntheticConfig())))
    assert [p.label_kind for p in platforms] == ["rating"] * 3
    assert platforms[0].item_text["p0-i0"].split(". ")[1].startswith("genres: topic")


# ------------------------------------------------------------------ fedfuse data prepare


def test_cli_prepare_synthetic_then_check(tmp_path: Path, capsys: pytest.CaptureFixture[str]):
    out = tmp_path / "syn"
    assert main(["data", "prepare", "--dataset", "synthetic", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed.startswith(f"wrote 3 platforms to {out}\n")
    assert sorted(p.name for p in out.iterdir()) == ["p0", "p1", "p2"]
    assert [p.name for p in tmp_path.iterdir()] == ["syn"]

    assert main(["data", "check", str(out)]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    assert captured.out.startswith(f"ok: 3 platform(s) valid under {out}\n")
    assert "| p0 | 480 | 40 | 60 |" in captured.out


def test_cli_prepare_refuses_existing_out_without_force(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    out = tmp_path / "syn"
    args = ["data", "prepare", "--dataset", "synthetic", "--platforms", "1", "--out", str(out)]
    assert main(args) == 0
    capsys.readouterr()
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err == f"fedfuse: error: {out}: already exists (pass --force to replace it)\n"
    assert main([*args, "--force", "--implicit"]) == 0
    assert read_dataset(out)[0].label_kind == "label"


def test_cli_prepare_bad_synthetic_setting_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    out = tmp_path / "syn"
    code = main(["data", "prepare", "--dataset", "synthetic", "--overlap", "2", "--out", str(out)])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.splitlines()) == 1
    assert err.startswith("fedfuse: error: ")
    assert "overlap" in err
    assert not out.exists()
