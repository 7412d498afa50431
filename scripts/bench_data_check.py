"""Time and peak memory of ``fedfuse data check`` on one large synthetic platform.

Usage: python scripts/bench_data_check.py [--rows 1000000,3000000,10000000]
       [--formats csv,jsonl] [--max-seconds 60] [--max-rss-gib 2] [--timeout 600]

For each format and size: a platform of that many interactions (user and item ids, an integer
rating, unique Unix-second timestamps; one user per 40 interactions, one item per 500) is
written to a temporary folder, then two subprocesses run on it in turn: ``read_dataset`` alone
(the reading and validation that ``fedfuse data check`` does) and the whole
``fedfuse data check`` (which also counts every split to print its summary). Each
is measured by the wall clock and by its own peak RSS (``os.wait4``). The folder is deleted
before the next size. Prints a Markdown table, then PASS/FAIL against the targets for the
largest size: the check within ``--max-seconds`` and ``--max-rss-gib``.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

REPO = Path(__file__).resolve().parents[1]
CHUNK_ROWS = 1_000_000
MIB = 1024**2
STAGES = {
    "read_dataset": [
        "-c",
        "import sys; from common.platform_data import read_dataset; read_dataset(sys.argv[1])",
    ],
    "fedfuse data check": ["-m", "server.cli", "data", "check"],
}


@dataclass(frozen=True)
class Measure:
    seconds: float
    peak_rss_mib: float
    exit_code: int


def _write_lines(handle, lines: pa.Array) -> None:
    """Write an Arrow string array whose values already end in newlines: its data buffer is
    exactly the file's bytes, so nothing is copied into Python strings."""
    offsets = np.frombuffer(lines.buffers()[1], dtype=np.int32)
    start, end = offsets[lines.offset], offsets[lines.offset + len(lines)]
    handle.write(memoryview(lines.buffers()[2])[start:end])


def _ids(prefix: str, codes: np.ndarray) -> pa.Array:
    return pc.binary_join_element_wise(prefix, pc.cast(pa.array(codes), pa.string()), "")


def _record_lines(fmt: str, columns: dict[str, pa.Array], quoted: set[str]) -> pa.Array:
    """One CSV or JSONL line per row, built column-wise by pyarrow."""
    if fmt == "csv":
        return pc.binary_join_element_wise(
            pc.binary_join_element_wise(*columns.values(), ","), "\n", ""
        )
    parts: list[pa.Array | str] = ["{"]
    for index, (name, values) in enumerate(columns.items()):
        quote = '"' if name in quoted else ""
        parts += [f'{", " if index else ""}"{name}": {quote}', values, quote]
    return pc.binary_join_element_wise(*parts, "}\n", "")


def write_platform(folder: Path, fmt: str, rows: int, seed: int = 0) -> int:
    """Write items and interactions files; returns the folder's size in bytes."""
    rng = np.random.default_rng(seed)
    users, items = max(rows // 40, 1), max(rows // 500, 1000)
    folder.mkdir(parents=True)
    with (folder / f"items.{fmt}").open("wb") as handle:
        if fmt == "csv":
            handle.write(b"item_id,title\n")
        codes = np.arange(items)
        columns = {"item_id": _ids("i", codes), "title": _ids("Item ", codes)}
        _write_lines(handle, _record_lines(fmt, columns, {"item_id", "title"}))
    times = 1_600_000_000 + rng.permutation(rows)  # unique: no duplicate rows
    with (folder / f"interactions.{fmt}").open("wb") as handle:
        if fmt == "csv":
            handle.write(b"user_id,item_id,rating,timestamp\n")
        for start in range(0, rows, CHUNK_ROWS):
            size = min(CHUNK_ROWS, rows - start)
            columns = {
                "user_id": _ids("u", rng.integers(0, users, size)),
                "item_id": _ids("i", rng.integers(0, items, size)),
                "rating": pc.cast(pa.array(rng.integers(1, 6, size)), pa.string()),
                "timestamp": pc.cast(pa.array(times[start : start + size]), pa.string()),
            }
            _write_lines(handle, _record_lines(fmt, columns, {"user_id", "item_id"}))
    return sum(path.stat().st_size for path in folder.iterdir())


def measure(args: list[str], timeout: float) -> Measure:
    """Run ``python ARGS`` from the repository; wall seconds and this child's own peak RSS."""
    start = time.perf_counter()
    process = subprocess.Popen(
        [sys.executable, *args], cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
    )
    timer = threading.Timer(timeout, process.kill)
    timer.start()
    # wait4 rather than RUSAGE_CHILDREN, whose maximum spans every child reaped so far.
    _, status, usage = os.wait4(process.pid, 0)
    seconds = time.perf_counter() - start
    timer.cancel()
    process.returncode = os.waitstatus_to_exitcode(status)
    error = process.stderr.read().decode() if process.stderr else ""
    if process.returncode != 0:
        print(f"  exit {process.returncode}: {error.strip()[-500:]}", file=sys.stderr)
    return Measure(seconds, usage.ru_maxrss / 1024, process.returncode)  # ru_maxrss is KiB


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default="1000000,3000000,10000000")
    parser.add_argument("--formats", default="csv,jsonl")
    parser.add_argument("--max-seconds", type=float, default=60.0)
    parser.add_argument("--max-rss-gib", type=float, default=2.0)
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds per subprocess")
    args = parser.parse_args()
    sizes = sorted(int(n) for n in args.rows.split(","))

    print(
        f"{os.cpu_count()} CPUs; target at {sizes[-1]:,} rows: fedfuse data check within "
        f"{args.max_seconds:g} s and {args.max_rss_gib:g} GiB peak RSS\n"
    )
    print("| format | rows | files MiB | stage | wall s | peak RSS MiB | exit |")
    print("|---|---|---|---|---|---|---|")
    verdicts = []
    with tempfile.TemporaryDirectory(prefix="bench_data_check.") as tmp:
        for fmt in args.formats.split(","):
            for rows in sizes:
                folder = Path(tmp) / f"{fmt}_{rows}"
                size = write_platform(folder, fmt, rows)
                for stage, command in STAGES.items():
                    got = measure([*command, str(folder)], args.timeout)
                    print(
                        f"| {fmt} | {rows:,} | {size / MIB:.0f} | {stage} | {got.seconds:.1f} "
                        f"| {got.peak_rss_mib:.0f} | {got.exit_code} |",
                        flush=True,
                    )
                    if rows == sizes[-1] and stage == "fedfuse data check":
                        passed = (
                            got.exit_code == 0
                            and got.seconds <= args.max_seconds
                            and got.peak_rss_mib <= args.max_rss_gib * 1024
                        )
                        verdicts.append(
                            f"{'PASS' if passed else 'FAIL'}: {fmt}, {rows:,} rows: "
                            f"{got.seconds:.1f} s, {got.peak_rss_mib / 1024:.2f} GiB, "
                            f"exit {got.exit_code}"
                        )
                shutil.rmtree(folder)
    print("\n" + "\n".join(verdicts))
    return 0 if all(v.startswith("PASS") for v in verdicts) else 1


if __name__ == "__main__":
    sys.exit(main())
