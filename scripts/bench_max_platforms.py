"""How many simulated platforms one ``fedfuse simulate`` round fits in a memory limit.

Usage: python scripts/bench_max_platforms.py [--limit-gib 24] [--counts 5,10,20,50,100,200]
       [--backbone default] [--cpus-per-client 1] [--max-seconds 540]

For each N: a synthetic federation of N platforms (``fedfuse data prepare --dataset synthetic``,
small platforms), then one DP round of ``fedfuse simulate`` (1 local step, σ fixed at 1, no
client-side evaluation), while a sampler sums the memory of every process of that run twice a
second: RSS (counts shared pages once per process, so it overstates) and PSS (shares them
out, so the sum is what the run really occupies). Processes are found by a tag in their
environment, which Ray's workers inherit. N grows until the next N would pass the limit
(extrapolated linearly from the last two counts), the machine's available memory, or the time
budget. Printed per N:
peak total and its split into the driver (ServerApp + Flower), ClientApp actors and Ray's own
processes, the number of actors, and memory per platform.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]
TAG = "FEDFUSE_BENCH_TAG"
GIB = 1024**3


def _role(cmdline: list[str]) -> str:
    text = " ".join(cmdline)
    if "ClientAppActor" in text:
        return "actors"
    if "fedfuse" in text and "simulate" in text:
        return "driver"
    return "ray"


class MemorySampler(threading.Thread):
    """Peak summed RSS/PSS of the tagged processes, and the split at the PSS peak."""

    def __init__(self, tag: str) -> None:
        super().__init__(daemon=True)
        self.tag = tag
        self.stop = threading.Event()
        self.peak_rss = self.peak_pss = 0
        self.split: dict[str, int] = {}
        self.max_actors = 0

    def sample(self) -> None:
        rss = pss = actors = 0
        split: dict[str, int] = {}
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if proc.environ().get(TAG) != self.tag:
                    continue
                info = proc.memory_full_info()
            except psutil.Error:
                continue
            role = _role(proc.info["cmdline"] or [])
            rss, pss = rss + info.rss, pss + info.pss
            split[role] = split.get(role, 0) + info.pss
            actors += role == "actors"
        self.peak_rss = max(self.peak_rss, rss)
        self.max_actors = max(self.max_actors, actors)
        if pss > self.peak_pss:
            self.peak_pss, self.split = pss, split

    def run(self) -> None:
        while not self.stop.wait(0.5):
            self.sample()


def _fedfuse(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    command = [str(Path(sys.executable).parent / "fedfuse"), *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)


def measure(count: int, root: Path, args: argparse.Namespace) -> dict:
    """One round with ``count`` platforms; its peak memory and wall time."""
    data = root / f"data-{count}"
    prepared = _fedfuse(
        "data", "prepare", "--dataset", "synthetic", "--platforms", str(count),
        "--users", "20", "--items", "30", "--out", str(data), "--force",
    )  # fmt: skip
    if prepared.returncode:
        sys.exit(prepared.stderr)
    settings = [
        f"data.path='{data}'",
        f"model.backbone='{args.backbone}'",
        "model.max_length=32",
        "train.batch_size=16",
        "train.local_steps=1",
        "dp.expected_batch_size=16",
        "dp.delta=1e-4",
        # fixed σ: calibrating it costs each platform seconds of CPU and no memory, so it
        # would only cap the N this benchmark reaches in its time budget
        "dp.noise_multiplier=1.0",
        "federation.rounds=1",
        "federation.fraction_evaluate=0.0",
        f"federation.min_nodes={count}",
    ]
    tag = uuid.uuid4().hex
    env = dict(os.environ, HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false", **{TAG: tag})
    sampler = MemorySampler(tag)
    sampler.start()
    started = time.perf_counter()
    command = ["simulate", "--runs", str(root / "runs"), "--name", f"n{count}"]
    command += ["--cpus-per-client", str(args.cpus_per_client)]
    for setting in settings:
        command += ["--set", setting]
    result = _fedfuse(*command, env=env)
    wall = time.perf_counter() - started
    sampler.stop.set()
    sampler.join()
    if result.returncode:
        sys.exit(f"N={count} failed:\n{result.stdout[-3000:]}{result.stderr[-3000:]}")
    return {
        "count": count,
        "wall": wall,
        "rss": sampler.peak_rss,
        "pss": sampler.peak_pss,
        "split": sampler.split,
        "actors": sampler.max_actors,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--limit-gib", type=float, default=24.0)
    parser.add_argument("--counts", default="5,10,20,50,100,200,500")
    parser.add_argument("--backbone", default="default")
    parser.add_argument("--cpus-per-client", type=int, default=1)
    parser.add_argument("--max-seconds", type=float, default=540)
    args = parser.parse_args()
    counts = [int(c) for c in args.counts.split(",")]
    root = Path(tempfile.mkdtemp(prefix="fedfuse-bench-platforms-"))
    print(
        f"backbone {args.backbone}, 1 DP round (1 local step), {args.cpus_per_client} CPU per "
        f"actor on {os.cpu_count()} CPUs, limit {args.limit_gib} GiB"
    )
    print(
        "| platforms | wall s | peak PSS GiB | peak RSS sum GiB | driver | actors | Ray | actors |"
    )
    print("|---|---|---|---|---|---|---|---|")
    results: list[dict] = []
    budget_end = time.perf_counter() + args.max_seconds
    stop_reason = "all counts done"
    for count in counts:
        if len(results) >= 2:
            (a, b) = results[-2:]
            slope = (b["pss"] - a["pss"]) / (b["count"] - a["count"])
            projected = b["pss"] + slope * (count - b["count"])
            if projected > args.limit_gib * GIB:
                stop_reason = f"N={count} projected {projected / GIB:.1f} GiB > limit"
                break
            if projected > b["pss"] + psutil.virtual_memory().available:
                stop_reason = f"N={count} projected {projected / GIB:.1f} GiB > machine's free"
                break
        if results:
            last = results[-1]
            if time.perf_counter() + last["wall"] * count / last["count"] > budget_end:
                stop_reason = f"N={count} would pass --max-seconds"
                break
        r = measure(count, root, args)
        results.append(r)
        split = {k: r["split"].get(k, 0) / GIB for k in ("driver", "actors", "ray")}
        print(
            f"| {count} | {r['wall']:.0f} | {r['pss'] / GIB:.2f} | {r['rss'] / GIB:.2f} | "
            f"{split['driver']:.2f} | {split['actors']:.2f} | {split['ray']:.2f} | "
            f"{r['actors']} |",
            flush=True,
        )
    print(f"stopped: {stop_reason}")
    if len(results) >= 2:
        a, b = results[0], results[-1]
        per = (b["pss"] - a["pss"]) / (b["count"] - a["count"])
        print(
            f"memory per extra platform (PSS, N={a['count']}..{b['count']}): "
            f"{per / 2**20:.1f} MiB; fixed part ~{(a['pss'] - per * a['count']) / GIB:.2f} GiB"
        )
        if per > 0:
            fit = int((args.limit_gib * GIB - a["pss"]) / per) + a["count"]
            print(f"largest N within {args.limit_gib} GiB by that slope: ~{fit}")
    print(f"scratch: {root}")


if __name__ == "__main__":
    main()
