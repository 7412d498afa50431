"""The row reader: a platform file read record by record with csv/json, and checked.

Every items file, and any interactions file the columnar reader (``common/columnar_reader.py``)
cannot take, is read here. It is also the reference for row numbers: the columnar reader asks it
for the records it found a problem in, so both report the same row and column.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

import numpy as np

from common.errors import DataError
from common.platform_format import (
    FORMATS,
    INTERACTION_COLUMNS,
    ITEM_COLUMNS,
    ITEMS,
    MAX_ID_CHARS,
    MAX_TEXT_CHARS,
)

_MAX_FIELD_CHARS = 2**31 - 1  # csv's own limit (128 KiB by default) would reject long text


def _check_text(path: Path) -> None:
    """An empty file or a non-UTF-8 byte (with its row and byte column) is reported before
    anything else, since a wrong encoding explains whatever else looks broken."""
    empty = True
    with path.open("rb") as handle:
        for number, line in enumerate(handle, start=1):
            empty = empty and not line.strip()
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(
                    path,
                    f"byte {err.start + 1} is not valid UTF-8 (0x{line[err.start]:02x})",
                    row=number,
                ) from None
    if empty:
        raise DataError(path, "file is empty")


def _lines(path: Path) -> Iterator[str]:
    """The lines of a checked file, streamed, without their line ends.

    Only \\n (or \\r\\n) ends a line: str.splitlines() would also split inside a value at \\f,
    \\x85 or U+2028, which are valid in JSON strings and quoted CSV fields.
    """
    with path.open("rb") as handle:
        for number, raw in enumerate(handle):
            line = raw.decode("utf-8").removesuffix("\n").removesuffix("\r")
            yield line.removeprefix("\ufeff") if number == 0 else line


def _read_records(path: Path) -> tuple[list[str], Iterator[tuple[int, dict[str, object]]]]:
    """Header and (row number, record) pairs from a CSV/TSV/JSONL file."""
    _check_text(path)
    if FORMATS[path.suffix] is not None:
        return _csv_records(path)
    # A JSONL header is every key in order of first use, so the file is parsed twice: once for
    # the keys (raising any syntax error first, as a header problem would), once for records.
    header = list(dict.fromkeys(key for _, record in _jsonl_records(path) for key in record))
    return header, _jsonl_records(path)


def _csv_records(path: Path) -> tuple[list[str], Iterator[tuple[int, dict[str, object]]]]:
    # Long text is truncated with a warning (see _text), so csv must not reject it first.
    csv.field_size_limit(_MAX_FIELD_CHARS)
    delimiter = FORMATS[path.suffix]
    assert delimiter is not None  # _read_records sends only CSV and TSV here
    lines = (line + "\n" for line in _lines(path))
    reader = csv.reader(lines, delimiter=delimiter, strict=True)
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


def _jsonl_records(path: Path) -> Iterator[tuple[int, dict[str, object]]]:
    for row, line in enumerate(_lines(path), start=1):
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
        yield row, record


def _records_at(path: Path, indices: Sequence[int]) -> list[tuple[int, dict[str, object]]]:
    """The row reader's (row, record) at the given record positions, in their order."""
    records = _jsonl_records(path) if FORMATS[path.suffix] is None else _csv_records(path)[1]
    wanted = set(indices)
    found = {
        index: pair
        for index, pair in enumerate(itertools.islice(records, max(indices) + 1))
        if index in wanted
    }
    return [found[index] for index in indices]


def _require_columns(path: Path, header: Sequence[str], required: Sequence[str]) -> None:
    if not header:
        raise DataError(path, "file has no header or records")
    for name in required:
        if name not in header:
            raise DataError(
                path, f"missing required column (found: {', '.join(header)})", row=1, column=name
            )


def _target_column(path: Path, header: Sequence[str]) -> str:
    """``rating`` or ``label``, after checking the interactions header."""
    _require_columns(path, header, INTERACTION_COLUMNS)
    has_rating, has_label = "rating" in header, "label" in header
    if has_rating == has_label:
        problem = "both 'rating' and 'label'" if has_rating else "neither 'rating' nor 'label'"
        raise DataError(path, f"need exactly one target column, found {problem}", row=1)
    return "rating" if has_rating else "label"


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


@dataclass(frozen=True)
class _Interactions:
    """A checked interactions file as parallel arrays (see :class:`PlatformData`)."""

    target: str  # "rating" or "label"
    users: np.ndarray
    items: np.ndarray
    values: np.ndarray
    times: np.ndarray


def _interaction(
    path: Path, row: int, record: dict[str, object], target: str, item_text: dict[str, str]
) -> tuple[str, str, float, float]:
    """One record's user, item, target value and time, checked in the order errors are named."""
    user = _identifier(path, row, "user_id", record.get("user_id"))
    item = _identifier(path, row, "item_id", record.get("item_id"))
    if item not in item_text:
        raise DataError(path, f"item {item!r} is not in {ITEMS} file", row=row, column="item_id")
    value = _number(path, row, target, record.get(target))
    if target == "label" and value not in (0.0, 1.0):
        raise DataError(
            path, f"label must be 0 or 1, got {record.get(target)!r}", row=row, column="label"
        )
    return user, item, value, _timestamp(path, row, "timestamp", record.get("timestamp"))


def _duplicate_error(path: Path, row: int, first_row: int) -> DataError:
    return DataError(
        path,
        f"duplicate of row {first_row} (same user_id, item_id and timestamp)",
        row=row,
        column="timestamp",
    )


def _row_interactions(path: Path, item_text: dict[str, str]) -> _Interactions:
    header, records = _read_records(path)
    target = _target_column(path, header)
    users: list[str] = []
    items: list[str] = []
    values: list[float] = []
    times: list[float] = []
    seen: dict[tuple[str, str, float], int] = {}
    for row, record in records:
        user, item, value, moment = _interaction(path, row, record, target, item_text)
        if (user, item, moment) in seen:
            raise _duplicate_error(path, row, seen[user, item, moment])
        seen[user, item, moment] = row
        users.append(user)
        items.append(item)
        values.append(value)
        times.append(moment)
    return _Interactions(
        target,
        np.asarray(users, dtype=object),
        np.asarray(items, dtype=object),
        np.asarray(values, dtype=np.float64),
        np.asarray(times, dtype=np.float64),
    )
