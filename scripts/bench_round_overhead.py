"""What Flower's Simulation Engine adds to a FedFuse round, against the same work in a plain loop.

Usage: python scripts/bench_round_overhead.py [--platforms 3] [--rounds 4] [--local-steps 2]
       [--backbone default] [--data DIR] [--threads 2] [--repeats 1]

Both arms run the same configuration (DP on, same seeds, same platforms, same local steps, no
client-side evaluation) in a subprocess of their own:

- ``plain``: one process; each round calls ``PlatformClient.train_round`` for every platform in
  turn, averages the shared tensors weighted by training examples (FedAvg's rule) and saves the
  global adapter, as the ServerApp's checkpoint does.
- ``flower``: ``server.simulation.simulation.simulate`` (what ``fedfuse simulate`` runs): the
  ServerApp in this process, the ClientApps in Ray actors.

Fairness on a small machine: Flower gets ``--threads`` CPUs per client, so Ray's pool holds one
actor (``floor(CPUs / threads)``; one at a time when threads = CPUs) and serves the platforms one
after another, with ``OMP_NUM_THREADS`` = threads set by Ray; the plain loop also runs the
platforms sequentially with ``torch.set_num_threads(threads)``. Rounds are stamped when the
global adapter is saved. Round 1 carries one-off work in both arms (backbone load, building
each platform's data, DP trainer and noise calibration; for Flower also Ray start and actor
spawn), so it is reported apart from the steady rounds 2..R, which give the overhead ratio.
The arms alternate (plain, flower, flower, plain, ...), so load from other work on a shared
machine hits both alike.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import psutil

REPO = Path(__file__).resolve().parents[1]
TAG = "FEDFUSE_BENCH_TAG"  # in the environment of an arm's processes (Ray workers inherit it)


def _stamp() -> tuple[float, float]:
    """Wall clock and the CPU seconds used so far by every process of this arm: on a shared
    machine CPU time is what competing load does not inflate."""
    cpu = 0.0
    for proc in psutil.process_iter():
        try:
            if proc.environ().get(TAG) == os.environ[TAG]:
                times = proc.cpu_times()
                cpu += times.user + times.system
        except psutil.Error:
            continue
    return time.perf_counter(), cpu


def _write_inputs(args: argparse.Namespace, root: Path) -> Path:
    """A synthetic federation (unless ``--data``) and the run configuration both arms use."""
    from common.platform_writer import write_dataset
    from common.synthetic import SyntheticConfig, generate

    data = Path(args.data).resolve() if args.data else root / "data"
    if not args.data:
        write_dataset(data, generate(SyntheticConfig(platforms=args.platforms, seed=0)))
    config = root / "bench.toml"
    config.write_text(
        f"""
[data]
path = "{data}"
[model]
backbone = "{args.backbone}"
max_length = 64
[train]
batch_size = 16
local_steps = {args.local_steps}
seed = 0
[dp]
enabled = true
target_epsilon = 8.0
delta = 1e-5
expected_batch_size = 32
[federation]
rounds = {args.rounds}
min_nodes = {args.platforms}
fraction_evaluate = 0.0
""",
        encoding="utf-8",
    )
    return config


def _plain(config_path: Path, out: Path, threads: int) -> list[tuple[float, float]]:
    """The federation's rounds as a loop in this process; returns the stamps."""
    import torch

    from client.platform_client import PlatformClient, identify
    from common.adapters import load_trainable_arrays, save_adapter, trainable_arrays
    from common.config import load_config
    from common.platform_data import federation_platforms
    from common.sharing import shared_names, shared_scorer
    from server.federation.server_app import learning_rate_schedule

    torch.set_num_threads(threads)
    stamps = [_stamp()]
    config = load_config(config_path, [f"dp.state_dir='{out / 'state'}'"])
    scorer, _ = shared_scorer(config.model, config.lora, config.federation.strategy)
    names = shared_names(trainable_arrays(scorer), config.federation.strategy)
    arrays = trainable_arrays(scorer, names)
    rate = learning_rate_schedule(config)
    platforms = len(federation_platforms(config.data))
    clients: dict[int, PlatformClient] = {}
    for server_round in range(1, config.federation.rounds + 1):
        replies = []
        for index in range(platforms):
            if index not in clients:  # built on first use, as the ClientApp does
                identity = identify({"partition-id": index}, config)
                clients[index] = PlatformClient(identity, config)
            replies.append(clients[index].train_round(server_round, arrays, rate(server_round)))
        weights = np.array([float(metrics["num-examples"]) for _, metrics in replies])
        arrays = {
            name: np.tensordot(weights / weights.sum(), np.stack([a[name] for a, _ in replies]), 1)
            for name in names
        }
        load_trainable_arrays(scorer, arrays, names)
        save_adapter(scorer, out / "adapters" / f"round_{server_round:03d}")
        stamps.append(_stamp())
    return stamps


def _flower(config_path: Path, out: Path, threads: int) -> list[tuple[float, float]]:
    """The same rounds through ``fedfuse simulate``; stamps taken at each checkpoint."""
    from common.config import load_config
    from server.federation import server_app
    from server.simulation.simulation import prepare_run, simulate

    stamps = [_stamp()]
    real_save = server_app.save_adapter

    def stamped_save(scorer, folder):  # runs in the ServerApp thread of this process
        path = real_save(scorer, folder)
        stamps.append(_stamp())
        return path

    server_app.save_adapter = stamped_save
    simulate(prepare_run(load_config(config_path), out, "flower"), cpus_per_client=threads)
    return stamps


