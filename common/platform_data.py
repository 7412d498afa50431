"""One platform's data: read, validate and write the on-disk format.

A platform is a folder holding an interactions file and an items file, each as CSV, TSV or
JSON Lines (``interactions.csv|tsv|jsonl``, ``items.csv|tsv|jsonl``). Every problem found is
raised as a :class:`DataError` naming the file, row and column, because a platform operator
must be able to fix their export without reading our code.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from common.errors import DataError

if TYPE_CHECKING:
    from common.config import DataConfig

FORMATS = {".csv": ",", ".tsv": "\t", ".jsonl": None}
INTERACTIONS = "interactions"
ITEMS = "items"
INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
ITEM_COLUMNS = ("item_id", "title")
MAX_TEXT_CHARS = 1000
MAX_ID_CHARS = 256


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


def _decode_lines(path: Path) -> list[str]:
    """The file's lines as text; a non-UTF-8 byte is reported with its row and byte column."""
    raw = path.read_bytes()
    if not raw.strip():
        raise DataError(path, "file is empty")
    lines = raw.split(b"\n")
    for number, line in enumerate(lines, start=1):
        try:
            line.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(
                path,
                f"byte {err.start + 1} is not valid UTF-8 (0x{line[err.start]:02x})",
                row=number,
            ) from None
    text = raw.decode("utf-8").removeprefix("\ufeff")
    # Only \n (or \r\n) ends a line: str.splitlines() would also split inside a value at
    # \f, \x85 or U+2028, which are valid in JSON strings and quoted CSV fields.
    return [line.removesuffix("\r") for line in text.split("\n")]


def _read_records(path: Path) -> tuple[list[str], Iterator[tuple[int, dict[str, object]]]]:
    """Header and (row number, record) pairs from a CSV/TSV/JSONL file."""
    lines = _decode_lines(path)
    delimiter = FORMATS[path.suffix]
    if delimiter is None:
        return _jsonl_records(path, lines)
    reader = csv.reader(io.StringIO("\n".join(lines)), delimiter=delimiter, strict=True)
    try:
        header = [name.strip() for name in next(reader)]
    except csv.Error as err:
        raise DataError(path, f"malformed header: {err}", row=1) from None
    if len(set(header)) != len(header):
        dup = next(name for name in header if header.count(name) > 1)
        raise DataError(path, "column appears twice in the header", row=1, column=dup)

    def records() -> Iterator[tuple[int, dict[str, object]]]:
        start = reader.line_num + 1  # first line of the record being read, for csv.Error
        try:
            for values in reader:
                row = reader.line_num
                start = row + 1
                if not values or all(not v.strip() for v in values):
                    continue
                if len(values) != len(header):
                    raise DataError(
                        path, f"expected {len(header)} fields, found {len(values)}", row=row
                    )
                yield row, dict(zip(header, values, strict=True))
        except csv.Error as err:
            raise DataError(
                path, f"malformed {path.suffix[1:].upper()}: {err}", row=start
            ) from None

    return header, records()


def _jsonl_records(
    path: Path, lines: list[str]
) -> tuple[list[str], Iterator[tuple[int, dict[str, object]]]]:
    parsed: list[tuple[int, dict[str, object]]] = []
    header: list[str] = []
    for row, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(
                path, f"invalid JSON at character {err.colno}: {err.msg}", row=row
            ) from None
        if not isinstance(record, dict):
            raise DataError(path, f"expected a JSON object, got {type(record).__name__}", row=row)
        for key in record:
            if key not in header:
                header.append(key)
        parsed.append((row, record))
    return header, iter(parsed)


def _require_columns(path: Path, header: Sequence[str], required: Sequence[str]) -> None:
    if not header:
        raise DataError(path, "file has no header or records")
    for name in required:
        if name not in header:
            raise DataError(
                path, f"missing required column (found: {', '.join(header)})", row=1, column=name
            )


def _text(path: Path, row: int, column: str, value: object, limit: int, warnings: list[str]) -> str:
    if value is None or isinstance(value, bool | dict | list):
        raise DataError(path, f"expected text, got {json.dumps(value)}", row=row, column=column)
    text = str(value).strip()
    if "\x00" in text:
        raise DataError(path, "contains a NUL character", row=row, column=column)
    if len(text) > limit:
        warnings.append(
            f"{path}, row {row}, column {column!r}: text of {len(text)} characters "
            f"truncated to {limit}"
        )
        text = text[:limit]
    return text


def _identifier(path: Path, row: int, column: str, value: object) -> str:
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, str | int):
        raise DataError(
            path, f"expected an identifier, got {json.dumps(value)}", row=row, column=column
        )
    text = str(value).strip()
    if not text:
        raise DataError(path, "empty identifier", row=row, column=column)
    if len(text) > MAX_ID_CHARS:
        raise DataError(
            path, f"identifier longer than {MAX_ID_CHARS} characters", row=row, column=column
        )
    return text


def _number(path: Path, row: int, column: str, value: object) -> float:
    if isinstance(value, bool) or value is None:
        raise DataError(path, f"expected a number, got {json.dumps(value)}", row=row, column=column)
    try:
        number = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise DataError(
            path, f"expected a number, got {str(value)!r}", row=row, column=column
        ) from None
    if not math.isfinite(number):
        raise DataError(
            path, f"expected a finite number, got {str(value)!r}", row=row, column=column
        )
    return number


