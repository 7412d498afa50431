"""What the in-run DP-step self-test costs, against one round of the same platform.

Usage: python scripts/bench_self_test.py [--config FILE] [--set section.key=value ...]
       [--platform INDEX]

Builds one platform's client as ``fedfuse simulate`` would (its state in a temporary folder),
then times, in this process, the self-test (``client.step_check.step_evidence``, run afresh)
and one training round (``PlatformClient.train_round``, round 1). A platform runs the self-test
once per process and mechanism, so the share of a run is the test over all of its rounds; the
share of one round is printed too, the bound the issue sets (≤ 5 %).
"""

from __future__ import annotations

import argparse
import tempfile
import time

from client import step_check
from client.platform_client import PlatformClient, identify
from common.adapters import trainable_arrays
from common.config import load_config


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", help="run configuration (default: FedFuse's defaults)")
    parser.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    parser.add_argument("--platform", type=int, default=0, help="partition index")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as state:
        config = load_config(args.config, [*args.set, f"dp.state_dir='{state}'"])
        client = PlatformClient(identify({"partition-id": args.platform}, config), config)
        if client.noise_multiplier is None:
            raise SystemExit("dp.enabled = false: there is no DP step to test")
        step_check._SELF_TESTS.clear()
        started = _clock()
        evidence = step_check.step_evidence(client.noise_multiplier, config)
        test = _since(started)
        arrays = trainable_arrays(client.scorer, client.shared)
        started = _clock()
        client.train_round(1, arrays, config.train.learning_rate, "bench")
        round_time = _since(started)
    rounds = config.federation.rounds
    verdict = "passed" if evidence["self_test"]["passed"] else "FAILED"
    trials = evidence["self_test"]["trials"]
    sigma = client.noise_multiplier
    print(f"platform {client.identity.name}: σ = {sigma:.4g}, {verdict} ({trials} trials)")
    for label, spent, whole in zip(("wall", "CPU"), test, round_time, strict=True):
        print(
            f"{label}: self-test {spent:.2f} s, one round {whole:.2f} s: "
            f"{100 * spent / whole:.1f} % of a round, {100 * spent / (rounds * whole):.2f} % "
            f"of the run's {rounds} rounds"
        )


def _clock() -> tuple[float, float]:
    """Wall clock and this process's CPU time (all threads): on a shared machine the CPU
    ratio is the one other load does not distort."""
    return time.perf_counter(), time.process_time()


def _since(start: tuple[float, float]) -> tuple[float, float]:
    now = _clock()
    return now[0] - start[0], now[1] - start[1]


if __name__ == "__main__":
    main()