def _worker(args: argparse.Namespace) -> None:
    run = {"plain": _plain, "flower": _flower}[args.worker]
    stamps = run(Path(args.config), Path(args.out), args.threads)
    print("BENCH " + json.dumps({"stamps": stamps}), flush=True)


def _run_arm(arm: str, config: Path, root: Path, args: argparse.Namespace, rep: int) -> dict:
    out = root / f"{arm}-{rep}"
    env = dict(
        os.environ,
        OMP_NUM_THREADS=str(args.threads),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        RAY_DEDUP_LOGS="0",
        **{TAG: f"{arm}-{rep}-{os.getpid()}"},
    )
    command = [sys.executable, __file__, "--worker", arm, "--config", str(config)]
    command += ["--out", str(out), "--threads", str(args.threads)]
    started = time.perf_counter()
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True)
    wall = time.perf_counter() - started
    line = next((x for x in result.stdout.splitlines() if x.startswith("BENCH ")), None)
    if result.returncode != 0 or line is None:
        tail = result.stdout[-4000:] + result.stderr[-4000:]
        sys.exit(f"{arm} failed (rc {result.returncode}):\n{tail}")
    stamps = json.loads(line.removeprefix("BENCH "))["stamps"]
    rounds = [b[0] - a[0] for a, b in zip(stamps, stamps[1:], strict=False)]
    cpu = [b[1] - a[1] for a, b in zip(stamps, stamps[1:], strict=False)]
    if len(rounds) != args.rounds:
        sys.exit(f"{arm}: {len(rounds)} round stamps for {args.rounds} rounds")
    return {"arm": arm, "wall": wall, "rounds": rounds, "cpu": cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--platforms", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=4, help="at least 2 (round 1 is one-off)")
    parser.add_argument("--local-steps", type=int, default=2)
    parser.add_argument("--backbone", default="default")
    parser.add_argument("--data", help="platform folders to use instead of synthetic ones")
    parser.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--repeats", type=int, default=1, help="pairs of (plain, flower) runs")
    parser.add_argument("--worker", choices=["plain", "flower"], help=argparse.SUPPRESS)
    parser.add_argument("--config", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        _worker(args)
        return
    if args.rounds < 2:
        parser.error("--rounds must be at least 2")
    if args.data:
        from common.platform_data import platform_dirs

        args.platforms = len(platform_dirs(args.data))
    root = Path(tempfile.mkdtemp(prefix="fedfuse-bench-overhead-"))
    config = _write_inputs(args, root)
    order = [
        arm
        for rep in range(args.repeats)
        for arm in (("plain", "flower"), ("flower", "plain"))[rep % 2]
    ]
    print(
        f"{args.platforms} platforms, {args.rounds} rounds x {args.local_steps} DP steps, "
        f"backbone {args.backbone}, {args.threads} threads per client, platforms sequential "
        f"in both arms; order {order}"
    )
    results = [_run_arm(arm, config, root, args, rep // 2) for rep, arm in enumerate(order)]
    print(
        "| arm | process wall s | round 1 wall / CPU s | rounds 2..R wall s | rounds 2..R CPU s |"
    )
    print("|---|---|---|---|---|")
    for r in results:
        walls = ", ".join(f"{x:.1f}" for x in r["rounds"][1:])
        cpus = ", ".join(f"{x:.1f}" for x in r["cpu"][1:])
        first = f"{r['rounds'][0]:.1f} / {r['cpu'][0]:.1f}"
        print(f"| {r['arm']} | {r['wall']:.1f} | {first} | {walls} | {cpus} |")

    def steady(arm: str, key: str, pick=statistics.mean) -> float:
        return pick(x for r in results if r["arm"] == arm for x in r[key][1:])

    def one_off(arm: str, key: str) -> float:
        values = [r[key][0] if key != "wall" else r[key] for r in results if r["arm"] == arm]
        return statistics.mean(values)

    for label, key, pick in (
        ("wall, mean", "rounds", statistics.mean),
        ("wall, least contended (min)", "rounds", min),
        ("CPU seconds, mean", "cpu", statistics.mean),
    ):
        plain, flower = steady("plain", key, pick), steady("flower", key, pick)
        print(
            f"steady round ({label}): plain {plain:.2f} s, flower {flower:.2f} s -> "
            f"Flower overhead {flower / plain - 1:+.1%} (target <= +10%)"
        )
    print(
        f"one-off: round 1 wall plain {one_off('plain', 'rounds'):.1f} s, flower "
        f"{one_off('flower', 'rounds'):.1f} s; round 1 CPU plain {one_off('plain', 'cpu'):.1f} s, "
        f"flower {one_off('flower', 'cpu'):.1f} s; process wall (imports, Ray start/stop, "
        f"report) plain {one_off('plain', 'wall'):.1f} s, flower {one_off('flower', 'wall'):.1f} s"
    )
    print(f"scratch: {root}")


if __name__ == "__main__":
    main()
