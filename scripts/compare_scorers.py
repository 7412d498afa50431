"""Measure the two scorers on one ML-100K platform: quality after equal training, and speed.

Usage: python scripts/compare_scorers.py [--platform kids_family] [--steps 150] [--cases 100]

Both scorers get the same backbone, LoRA settings, batches (same seed) and optimiser steps;
the evaluation uses the same fixed sample of test users. Prints one Markdown table.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

from client.dp_training import LocalTrainer
from common.backbone import load_backbone
from common.config import DPConfig, ModelConfig, RunConfig
from common.dataset_summary import markdown_table
from common.evaluation import evaluate
from common.featurizer import TextFeaturizer
from common.model import build_scorer
from common.movielens import build_ml100k
from common.platform_data import read_platform
from common.platform_writer import write_dataset
from common.task import build_task, training_units


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", help="prepared ML-100K folder (built in a temp dir if absent)")
    parser.add_argument("--platform", default="kids_family")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--cases", type=int, default=100, help="test users to rank (fixed sample)")
    args = parser.parse_args()
    config = RunConfig()
    root = (
        Path(args.data)
        if args.data
        else write_dataset(Path(tempfile.mkdtemp()) / "ml100k", build_ml100k())
    )
    data = read_platform(root / args.platform)
    task = build_task(data, config.task)
    rows = []
    for kind in ("two_tower", "cross"):
        backbone, tokenizer = load_backbone(config.model.backbone)
        scorer = build_scorer(backbone, ModelConfig(scorer=kind), config.lora)
        featurizer = TextFeaturizer(tokenizer, data.item_text, config.model.max_length)
        before = evaluate(
            scorer, featurizer, task, "test", config.train.eval_batch_size, args.cases
        )
        trainer = LocalTrainer(
            scorer,
            featurizer,
            training_units(task.train, "bce"),  # these scorers train pointwise
            config.train,
            DPConfig(enabled=False, expected_batch_size=config.train.batch_size),
        )
        start = time.perf_counter()
        loss = trainer.run(args.steps, config.train.learning_rate, noise_multiplier=None).loss
        train_rate = args.steps * config.train.batch_size / (time.perf_counter() - start)
        start = time.perf_counter()
        after = evaluate(scorer, featurizer, task, "test", config.train.eval_batch_size, args.cases)
        eval_seconds = time.perf_counter() - start
        rows.append(
            [
                kind,
                f"{train_rate:.1f}",
                f"{eval_seconds / after['ranking_cases']:.3f}",
                f"{before['ndcg@10']:.4f}",
                f"{after['hr@10']:.4f}",
                f"{after['ndcg@10']:.4f}",
                f"{after['mrr']:.4f}",
                f"{after['auc']:.4f}",
                f"{loss:.4f}",
            ]
        )
        print(f"{kind}: done ({args.steps} steps)", flush=True)
    print(
        f"\nplatform {args.platform}, {args.steps} steps of {config.train.batch_size}, "
        f"{args.cases} test users, {torch.get_num_threads()} threads\n"
    )
    print(
        markdown_table(
            [
                "scorer",
                "train samples/s",
                "eval s/user",
                "NDCG@10 before",
                "HR@10",
                "NDCG@10",
                "MRR",
                "AUC",
                "mean train loss",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    main()
