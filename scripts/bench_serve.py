"""Latency and throughput of ``fedfuse serve``, and how ranking time grows with the catalogue.

Usage: python scripts/bench_serve.py [--run runs/ml100k-default] [--platform comedy]
       [--requests 300] [--load-requests 2000] [--concurrency 8] [--sizes 10000,100000]

1. ``fedfuse serve`` runs in its own process on the finished run; a top-10 ``POST
   /api/recommend`` for users drawn at random from the platform (so histories vary) is timed
   end to end from this process over HTTP keep-alive: ``--requests`` one at a time (p50, p99),
   then ``--load-requests`` from ``--concurrency`` threads (requests/s, and every answer that
   is not a 200 with k items counts as an error). The service is stopped before step 2.
2. In this process, the same ranking (``Recommender.recommend``) is timed on the platform's
   real catalogue and on synthetic catalogues of ``--sizes`` items: random item vectors and
   priors drawn around the real ones replace the featurizer's, so every request scores the
   whole catalogue as the service would.

Prints Markdown tables, then PASS/FAIL against the targets: p99 ≤ ``--max-p99-ms`` at
concurrency 1 and no errors under load.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import numpy as np
import torch

from server.serving.recommender import Recommender
from server.serving.service_process import running_service

REPO = Path(__file__).resolve().parents[1]
K = 10


def _percentiles(seconds: list[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds."""
    p50, p99 = np.percentile(np.asarray(seconds) * 1000, [50, 99])
    return float(p50), float(p99)


def _timed_request(client: httpx.Client, user: str) -> tuple[float, bool]:
    """Seconds for one top-K request, and whether it answered K items."""
    start = time.perf_counter()
    try:
        response = client.post("/api/recommend", json={"user": user, "k": K})
        ok = response.status_code == 200 and len(response.json()["recommendations"]) == K
    except httpx.HTTPError:
        ok = False
    return time.perf_counter() - start, ok


def bench_http(url: str, users: list[str], concurrency: int) -> tuple[list[float], int, float]:
    """Latencies and error count of ``users`` requests from ``concurrency`` threads, and the
    wall seconds of them all."""
    chunks = [users[i::concurrency] for i in range(concurrency)]

    def worker(chunk: list[str]) -> list[tuple[float, bool]]:
        with httpx.Client(base_url=url, timeout=30) as client:
            return [_timed_request(client, user) for user in chunk]

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = [r for part in pool.map(worker, chunks) for r in part]
    wall = time.perf_counter() - start
    return [s for s, _ in results], sum(not ok for _, ok in results), wall


def synthetic_catalogue(recommender: Recommender, size: int, seed: int = 0) -> None:
    """Replace the platform's catalogue by ``size`` items whose vectors and priors are real
    ones plus noise, so the ranking does exactly the work it would on such a catalogue."""
    featurizer = recommender.featurizer
    real = featurizer.item_vectors
    assert real is not None
    generator = torch.Generator().manual_seed(seed)
    source = torch.randint(len(real), (size,), generator=generator)
    noise = torch.randn(size, real.shape[1], generator=generator) * real.std()
    items = [f"synthetic-{i}" for i in range(size)]
    recommender.data.item_text.update({item: f"Synthetic item {item}" for item in items})
    featurizer.items = items
    featurizer.item_row = {item: row for row, item in enumerate(items)}
    featurizer.item_vectors = real[source] + 0.5 * noise.to(real.device)
    featurizer.prior = featurizer.prior[source]


def time_ranking(rank: Callable[[str], object], users: list[str]) -> list[float]:
    """Seconds of each ranking, after one warm-up."""
    rank(users[0])
    seconds = []
    for user in users:
        start = time.perf_counter()
        rank(user)
        seconds.append(time.perf_counter() - start)
    return seconds


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=REPO / "runs" / "ml100k-default")
    parser.add_argument("--platform", default="comedy")
    parser.add_argument("--requests", type=int, default=300, help="timed one at a time")
    parser.add_argument("--load-requests", type=int, default=2000, help="timed under load")
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--sizes", default="10000,100000", help="synthetic catalogue sizes")
    parser.add_argument("--rankings", type=int, default=50, help="timed per catalogue size")
    parser.add_argument("--max-p99-ms", type=float, default=50.0)
    args = parser.parse_args()
    rng = np.random.default_rng(0)

    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with running_service(args.run, args.platform) as url:
        health = httpx.get(f"{url}/health").json()
        everyone = httpx.get(f"{url}/api/users", params={"limit": 10_000}).json()["users"]
        bench_http(url, list(rng.choice(everyone, 20)), 1)  # warm-up: first requests, caches
        serial, serial_errors, _ = bench_http(url, list(rng.choice(everyone, args.requests)), 1)
        load_users = list(rng.choice(everyone, args.load_requests))
        loaded, load_errors, wall = bench_http(url, load_users, args.concurrency)
    p50, p99 = _percentiles(serial)
    errors = serial_errors + load_errors
    latency_ok, errors_ok = p99 <= args.max_p99_ms, errors == 0
    load_p50, load_p99 = _percentiles(loaded)
    print(
        f"\nfedfuse serve {args.run.name} --platform {args.platform}: {health['items']} items, "
        f"{health['users']} users; top-{K} POST /api/recommend over HTTP keep-alive, users "
        f"drawn at random; torch {torch.__version__}, {torch.get_num_threads()} threads, "
        f"{os.cpu_count()} CPUs\n"
    )
    print("| measure | value | target | result |")
    print("|---|---|---|---|")
    print(f"| p50 latency, concurrency 1 ({args.requests} requests) | {p50:.1f} ms | | |")
    print(
        f"| p99 latency, concurrency 1 | {p99:.1f} ms | ≤ {args.max_p99_ms:g} ms | "
        f"{'PASS' if latency_ok else 'FAIL'} |"
    )
    print(
        f"| throughput, concurrency {args.concurrency} ({args.load_requests} requests) | "
        f"{args.load_requests / wall:.1f} requests/s | | |"
    )
    print(
        f"| p50 / p99 latency, concurrency {args.concurrency} | "
        f"{load_p50:.1f} / {load_p99:.1f} ms | | |"
    )
    print(f"| errors (all requests) | {errors} | 0 | {'PASS' if errors_ok else 'FAIL'} |")

    recommender = Recommender(args.run, args.platform)
    histories = {user: recommender.user_history(user) for user in recommender.users}
    users = list(rng.choice(recommender.users, args.rankings))

    def rank(user: str) -> object:
        return recommender.recommend(*histories[user], K)

    print(f"\nranking alone (Recommender.recommend, top-{K}, {args.rankings} users), in-process\n")
    print("| catalogue | items | p50 ms | p99 ms | µs per item (p50) |")
    print("|---|---|---|---|---|")
    sizes = [("real", len(recommender.featurizer.items))]
    sizes += [("synthetic", int(size)) for size in args.sizes.split(",")]
    for kind, size in sizes:
        if kind == "synthetic":
            synthetic_catalogue(recommender, size)
        p50_rank, p99_rank = _percentiles(time_ranking(rank, users))
        print(
            f"| {kind} | {size:,} | {p50_rank:.1f} | {p99_rank:.1f} | "
            f"{1000 * p50_rank / size:.2f} |"
        )
    print(f"\nload average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    print(
        f"{'PASS' if latency_ok and errors_ok else 'FAIL'}: p99 {p99:.1f} ms at concurrency 1 "
        f"(target ≤ {args.max_p99_ms:g} ms), {errors} errors (target 0)"
    )
    return 0 if latency_ok and errors_ok else 1


if __name__ == "__main__":
    sys.exit(main())