def _timestamp(path: Path, row: int, column: str, value: object) -> float:
    """Unix seconds, or an ISO 8601 date/time string (naive times are read as UTC)."""
    if isinstance(value, str) and value.strip() and not _looks_numeric(value):
        try:
            moment = datetime.fromisoformat(value.strip())
        except ValueError:
            raise DataError(
                path,
                f"expected Unix seconds or an ISO 8601 time, got {value!r}",
                row=row,
                column=column,
            ) from None
        if moment.tzinfo is None:
            moment = moment.replace(tzinfo=UTC)
        return moment.timestamp()
    return _number(path, row, column, value)


def _looks_numeric(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def read_items(path: Path, warnings: list[str]) -> dict[str, str]:
    """Item id -> the item's text: its title, then each optional text column as ``name: value``."""
    header, records = _read_records(path)
    _require_columns(path, header, ITEM_COLUMNS)
    extra = [name for name in header if name not in ITEM_COLUMNS]
    texts: dict[str, str] = {}
    first_row: dict[str, int] = {}
    for row, record in records:
        item = _identifier(path, row, "item_id", record.get("item_id"))
        if item in texts:
            raise DataError(
                path,
                f"item {item!r} already defined at row {first_row[item]}",
                row=row,
                column="item_id",
            )
        title = _text(path, row, "title", record.get("title"), MAX_TEXT_CHARS, warnings)
        if not title:
            raise DataError(path, "empty title", row=row, column="title")
        parts = [title]
        for name in extra:
            value = record.get(name)
            if value is None or value == "":
                continue
            parts.append(f"{name}: {_text(path, row, name, value, MAX_TEXT_CHARS, warnings)}")
        texts[item] = ". ".join(parts)
        first_row[item] = row
    if not texts:
        raise DataError(path, "no item records")
    return texts


def read_platform(root: Path | str, name: str | None = None) -> PlatformData:
    """Read and validate the platform folder ``root``; raises :class:`DataError` on bad input."""
    root = Path(root)
    if not root.is_dir():
        raise DataError(root, "platform folder does not exist")
    warnings: list[str] = []
    item_text = read_items(find_file(root, ITEMS), warnings)
    path = find_file(root, INTERACTIONS)
    header, records = _read_records(path)
    _require_columns(path, header, INTERACTION_COLUMNS)
    has_rating, has_label = "rating" in header, "label" in header
    if has_rating == has_label:
        problem = "both 'rating' and 'label'" if has_rating else "neither 'rating' nor 'label'"
        raise DataError(path, f"need exactly one target column, found {problem}", row=1)
    target = "rating" if has_rating else "label"

    users: list[str] = []
    items: list[str] = []
    values: list[float] = []
    times: list[float] = []
    seen: dict[tuple[str, str, float], int] = {}
    for row, record in records:
        user = _identifier(path, row, "user_id", record.get("user_id"))
        item = _identifier(path, row, "item_id", record.get("item_id"))
        if item not in item_text:
            raise DataError(
                path, f"item {item!r} is not in {ITEMS} file", row=row, column="item_id"
            )
        value = _number(path, row, target, record.get(target))
        if target == "label" and value not in (0.0, 1.0):
            raise DataError(
                path, f"label must be 0 or 1, got {record.get(target)!r}", row=row, column="label"
            )
        moment = _timestamp(path, row, "timestamp", record.get("timestamp"))
        key = (user, item, moment)
        if key in seen:
            raise DataError(
                path,
                f"duplicate of row {seen[key]} (same user_id, item_id and timestamp)",
                row=row,
                column="timestamp",
            )
        seen[key] = row
        users.append(user)
        items.append(item)
        values.append(value)
        times.append(moment)
    if not users:
        raise DataError(path, "no interaction records")

    values_array = np.asarray(values, dtype=np.float64)
    return PlatformData(
        name=name or root.name,
        root=root,
        users=np.asarray(users, dtype=object),
        items=np.asarray(items, dtype=object),
        ratings=values_array if target == "rating" else np.full(len(values), np.nan),
        labels=values_array.astype(np.int8)
        if target == "label"
        else np.full(len(values), -1, np.int8),
        timestamps=np.asarray(times, dtype=np.float64),
        item_text=item_text,
        label_kind=target,
        warnings=warnings,
    )


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
    """Every platform under ``path`` (see :func:`platform_dirs`), validated."""
    return [read_platform(root) for root in platform_dirs(path)]


@dataclass(frozen=True)
class PlatformTables:
    """Rows to write for one platform, in the native format (see :func:`write_dataset`)."""

    name: str
    interactions: list[dict[str, object]]
    items: list[dict[str, object]]


def _write_tsv(path: Path, rows: list[dict[str, object]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as handle:
        writer = csv.DictWriter(
            handle, fieldnames=list(rows[0]), delimiter="\t", lineterminator="\n"
        )
        writer.writeheader()
        writer.writerows(rows)


def write_dataset(
    out: Path | str, platforms: Sequence[PlatformTables], force: bool = False
) -> Path:
    """Write platforms as TSV folders under ``out``, all or nothing.

    Everything goes to a temporary sibling folder that is renamed into place at the end, so an
    interrupted run never leaves a half-written dataset behind.
    """
    out = Path(out)
    for platform in platforms:
        if not platform.items or not platform.interactions:
            raise DataError(out / platform.name, "platform has no items or no interactions")
    if out.exists() and not force:
        raise DataError(out, "already exists (pass --force to replace it)")
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        for platform in platforms:
            folder = staging / platform.name
            folder.mkdir()
            _write_tsv(folder / f"{ITEMS}.tsv", platform.items)
            _write_tsv(folder / f"{INTERACTIONS}.tsv", platform.interactions)
        if out.exists():
            trash = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, trash / out.name)
            os.replace(staging, out)
            shutil.rmtree(trash)
        else:
            os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out
