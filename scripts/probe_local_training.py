"""Which training settings move one ML-100K platform, with and without DP: the sweep behind
the default's training recipe (docs/results.md).

Usage: python scripts/probe_local_training.py [--config simulations/ml100k_default.toml]
       [--platform comedy] [--cases 300]
       --grid "dp.expected_batch_size=1024 train.learning_rate=0.01; dp.enabled=false"

Each grid entry (separated by ``;``) is a list of ``section.key=value`` overrides of the
configuration. The platform trains alone through the real client (``PlatformClient``: the
configured rounds, learning-rate schedule, ledger, popularity prior, the strategy's frozen
tensors) from the common seeded adapters, then ranks a fixed sample of its validation users
with its own released prior. Prints one Markdown table, with the platform's exact popularity
ranking as the first row.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from client.popularity_prior import positive_counts
from common.config import load_config, with_settings
from common.dataset_summary import markdown_table
from common.evaluation import CountScorer
from common.sharing import seeded_arrays
from server.simulation.baselines import platform_clients, train_rounds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="simulations/ml100k_default.toml")
    parser.add_argument("--platform", default="comedy")
    parser.add_argument("--cases", type=int, default=300, help="validation users (fixed sample)")
    parser.add_argument("--grid", required=True, help="';'-separated lists of overrides")
    args = parser.parse_args()
    state = Path(tempfile.mkdtemp(prefix="fedfuse-probe-"))
    rows = []
    try:
        for number, entry in enumerate(part.strip() for part in args.grid.split(";")):
            config = load_config(args.config, entry.split())
            config = with_settings(
                config,
                data={"platforms": [args.platform]},
                federation={"min_nodes": 1, "fraction_evaluate": 0.0},
            )
            client = platform_clients(config, state / str(number))[0]
            seeded = seeded_arrays(config.model, config.lora, config.federation.strategy)
            initial = {name: seeded[name] for name in client.shared}
            if not rows:
                popular = client.score(
                    CountScorer(positive_counts(client.task)), "valid", args.cases
                )
                rows.append(["popularity (exact counts)", "", "", f"{popular['ndcg@10']:.4f}"])
                rows[-1] += [f"{popular['hr@10']:.4f}", f"{popular['auc']:.4f}", ""]
            before = client.evaluate(initial, "valid", args.cases)
            start = time.perf_counter()
            arrays, epsilon = train_rounds(client, initial)
            seconds = time.perf_counter() - start
            after = client.evaluate(arrays, "valid", args.cases)
            rows.append(
                [
                    entry or "(config as is)",
                    f"{epsilon:.2f}",
                    f"{before['ndcg@10']:.4f}",
                    f"{after['ndcg@10']:.4f}",
                    f"{after['hr@10']:.4f}",
                    f"{after['auc']:.4f}",
                    f"{seconds:.0f}",
                ]
            )
            print(f"{entry}: NDCG@10 {before['ndcg@10']:.4f} -> {after['ndcg@10']:.4f}", flush=True)
    finally:
        shutil.rmtree(state)
    print(f"\nplatform {args.platform}, {args.cases} validation users\n")
    header = ["settings", "ε", "NDCG@10 before", "after", "HR@10", "AUC", "train s"]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
