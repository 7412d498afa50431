"""Platforms read from disk: finding their folders and reading each one, validated.

A platform is a folder holding an interactions file and an items file, each as CSV, TSV or
JSON Lines (``interactions.csv|tsv|jsonl``, ``items.csv|tsv|jsonl``), and optionally a
``carried/`` subfolder in the same format: what its users brought from other platforms (their
own histories there, item texts included), which ``model.carried_history`` reads. Every
problem found is raised as a :class:`DataError` naming the file, row and column, because a
platform operator must be able to fix their export without reading our code.

Interactions files reach millions of rows, so they are parsed by pyarrow and checked a column
at a time (``common/columnar_reader.py``); items files, and any file pyarrow cannot parse, are
read record by record with csv/json (``common/row_reader.py``), which also stays the reference
for which row and column an error names. The format's names and limits are in
``common/platform_format.py``; writing platforms is ``common/platform_writer.py``.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Concatenate, ParamSpec, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

# The ``X as X`` imports are re-exports for modules open in other work that still import them
# from here (server/serving/); drop them once those import from their homes.
from common.columnar_reader import _columnar_interactions
from common.errors import DataError
from common.platform_format import CARRIED, FORMATS, INTERACTIONS, ITEMS
from common.platform_format import MAX_ID_CHARS as MAX_ID_CHARS
from common.platform_format import MAX_TEXT_CHARS as MAX_TEXT_CHARS
from common.row_reader import _identifier as _identifier
from common.row_reader import _read_records as _read_records
from common.row_reader import _row_interactions, read_items
from common.row_reader import _text as _text

if TYPE_CHECKING:
    from common.config import DataConfig

_P = ParamSpec("_P")
_R = TypeVar("_R")


@dataclass
class PlatformData:
    """A validated platform: interactions as parallel arrays, items as text.

    ``labels`` are the binary targets; ``ratings`` keep the raw explicit feedback (NaN for
    implicit-label platforms) so the positive threshold stays a task setting.
    """

    name: str
    root: Path
    users: np.ndarray  # str, one per interaction
    items: np.ndarray  # str, one per interaction
    ratings: np.ndarray  # float64, NaN when the platform has labels
    labels: np.ndarray  # int8 in {0, 1} when the platform has labels, else -1
    timestamps: np.ndarray  # float64 seconds
    item_text: dict[str, str]
    label_kind: str  # "rating" or "label"
    warnings: list[str] = field(default_factory=list)

    @property
    def num_interactions(self) -> int:
        return int(self.users.shape[0])

    def positives(self, threshold: float) -> np.ndarray:
        """Boolean mask of positive interactions (rating >= threshold, or label 1)."""
        if self.label_kind == "label":
            return self.labels == 1
        return self.ratings >= threshold


def distinct_codes(values: np.ndarray) -> tuple[np.ndarray, list[str]]:
    """An integer code per value and the distinct values (in first-seen order), by hashing in
    Arrow: sorting 10⁷ Python strings to the same end takes tens of seconds."""
    encoded = pc.dictionary_encode(pa.array(values, type=pa.string()))
    return encoded.indices.to_numpy(zero_copy_only=False), encoded.dictionary.to_pylist()


def find_file(root: Path, stem: str) -> Path:
    """The one ``stem.{csv,tsv,jsonl}`` in ``root``; ambiguity is an error, not a guess."""
    found = [root / f"{stem}{ext}" for ext in FORMATS if (root / f"{stem}{ext}").is_file()]
    if not found:
        names = ", ".join(f"{stem}{ext}" for ext in FORMATS)
        raise DataError(root, f"no {stem} file (expected one of {names})")
    if len(found) > 1:
        raise DataError(
            root, f"several {stem} files ({', '.join(p.name for p in found)}); keep one"
        )
    return found[0]


def is_platform_dir(path: Path) -> bool:
    return any((path / f"{INTERACTIONS}{ext}").is_file() for ext in FORMATS)


def path_error(path: Path | str, action: str, err: OSError) -> DataError:
    """An OSError met on ``path`` or under it as a one-line error the user can act on, naming
    the file the system refused as well when that is not ``path`` itself."""
    reason = err.strerror or str(err)
    if err.filename is not None and Path(os.fsdecode(err.filename)) != Path(path):
        reason += f": {os.fsdecode(err.filename)}"
    return DataError(path, f"cannot {action} ({reason})")


def _reading(
    func: Callable[Concatenate[Path | str, _P], _R],
) -> Callable[Concatenate[Path | str, _P], _R]:
    """Report an unreadable folder or file as a :class:`DataError` naming it, not a traceback."""

    @functools.wraps(func)
    def wrapper(path: Path | str, *args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return func(path, *args, **kwargs)
        except OSError as err:
            raise path_error(path, "read", err) from None

    return wrapper


@_reading
def read_platform(root: Path | str, name: str | None = None) -> PlatformData:
    """Read and validate the platform folder ``root``; raises :class:`DataError` on bad input."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "platform folder does not exist")
    warnings: list[str] = []
    item_text = read_items(find_file(root, ITEMS), warnings)
    path = find_file(root, INTERACTIONS)
    data = _columnar_interactions(path, item_text) or _row_interactions(path, item_text)
    if not len(data.users):
        raise DataError(path, "no interaction records")
    rating = data.target == "rating"
    return PlatformData(
        name=name or root.name,
        root=root,
        users=data.users,
        items=data.items,
        ratings=data.values if rating else np.full(len(data.values), np.nan),
        labels=np.full(len(data.values), -1, np.int8) if rating else data.values.astype(np.int8),
        timestamps=data.times,
        item_text=item_text,
        label_kind=data.target,
        warnings=warnings,
    )


def read_carried(data: PlatformData) -> PlatformData | None:
    """What the platform's users brought from other platforms (its ``carried/`` subfolder,
    validated like a platform), or None without one; read only by a model that uses it."""
    folder = data.root / CARRIED
    return read_platform(folder, f"{data.name}/{CARRIED}") if folder.is_dir() else None


@_reading
def platform_dirs(path: Path | str) -> list[Path]:
    """``path`` itself if it is a platform, else its platform subfolders (sorted by name)."""
    path = Path(path)
    if not path.exists():
        raise DataError(path, "folder does not exist")
    if not path.is_dir():
        raise DataError(path, "is a file; give its platform folder (or a folder of platforms)")
    if is_platform_dir(path):
        return [path]
    children = sorted(p for p in path.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not children:
        raise DataError(
            path, f"neither a platform folder nor a folder of platforms (no {INTERACTIONS} file)"
        )
    return children


def federation_platforms(data: DataConfig) -> list[tuple[str, Path]]:
    """The simulated federation's platforms (name, folder), in partition-id order: the folders
    under ``data.path`` sorted by name, or in the order ``data.platforms`` lists them."""
    folders = {p.name: p for p in platform_dirs(data.path)}
    names = data.platforms or sorted(folders)
    unknown = [n for n in names if n not in folders]
    if unknown:
        raise DataError(data.path, f"data.platforms names unknown platforms {unknown}")
    return [(name, folders[name]) for name in names]


def read_dataset(path: Path | str) -> list[PlatformData]:
    """Every platform under ``path`` (see :func:`platform_dirs`), validated, its ``carried/``
    data too."""
    platforms = [read_platform(root) for root in platform_dirs(path)]
    for platform in platforms:
        read_carried(platform)
    return platforms
