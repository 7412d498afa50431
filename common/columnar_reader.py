"""The columnar reader: an interactions file of millions of rows parsed by pyarrow and checked
a column at a time.

Whatever pyarrow cannot parse goes to the row reader (``common/row_reader.py``), which names the
precise error; a bad value found here is named by running the row reader's own checks on its
record.
"""

from __future__ import annotations

import codecs
import csv
import functools
import math
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pa_csv
import pyarrow.json as pa_json

from common.errors import DataError
from common.platform_format import FORMATS
from common.row_reader import (
    _duplicate_error,
    _identifier,
    _interaction,
    _Interactions,
    _number,
    _records_at,
    _target_column,
    _timestamp,
)

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
    assert delimiter is not None  # _arrow_table sends only CSV and TSV here
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
    remap = np.array([-1 if name is None else code[name] for name in names], dtype=np.int64)
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
