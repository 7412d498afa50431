"""What secure aggregation costs a lockstep round: the same simulation with and without it.

Usage: python scripts/bench_secure_aggregation.py [--platforms 5] [--rounds 6] [--repeats 1]

Both arms run ``fedfuse simulate`` on the same synthetic federation (tiny BERT, DP on, the
lockstep schedule, every platform stepping every round) in a subprocess of their own, the
arms alternating (plain, secure, secure, plain, ...) so that other load on a shared machine
hits both alike. A round is stamped when its ``round k/R done`` line arrives; round 1 carries
the one-off work (Ray, the backbone, each platform's data and noise calibration), so the
steady rounds 2..R give the time per round. The upload is what the server's wire log holds for
one platform in the last round: its tensors, or under secure aggregation the SecAgg+ blobs
(masked vector, keys, key shares).
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CLI = "import sys; from server.cli import main; sys.exit(main(sys.argv[1:]))"


def _inputs(platforms: int, root: Path) -> tuple[Path, Path]:
    from common.platform_writer import write_dataset
    from common.synthetic import SyntheticConfig, generate
    from common.tiny_model import write_tiny_model

    data = write_dataset(
        root / "data", generate(SyntheticConfig(platforms=platforms, users=30, items=40, seed=0))
    )
    return data, write_tiny_model(root / "tiny-bert")


def _arm(secure: bool, args: argparse.Namespace, data: Path, model: Path, runs: Path) -> dict:
    """One simulation: seconds per steady round and the last round's upload per platform."""
    name = f"{'secure' if secure else 'plain'}-{time.monotonic_ns()}"
    settings = {
        "data.path": f"'{data}'",
        "model.backbone": f"'{model}'",
        "federation.schedule": "'lockstep'",
        "federation.rounds": args.rounds,
        "federation.min_nodes": args.platforms,
        "federation.fraction_evaluate": 0.0,
        "train.local_steps": args.rounds,
        "federation.secure_aggregation": str(secure).lower(),
    }
    command = [sys.executable, "-c", CLI, "simulate", "--config", "simulations/synthetic_tiny.toml"]
    command += ["--runs", str(runs), "--name", name, "--no-side-by-side"]
    for key, value in settings.items():
        command += ["--set", f"{key}={value}"]
    stamps = []
    with subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, text=True) as process:
        assert process.stdout is not None
        for line in process.stdout:
            if " done (" in line and line.startswith("[fedfuse] round "):
                stamps.append(time.perf_counter())
    if process.returncode != 0 or len(stamps) != args.rounds:
        raise SystemExit(f"{name}: exit {process.returncode}, {len(stamps)} rounds")
    steady = [b - a for a, b in zip(stamps, stamps[1:], strict=False)]
    wire = [json.loads(x) for x in (runs / name / "wire_log.jsonl").read_text().splitlines()]
    last = [
        r
        for r in wire
        if r["kind"] == "message"
        and r["direction"] == "received"
        and r["type"].startswith("train")
        and r["round"] == args.rounds
    ]
    node = last[0]["node"]
    upload = sum(
        sum(t["bytes"] for t in r["tensors"]) + sum(b["bytes"] for b in r.get("secagg", []))
        for r in last
        if r["node"] == node
    )
    return {"secure": secure, "per_round": statistics.mean(steady), "upload": upload}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--platforms", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as folder:
        root = Path(folder)
        data, model = _inputs(args.platforms, root)
        order = [False, True, True, False] * args.repeats
        results = [_arm(secure, args, data, model, root / "runs") for secure in order]
    rows = []
    for secure in (False, True):
        arm = [r for r in results if r["secure"] == secure]
        rows.append((secure, statistics.mean(r["per_round"] for r in arm), arm[0]["upload"]))
    plain = rows[0][1]
    print(f"{args.platforms} platforms, rounds 2..{args.rounds}, {len(order) // 2} runs per arm")
    print("| secure aggregation | s per round | × plain | upload per platform B |")
    print("|---|---|---|---|")
    for secure, seconds, upload in rows:
        print(
            f"| {'on' if secure else 'off'} | {seconds:.2f} | {seconds / plain:.2f} | {upload:,} |"
        )


if __name__ == "__main__":
    main()
