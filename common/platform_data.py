"""One platform's data: read, validate and write the on-disk format.

A platform is a folder holding an interactions file and an items file, each as CSV, TSV or
JSON Lines (``interactions.csv|tsv|jsonl``, ``items.csv|tsv|jsonl``), and optionally a
``carried/`` subfolder in the same format: what its users brought from other platforms (their
own histories there, item texts included), which ``model.carried_history`` reads. Every
problem found is raised as a :class:`DataError` naming the file, row and column, because a
platform operator must be able to fix their export without reading our code.

Interactions files reach millions of rows, so they are parsed by pyarrow and checked a column
at a time; items files, and any file pyarrow cannot parse, are read record by record with
csv/json, which also stays the reference for which row and column an error names.
"""

from __future__ import annotations

import codecs
import csv
import functools
import itertools
import json
import math
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Concatenate, ParamSpec, TypeVar

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json

from common.errors import DataError

if TYPE_CHECKING:
    from common.config import DataConfig

FORMATS = {".csv": ",", ".tsv": "\t", ".jsonl": None}
INTERACTIONS = "interactions"
ITEMS = "items"
CARRIED = "carried"  # a platform's subfolder: its users' histories from other platforms
INTERACTION_COLUMNS = ("user_id", "item_id", "timestamp")
ITEM_COLUMNS = ("item_id", "title")
MAX_TEXT_CHARS = 1000
MAX_ID_CHARS = 256
_MAX_FIELD_CHARS = 2**31 - 1  # csv's own limit (128 KiB by default) would reject long text

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


# ------------------------------------------------------------------ the row reader
# Every items file, and any interactions file the columnar reader below cannot take, is read
# record by record. It is also the reference for row numbers: the columnar reader asks it for
# the records it found a problem in, so both report the same row and column.


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
    lines = (line + "\n" for line in _lines(path))
    reader = csv.reader(lines, delimiter=FORMATS[path.suffix], strict=True)
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


# ------------------------------------------------------------------ the columnar reader
# Whatever pyarrow cannot parse goes to the row reader, which names the precise error; a bad
# value found here is named by running the row reader's own checks on its record.

# Value forms that pyarrow converts exactly as float() and datetime.fromisoformat() do; other
# values are converted once per distinct value by those functions. Years stay within 1700-2199
# so that microseconds / 1e6 rounds like datetime.timestamp() (both exact below 2**53).
_NUMBER = r"^[ \t\n\r\f\v]*[+-]?(?:\d+\.?\d*|\.\d+)(?:[eE][+-]?\d+)?[ \t\n\r\f\v]*$"
_DATE = r"(?:1[7-9]|2[01])\d\d-\d\d-\d\d"
_CLOCK = r"[T ](?:[01]\d|2[0-3])(?::[0-5]\d(?::[0-5]\d(?:\.\d{1,6})?)?)?"
_NUMBER_FORMS = {_NUMBER: pa.float64()}
_TIME_FORMS = {
    **_NUMBER_FORMS,
    f"^{_DATE}(?:{_CLOCK})?$": pa.timestamp("us"),
    rf"^{_DATE}{_CLOCK}(?:Z|[+-](?:[01]\d|2[0-3]):[0-5]\d)$": pa.timestamp("us", tz="UTC"),
}
_CHUNK_BYTES = 1 << 26
_MIX_USER, _MIX_ITEM = np.uint64(0x9E3779B97F4A7C15), np.uint64(0xC2B2AE3D27D4EB4F)


def _columnar_interactions(path: Path, item_text: dict[str, str]) -> _Interactions | None:
    """The interactions file checked a column at a time, or None to leave it to the row reader."""
    table = _arrow_table(path)
    if table is None:
        return None
    target = _target_column(path, table.column_names)
    if not _exact_types(table, target):
        return None
    users, user_ids = _identifier_codes(path, "user_id", table["user_id"])
    items, item_ids = _identifier_codes(path, "item_id", table["item_id"])
    values = _floats(table[target], functools.partial(_number, path, 0, target), _NUMBER_FORMS)
    times = _floats(
        table["timestamp"], functools.partial(_timestamp, path, 0, "timestamp"), _TIME_FORMS
    )
    del table
    pa.default_memory_pool().release_unused()  # or mimalloc keeps the text's pages
    # Code -1 (an invalid id, already bad) reads the False appended last.
    known = np.array([*(item in item_text for item in item_ids), False], dtype=bool)
    bad = (users < 0) | ~known[items] | ~np.isfinite(values) | ~np.isfinite(times)
    if target == "label":
        bad |= (values != 0) & (values != 1)
    flagged = _first_problem(bad, users, items, times)
    if flagged is None:
        return _Interactions(target, user_ids[users], item_ids[items], values, times)
    _raise_flagged(path, flagged, target, item_text)
    return None


def _first_problem(
    bad: np.ndarray, users: np.ndarray, items: np.ndarray, times: np.ndarray
) -> tuple[int, ...] | None:
    """The records holding the file's first problem, as the row reader meets them:
    ``(index,)`` for a bad value, ``(first index, index)`` for a duplicate; None if none."""
    first_bad = int(np.argmax(bad)) if bad.any() else len(bad)
    duplicate = _first_duplicate(users, items, times)
    if duplicate is not None and duplicate[1] < first_bad:
        return duplicate
    return (first_bad,) if first_bad < len(bad) else None


