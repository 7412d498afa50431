"""Throughput of the default backbone on this machine, against its own matmul ceiling.

Usage: python scripts/bench_foundation.py [--backbone default] [--batch-size 32] [--repeats 5]

Prints, measured in this one run: fp32 matmul GFLOP/s (the ceiling), then for each scorer
the inference and non-private LoRA training samples/s at the default sequence length, the
FLOPs per sample (counted by torch's FlopCounterMode, not estimated) and the achieved share
of the matmul rate. Inputs are full-length sequences, so the figures are worst-case per sample.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
from torch.utils.flop_counter import FlopCounterMode

from common.backbone import load_backbone
from common.config import ModelConfig, RunConfig
from common.dataset_summary import markdown_table
from common.model import build_scorer, count_parameters
from common.training import make_optimizer


def matmul_gflops(size: int = 2048, repeats: int = 10) -> float:
    a, b = torch.randn(size, size), torch.randn(size, size)
    torch.mm(a, b)
    start = time.perf_counter()
    for _ in range(repeats):
        torch.mm(a, b)
    return 2 * size**3 * repeats / (time.perf_counter() - start) / 1e9


def full_length_batch(kind: str, batch: int, length: int, vocab: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    tokens = {
        "input_ids": torch.randint(1000, vocab, (batch, length), generator=generator),
        "attention_mask": torch.ones(batch, length, dtype=torch.long),
    }
    if kind == "cross":
        return tokens
    return {f"user_{k}": v for k, v in tokens.items()} | {f"item_{k}": v for k, v in tokens.items()}


def infer_step(scorer: torch.nn.Module, batch: dict[str, torch.Tensor]) -> None:
    scorer.eval()
    with torch.no_grad():
        scorer(**batch)


def train_step(
    scorer: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict[str, torch.Tensor]
) -> None:
    scorer.train()
    optimizer.zero_grad(set_to_none=True)
    scorer(**batch).sum().backward()
    optimizer.step()


def timed(step, repeats: int) -> tuple[float, float]:
    """(seconds per call, FLOPs per call) of ``step`` after one warm-up call."""
    with FlopCounterMode(display=False) as counter:
        step()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    return (time.perf_counter() - start) / repeats, float(counter.get_total_flops())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backbone", default=RunConfig().model.backbone)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    length = RunConfig().model.max_length
    ceiling = matmul_gflops()
    rows = [["fp32 matmul 2048x2048", "", "", f"{ceiling:.1f} GFLOP/s", "", "1.000"]]
    for kind in ("two_tower", "cross"):
        backbone, tokenizer = load_backbone(args.backbone)
        scorer = build_scorer(backbone, ModelConfig(scorer=kind), RunConfig().lora)
        batch = full_length_batch(kind, args.batch_size, length, len(tokenizer))
        optimizer = make_optimizer(scorer, RunConfig().train, 5e-4)

        steps = (
            ("inference", partial(infer_step, scorer, batch)),
            ("LoRA training", partial(train_step, scorer, optimizer, batch)),
        )
        for name, step in steps:
            seconds, flops = timed(step, args.repeats)
            achieved = flops / seconds / 1e9
            rows.append(
                [
                    f"{kind} {name}",
                    f"{count_parameters(scorer, trainable_only=True):,}",
                    f"{args.batch_size / seconds:.1f} samples/s",
                    f"{achieved:.1f} GFLOP/s",
                    f"{flops / args.batch_size / 1e9:.2f}",
                    f"{achieved / ceiling:.3f}",
                ]
            )
    print(
        f"backbone {args.backbone}: {count_parameters(scorer) / 1e6:.1f} M parameters, "
        f"batch {args.batch_size} x {length} tokens (two_tower: two sequences per sample); "
        f"{torch.get_num_threads()} threads\n"
    )
    header = ["what", "trainable params", "rate", "achieved", "GFLOP/sample", "ratio to matmul"]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
