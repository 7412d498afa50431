"""MovieLens-100K as five recommendation platforms, built from the installed ``recbole`` wheel.

The data files are read from ``recbole/dataset_example/ml-100k/`` without importing recbole
(its import pulls a large stack), and are never copied into this repository: MovieLens'
licence forbids redistribution, so every user builds the platforms from their own install.
"""

from __future__ import annotations

import csv
import importlib.util
from pathlib import Path

from common.errors import DataError
from common.platform_data import PlatformTables

# Each movie goes to exactly one platform: the first group in this order that shares a genre
# with it. The order keeps the niche groups from being swallowed by the two largest genres
# (Drama, Comedy): "Toy Story" (Animation, Children's, Comedy) is a kids/family title.
GENRE_GROUPS: dict[str, tuple[str, ...]] = {
    "kids_family": ("Animation", "Children's", "Musical", "Fantasy"),
    "action_scifi": ("Action", "Adventure", "Sci-Fi", "War", "Western"),
    "thriller_crime": ("Thriller", "Crime", "Horror", "Mystery", "Film-Noir"),
    "comedy": ("Comedy",),
    "drama_romance": ("Drama", "Romance", "Documentary", "unknown"),
}


def ml100k_dir() -> Path:
    """Folder of the ML-100K files inside the installed recbole wheel (found, not imported)."""
    spec = importlib.util.find_spec("recbole")
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            "recbole",
            "MovieLens-100K needs the recbole wheel: pip install --no-deps recbole==1.2.1",
        )
    folder = Path(next(iter(spec.submodule_search_locations))) / "dataset_example" / "ml-100k"
    if not folder.is_dir():
        raise DataError(folder, "MovieLens-100K files not found in the installed recbole wheel")
    return folder


def _atomic_rows(path: Path, columns: tuple[str, ...]) -> list[tuple[int, dict[str, str]]]:
    """Rows of a recbole atomic file (TSV, header ``name:type``) keyed by bare column names."""
    if not path.is_file():
        raise DataError(path, "file not found")
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        header = [name.split(":")[0] for name in next(reader)]
        for name in columns:
            if name not in header:
                raise DataError(path, "missing column", row=1, column=name)
        rows = []
        for values in reader:
            if len(values) != len(header):
                raise DataError(path, f"expected {len(header)} fields", row=reader.line_num)
            rows.append((reader.line_num, dict(zip(header, values, strict=True))))
    return rows


def primary_group(genres: list[str]) -> str:
    for group, members in GENRE_GROUPS.items():
        if any(genre in members for genre in genres):
            return group
    return "drama_romance"


def build_ml100k(source: Path | None = None) -> list[PlatformTables]:
    """The five genre-group platforms; users overlap across platforms, movies do not."""
    source = source or ml100k_dir()
    items_path = source / "ml-100k.item"
    platform_of: dict[str, str] = {}
    items: dict[str, list[dict[str, object]]] = {group: [] for group in GENRE_GROUPS}
    for row, record in _atomic_rows(
        items_path, ("item_id", "movie_title", "release_year", "class")
    ):
        genres = record["class"].split()
        if not genres:
            raise DataError(items_path, "movie has no genre", row=row, column="class")
        group = primary_group(genres)
        year = record["release_year"].strip()
        title = record["movie_title"].strip() + (f" ({year})" if year else "")
        platform_of[record["item_id"]] = group
        items[group].append(
            {"item_id": record["item_id"], "title": title, "genres": ", ".join(genres)}
        )

    inter_path = source / "ml-100k.inter"
    interactions: dict[str, list[dict[str, object]]] = {group: [] for group in GENRE_GROUPS}
    for row, record in _atomic_rows(inter_path, ("user_id", "item_id", "rating", "timestamp")):
        group = platform_of.get(record["item_id"])
        if group is None:
            raise DataError(inter_path, "unknown item", row=row, column="item_id")
        interactions[group].append(
            {
                "user_id": record["user_id"],
                "item_id": record["item_id"],
                "rating": int(float(record["rating"])),
                "timestamp": int(float(record["timestamp"])),
            }
        )
    return [
        PlatformTables(name=group, interactions=interactions[group], items=items[group])
        for group in GENRE_GROUPS
    ]
