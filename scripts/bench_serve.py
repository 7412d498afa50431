"""``fedfuse serve`` under hostile load: do normal clients still get fast answers?

Usage: python scripts/bench_serve.py [--run runs/ml100k-main] [--platform comedy]
       [--normal 8] [--hostile 8] [--seconds 8] [--rate 10] [--max-p99-ms 50]

``fedfuse serve`` runs in its own process on 127.0.0.1 with tokens. Each normal client is one
user with their own token asking for their top 10 at ``--rate`` requests per second (a person
clicks far less often). Two phases of ``--seconds`` each: the normal clients alone, then the
same beside ``--hostile`` clients, each with a user token of its own, sending as fast as
they can, in turn:

- a maximal cold start: the largest body accepted (64 KiB of 1,000-character titles made
  up fresh each time, so nothing can be cached) with k = 100;
- a body over the limit, 9,000 short titles, malformed JSON, a lone surrogate, ``"k": true``,
  another user's id, no token, and a foreign Host header;
- and one slow-loris connection each, a header byte every 0.5 s.

A monitor asks ``/health`` every 50 ms throughout. Prints the normal clients' p50/p99 and
errors per phase, what the hostile clients got, and whether /health always answered; then
PASS/FAIL against p99 ≤ ``--max-p99-ms`` with hostiles, 0 normal errors, /health always up.
Bounded: at most 64 clients of each kind, at most 60 s a phase.
"""

from __future__ import annotations

import argparse
import base64
import collections
import multiprocessing
import os
import random
import socket
import sys
import tempfile
import threading
import time
from collections.abc import Sequence
from pathlib import Path

import httpx
import numpy as np

from server.serving.guards import MAX_BODY
from server.serving.http_app import MAX_TITLE
from server.serving.service_process import running_service

REPO = Path(__file__).resolve().parents[1]
K = 10


def _percentiles(seconds: list[float]) -> tuple[float, float]:
    """p50 and p99 in milliseconds."""
    if not seconds:
        return float("nan"), float("nan")
    p50, p99 = np.percentile(np.asarray(seconds) * 1000, [50, 99])
    return float(p50), float(p99)


class Normal(threading.Thread):
    """One user asking for their own top-K at a steady rate until ``stop``."""

    def __init__(self, url: str, user: str, token: str, rate: float, stop: threading.Event):
        super().__init__(daemon=True)
        self.url, self.user, self.rate, self.stop = url, user, rate, stop
        self.headers = {"Authorization": f"Bearer {token}"}
        self.latencies: list[float] = []
        self.errors: collections.Counter[str] = collections.Counter()

    def run(self) -> None:
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=30) as client:
            due = time.monotonic() + random.random() / self.rate  # spread the clients out
            while not self.stop.is_set():
                time.sleep(max(0.0, due - time.monotonic()))
                due += 1 / self.rate
                start = time.perf_counter()
                try:
                    response = client.post("/api/recommend", json={"user": self.user, "k": K})
                    ok = response.status_code == 200
                    outcome = str(response.status_code)
                    ok = ok and len(response.json()["recommendations"]) == K
                except httpx.HTTPError as err:
                    ok, outcome = False, type(err).__name__
                self.latencies.append(time.perf_counter() - start)
                if not ok:
                    self.errors[outcome] += 1