def _raise_flagged(
    path: Path, indices: Sequence[int], target: str, item_text: dict[str, str]
) -> None:
    """Raise the row reader's error for a flagged record, ``(index,)``, or for a duplicate,
    ``(first index, index)``. Returns only where csv/json split the file into records
    differently from pyarrow; the row reader then has the last word."""
    records = _records_at(path, indices)
    keys = []
    for row, record in records:
        user, item, _, moment = _interaction(path, row, record, target, item_text)
        keys.append((user, item, moment))
    if len(keys) == 2 and keys[0] == keys[1]:
        raise _duplicate_error(path, records[1][0], records[0][0])


def _arrow_table(path: Path) -> pa.Table | None:
    """The file's records as an Arrow table; None for a file pyarrow cannot parse (ragged
    rows, bad quoting or UTF-8, mixed JSON types...) or that has no records."""
    try:
        table = _arrow_csv(path) if FORMATS[path.suffix] else _arrow_jsonl(path)
    except pa.ArrowInvalid:
        return None
    return table if table is not None and table.num_rows else None


def _arrow_csv(path: Path) -> pa.Table | None:
    """Every column as text, as csv reads it, less the all-blank rows csv's reader skips.

    One difference stays: text after a closing quote (``"ab"c``) is read as ``abc``, where
    csv's strict mode rejects the row.
    """
    with path.open("rb") as handle:
        first = handle.readline()
    delimiter = FORMATS[path.suffix]
    try:
        header = next(csv.reader([first.decode("utf-8-sig")], delimiter=delimiter))
    except (UnicodeDecodeError, csv.Error, StopIteration):
        return None
    names = [name.strip() for name in header]
    if not names or not all(names) or len(set(names)) != len(names):
        return None  # the row reader names the header's problem, after any encoding error
    table = pa_csv.read_csv(
        path,
        read_options=pa_csv.ReadOptions(column_names=names, skip_rows=1),
        parse_options=pa_csv.ParseOptions(delimiter=delimiter, newlines_in_values=True),
        convert_options=pa_csv.ConvertOptions(column_types=dict.fromkeys(names, pa.string())),
    )
    blank = None
    for column in table.columns:
        empty = pc.equal(pc.utf8_length(pc.utf8_trim_whitespace(column)), 0)
        blank = empty if blank is None else pc.and_(blank, empty)
        if not pc.any(blank).as_py():
            return table
    return table.filter(pc.invert(blank))


def _arrow_jsonl(path: Path) -> pa.Table | None:
    lines = _object_lines(path)
    if lines is None:
        return None
    try:  # block by block, in half the memory of reading the whole file at once
        table = pa_json.open_json(path).read_all()
    except pa.ArrowInvalid:  # a type or key that first appears after the first block
        table = pa_json.read_json(path)
    return table if table.num_rows == lines else None


def _object_lines(path: Path) -> int | None:
    """How many non-empty lines the file has, if each is one ``{...}`` and all is UTF-8.

    pyarrow's JSON reader also takes an object spread over lines or two sharing one, and does
    not check UTF-8, where the row reader runs json.loads on each line of decoded text.
    """
    count = 0
    with path.open("rb") as handle:
        head = handle.read(len(codecs.BOM_UTF8))
        handle.seek(len(head) if head == codecs.BOM_UTF8 else 0)
        # Chunks of whole lines, so that each decodes alone and holds its lines' both ends.
        while chunk := handle.read(_CHUNK_BYTES) + handle.readline():
            try:
                chunk.decode("utf-8")
            except UnicodeDecodeError:
                return None
            data = np.frombuffer(chunk, dtype=np.uint8)
            ends = np.flatnonzero(data == ord("\n"))
            ends = np.append(ends, data.size) if data[-1] != ord("\n") else ends
            starts = np.concatenate([[0], ends[:-1] + 1])
            ends -= (ends > starts) & (data[np.maximum(ends - 1, 0)] == ord("\r"))
            filled = ends > starts
            whole = (data[starts[filled]] == ord("{")) & (data[ends[filled] - 1] == ord("}"))
            if not whole.all():
                return None
            count += int(filled.sum())
    return count


def _exact_types(table: pa.Table, target: str) -> bool:
    """Whether the columns checked hold what these checks read exactly as the row reader does:
    text, integers or doubles (or a time JSON inference made of ISO strings, for timestamps).
    Doubles as ids must stay below 2**53: json.loads may have read an integer that Arrow
    rounded, and would name it by all its digits."""
    for name in ("user_id", "item_id", target, "timestamp"):
        kind = table[name].type
        exact = pa.types.is_string(kind) or kind in (pa.int64(), pa.float64())
        if not (exact or (name == "timestamp" and pa.types.is_timestamp(kind))):
            return False
        if name.endswith("_id") and kind == pa.float64():
            largest = pc.max(pc.abs(table[name])).as_py()
            if largest is not None and largest >= 2**53:
                return False
    return True


