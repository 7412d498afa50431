"""Which local optimiser, learning rate and step count move one ML-100K platform, with and
without DP: the study behind the default's training settings (docs/results.md).

Usage: python scripts/probe_local_training.py [--config simulations/ml100k_default.toml]
       [--platform comedy] [--cases 300] --grid adamw:2e-3:4:dp,sgd:2:4:dp,adamw:1e-2:20:off

Each grid entry is OPTIMISER:LEARNING_RATE:LOCAL_STEPS:dp|off. The platform trains alone
through the real client (``PlatformClient.train_round``: the configured rounds, cosine schedule,
ledger, ffa's frozen A) from the common seeded adapters, then ranks a fixed sample of its
validation users. Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from common.config import load_config, with_settings
from common.dataset_summary import markdown_table
from common.sharing import seeded_arrays
from server.baselines import evaluation_clients, platform_clients, train_rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="simulations/ml100k_default.toml")
    parser.add_argument("--platform", default="comedy")
    parser.add_argument("--cases", type=int, default=300, help="validation users (fixed sample)")
    parser.add_argument("--grid", required=True, help="OPT:LR:STEPS:dp|off, comma-separated")
    args = parser.parse_args()
    base = load_config(args.config)
    base = with_settings(
        base,
        data={"platforms": [args.platform]},
        federation={"min_nodes": 1, "fraction_evaluate": 0.0},
    )
    initial = seeded_arrays(base.model, base.lora, base.federation.strategy)
    state = Path(tempfile.mkdtemp(prefix="fedfuse-probe-"))
    # one DP-free client scores every model: evaluation does not depend on the training settings
    judge = evaluation_clients(base, state / "judge")[0]
    before = judge.evaluate(initial, "valid", args.cases)
    rows = []
    for number, entry in enumerate(args.grid.split(",")):
        optimizer, learning_rate, steps, privacy = entry.split(":")
        config = with_settings(
            base,
            train={
                "optimizer": optimizer,
                "learning_rate": float(learning_rate),
                "local_steps": int(steps),
            },
            dp={"enabled": privacy == "dp"},
        )
        client = platform_clients(config, state / str(number))[0]
        start = time.perf_counter()
        arrays, epsilon = train_rounds(client, initial)
        seconds = time.perf_counter() - start
        after = judge.evaluate(arrays, "valid", args.cases)
        rows.append(
            [
                optimizer,
                learning_rate,
                str(config.federation.rounds * int(steps)),
                f"{epsilon:.2f}",
                f"{before['ndcg@10']:.4f}",
                f"{after['ndcg@10']:.4f}",
                f"{after['auc']:.4f}",
                f"{seconds:.0f}",
            ]
        )
        print(f"{entry}: NDCG@10 {before['ndcg@10']:.4f} -> {after['ndcg@10']:.4f}", flush=True)
    print(
        f"\nplatform {args.platform}, {args.cases} validation users, "
        f"batch {base.dp.expected_batch_size}\n"
    )
    header = ["optimiser", "lr", "steps", "ε", "NDCG@10 before", "after", "AUC", "train s"]
    print(markdown_table(header, rows))
    shutil.rmtree(state)


if __name__ == "__main__":
    main()