def _maximal_titles(rng: random.Random) -> list[str]:
    """As many fresh 1,000-character titles as fit in the body limit (random bytes as
    base64: made cheaply here, so the hostile clients' own work is not what is measured)."""
    count = MAX_BODY // (MAX_TITLE + 8)
    return [base64.b64encode(rng.randbytes(MAX_TITLE * 3 // 4)).decode() for _ in range(count)]


class Hostile(threading.Thread):
    """A user (with a valid token of their own) sending maximal and malformed requests
    back to back, and holding a slow-loris connection open beside them."""

    def __init__(self, url: str, token: str, victim: str, seed: int, stop: threading.Event):
        super().__init__(daemon=True)
        self.url, self.victim, self.stop = url, victim, stop
        self.headers = {"Authorization": f"Bearer {token}"}
        self.rng = random.Random(seed)
        self.statuses: collections.Counter[str] = collections.Counter()

    def attacks(self) -> list[tuple[str, dict[str, object]]]:
        json_type = {"content-type": "application/json"}
        return [
            ("maximal", {"json": {"liked": _maximal_titles(self.rng), "k": 100}}),
            ("over limit", {"content": b'{"liked": ["' + b"a" * MAX_BODY + b'"]}'}),
            ("9000 titles", {"json": {"liked": [f"t{i}" for i in range(9000)]}}),
            ("malformed", {"content": b'{"liked": [', "headers": json_type}),
            ("surrogate", {"content": b'{"liked": ["\\ud800"]}', "headers": json_type}),
            ("k true", {"json": {"liked": [], "k": True}}),
            ("another user", {"json": {"user": self.victim}}),
            ("no token", {"json": {"liked": []}, "headers": {"Authorization": ""}}),
            ("foreign host", {"json": {"liked": []}, "headers": {"Host": "attacker.example"}}),
        ]

    def run(self) -> None:
        loris = threading.Thread(target=self._slow_loris, daemon=True)
        loris.start()
        with httpx.Client(base_url=self.url, headers=self.headers, timeout=30) as client:
            while not self.stop.is_set():
                for name, options in self.attacks():
                    if self.stop.is_set():
                        break
                    headers = {**self.headers, **options.pop("headers", {})}  # type: ignore[dict-item]
                    try:
                        response = client.post("/api/recommend", headers=headers, **options)
                        self.statuses[f"{name}: {response.status_code}"] += 1
                    except httpx.HTTPError as err:
                        self.statuses[f"{name}: {type(err).__name__}"] += 1
        loris.join(5)

    def _slow_loris(self) -> None:
        host, port = self.url.removeprefix("http://").split(":")
        while not self.stop.is_set():
            try:
                with socket.create_connection((host, int(port)), timeout=5) as sock:
                    sock.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
                    while not self.stop.wait(0.5):
                        sock.sendall(b"a")
            except OSError:
                self.statuses["slow loris: cut by the server"] += 1


class Health(threading.Thread):
    """Asks /health every 50 ms; counts failures and keeps the slowest answer."""

    def __init__(self, url: str, stop: threading.Event) -> None:
        super().__init__(daemon=True)
        self.url, self.stop = url, stop
        self.asked = self.failed = 0
        self.slowest = 0.0

    def run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=2) as client:
            while not self.stop.wait(0.05):
                start = time.perf_counter()
                try:
                    ok = client.get("/health").status_code == 200
                except httpx.HTTPError:
                    ok = False
                self.asked += 1
                self.failed += not ok
                self.slowest = max(self.slowest, time.perf_counter() - start)


def _run_for(clients: Sequence[threading.Thread], stop: threading.Event, seconds: float) -> None:
    """Start the client threads, let them run ``seconds``, then stop and join them."""
    for client in clients:
        client.start()
    time.sleep(seconds)
    stop.set()
    for client in clients:
        client.join(60)


def _hostile_process(
    url: str, tokens: list[str], victim: str, seconds: float, out: multiprocessing.Queue
) -> None:
    """The hostile clients, in a process of their own: in this one their threads would
    share the GIL with the normal clients and slow down the timing of them, not the service."""
    stop = threading.Event()
    hostiles = [Hostile(url, token, victim, seed, stop) for seed, token in enumerate(tokens)]
    _run_for(hostiles, stop, seconds)
    out.put(sum((h.statuses for h in hostiles), collections.Counter()))


def phase(
    url: str,
    tokens: dict[str, str],
    normal_users: list[str],
    hostile_users: list[str],
    rate: float,
    seconds: float,
) -> tuple[list[Normal], collections.Counter[str]]:
    """One phase: the normal users' clients, with the hostile users' clients beside them;
    the normal clients' timings and what the hostile requests got."""
    stop = threading.Event()
    normal = [Normal(url, u, tokens[u], rate, stop) for u in normal_users]
    context = multiprocessing.get_context("fork")
    results: multiprocessing.Queue = context.Queue()
    hostile = context.Process(
        target=_hostile_process,
        args=(url, [tokens[u] for u in hostile_users], normal_users[0], seconds, results),
    )
    if hostile_users:
        hostile.start()
    _run_for(normal, stop, seconds)
    statuses = collections.Counter()
    if hostile_users:
        statuses = results.get(timeout=120)
        hostile.join(60)
    return normal, statuses


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--run", type=Path, default=REPO / "runs" / "ml100k-main")
    parser.add_argument("--platform", default="comedy")
    parser.add_argument("--normal", type=int, default=8, help="normal clients (at most 64)")
    parser.add_argument("--hostile", type=int, default=8, help="hostile clients (at most 64)")
    parser.add_argument("--seconds", type=float, default=8, help="per phase (at most 60)")
    parser.add_argument("--rate", type=float, default=10, help="requests/s per normal client")
    parser.add_argument("--max-p99-ms", type=float, default=50.0)
    args = parser.parse_args()
    if not (1 <= args.normal <= 64 and 0 <= args.hostile <= 64 and 0 < args.seconds <= 60):
        parser.error("--normal 1-64, --hostile 0-64, --seconds up to 60")
    random.seed(0)

    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    with tempfile.TemporaryDirectory() as scratch:
        token_file = Path(scratch) / "serve.token"
        options = ["--token-file", str(token_file)]
        with running_service(args.run, args.platform, options=options) as url:
            operator = {"Authorization": f"Bearer {token_file.read_text().strip()}"}
            everyone = httpx.get(f"{url}/api/users", params={"limit": 10_000}, headers=operator)
            chosen = random.sample(everyone.json()["users"], args.normal + args.hostile)
            tokens = {}
            for user in chosen:  # as the platform's login service would, per signed-in user
                minted = httpx.post(f"{url}/api/tokens", json={"user": user}, headers=operator)
                tokens[user] = minted.json()["token"]
            normal, hostile = chosen[: args.normal], chosen[args.normal :]
            phase(url, tokens, normal, [], args.rate, 1)  # warm-up
            health_stop = threading.Event()
            health = Health(url, health_stop)
            health.start()
            alone, _ = phase(url, tokens, normal, [], args.rate, args.seconds)
            beside, statuses = phase(url, tokens, normal, hostile, args.rate, args.seconds)
            health_stop.set()
            health.join(10)

    rows = []
    for name, clients in (("alone", alone), (f"beside {args.hostile} hostile", beside)):
        latencies = [s for c in clients for s in c.latencies]
        errors = sum((c.errors for c in clients), collections.Counter())
        p50, p99 = _percentiles(latencies)
        rows.append((name, len(latencies), p50, p99, errors))
    print(
        f"\nfedfuse serve {args.run.name} --platform {args.platform} on 127.0.0.1: "
        f"{args.normal} normal clients (top-{K} for their own user, {args.rate:g}/s each), "
        f"{args.seconds:g} s per phase; {os.cpu_count()} CPUs\n"
    )
    print("| normal clients | requests | p50 ms | p99 ms | errors |")
    print("|---|---|---|---|---|")
    for name, count, p50, p99, errors in rows:
        shown = ", ".join(f"{k}: {v}" for k, v in sorted(errors.items())) or "0"
        print(f"| {name} | {count} | {p50:.1f} | {p99:.1f} | {shown} |")
    print("\nhostile requests (what they got):")
    for outcome, count in sorted(statuses.items()):
        print(f"  {outcome}: {count}")
    health_ok = health.failed == 0 and health.asked > 0
    print(
        f"\n/health: asked {health.asked} times, {health.failed} failures, slowest "
        f"{1000 * health.slowest:.1f} ms"
    )
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    _, count, _, p99, errors = rows[1]
    passed = p99 <= args.max_p99_ms and not errors and health_ok and count > 0
    print(
        f"{'PASS' if passed else 'FAIL'}: normal p99 beside hostiles {p99:.1f} ms (target ≤ "
        f"{args.max_p99_ms:g} ms), {sum(errors.values())} normal errors (target 0), /health "
        f"{'answered throughout' if health_ok else 'failed'}"
    )
    return 0 if passed else 1


if __name__ == "__main__":
    sys.exit(main())