def _identifier_codes(
    path: Path, column: str, values: pa.ChunkedArray
) -> tuple[np.ndarray, np.ndarray]:
    """Per row, the code of its id in the returned ids (-1 where the id is invalid); each
    distinct value is checked once by the row reader's :func:`_identifier`."""
    distinct = pc.unique(values)
    names: list[str | None] = []
    for value in distinct.to_pylist():
        try:
            names.append(_identifier(path, 0, column, value))
        except DataError:
            names.append(None)
    ids = list(dict.fromkeys(name for name in names if name is not None))
    code = {name: index for index, name in enumerate(ids)}
    remap = np.array([code.get(name, -1) for name in names], dtype=np.int64)
    positions = pc.index_in(values, value_set=distinct).to_numpy()
    return remap[positions], np.asarray(ids, dtype=object)


def _floats(
    values: pa.ChunkedArray, parse: Callable[[object], float], forms: dict[str, pa.DataType]
) -> np.ndarray:
    """Per row, the number (Unix seconds for times) ``parse`` reads, NaN where it fails."""
    if pa.types.is_timestamp(values.type):
        values = values.cast(pa.int64())
    if not pa.types.is_string(values.type):
        return values.to_numpy().astype(np.float64)  # nulls become NaN
    result = np.empty(len(values))
    at = 0
    for chunk in values.chunks:  # a block at a time, so the copies of text stay small
        result[at : at + len(chunk)] = _text_floats(chunk, parse, forms)
        at += len(chunk)
    return result


def _text_floats(
    values: pa.Array, parse: Callable[[object], float], forms: dict[str, pa.DataType]
) -> np.ndarray:
    result = np.full(len(values), np.nan)
    todo = np.ones(len(values), dtype=bool)
    for pattern, kind in forms.items():
        matches = pc.fill_null(pc.match_substring_regex(values, pattern), False)
        form = matches.to_numpy(zero_copy_only=False)
        converted = _converted(pc.if_else(matches, values, None), kind) if form.any() else None
        if converted is not None:
            result[form] = converted[form]
            todo &= ~form
    if todo.any():
        rest = pc.filter(values, pa.array(todo))
        distinct = pc.unique(rest)
        parsed = np.array([_or_nan(parse, value) for value in distinct.to_pylist()])
        positions = pc.index_in(rest, value_set=distinct).to_numpy(zero_copy_only=False)
        result[todo] = parsed[positions]
    return result


def _converted(values: pa.Array, kind: pa.DataType) -> np.ndarray | None:
    """The values as float numbers or seconds; None if pyarrow refuses one (30 February)."""
    try:
        cast = pc.cast(pc.ascii_trim_whitespace(values), kind)
    except pa.ArrowInvalid:
        return None
    if kind == pa.float64():
        return cast.to_numpy(zero_copy_only=False)
    return cast.cast(pa.int64()).to_numpy(zero_copy_only=False) / 1e6


def _or_nan(parse: Callable[[object], float], value: object) -> float:
    try:
        return parse(value)
    except DataError:
        return math.nan


def _first_duplicate(
    users: np.ndarray, items: np.ndarray, times: np.ndarray
) -> tuple[int, int] | None:
    """(first row index, duplicate row index) of the earliest row repeating an earlier row's
    user, item and time, or None.

    One sort of a 64-bit hash of each key rules out almost every row; only rows whose hash
    repeats are compared exactly, by a stable sort that keeps file order among equal keys.
    """
    bits = (times + 0.0).view(np.uint64)  # + 0.0 turns -0.0 (equal to 0.0) into 0.0
    key = users.astype(np.uint64) * _MIX_USER ^ items.astype(np.uint64) * _MIX_ITEM ^ bits
    ordered = np.sort(key)
    repeated = ordered[1:][ordered[1:] == ordered[:-1]]
    if not repeated.size:
        return None
    rows = np.flatnonzero(np.isin(key, repeated))
    order = rows[np.lexsort((times[rows], items[rows], users[rows]))]
    users, items, times = users[order], items[order], times[order]
    repeat = np.zeros(len(order), dtype=bool)
    repeat[1:] = (users[1:] == users[:-1]) & (items[1:] == items[:-1]) & (times[1:] == times[:-1])
    if not repeat.any():
        return None
    run_start = np.maximum.accumulate(np.where(repeat, 0, np.arange(len(order))))
    position = np.flatnonzero(repeat)[np.argmin(order[repeat])]
    return int(order[run_start[position]]), int(order[position])


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


@dataclass(frozen=True)
class PlatformTables:
    """Rows to write for one platform, in the native format (see :func:`write_dataset`)."""

    name: str
    interactions: list[dict[str, object]]
    items: list[dict[str, object]]
    carried: PlatformTables | None = None  # written to the platform's CARRIED/ subfolder


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
            if platform.carried is not None and platform.carried.interactions:
                (folder / CARRIED).mkdir()
                _write_tsv(folder / CARRIED / f"{ITEMS}.tsv", platform.carried.items)
                _write_tsv(folder / CARRIED / f"{INTERACTIONS}.tsv", platform.carried.interactions)
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
