"""Which part of the model takes which share of a training unit's clipped gradient: the
measurement behind ``dp.gradient_scales`` (docs/privacy.md, "Each part's share of the clip
norm").

Usage: python scripts/gradient_shares.py [--config simulations/ml100k_default.toml]
       [--platform drama_romance] [--units 64] [--scaled]

Takes ``--units`` random training units of one platform, computes each unit's gradient with
the run's initial tensors (the seeded adapters, as round 1 starts), and prints per part (a
trainable tensor) its size, the median norm of its share of a unit's gradient, and its median
share of the unit's squared norm — once through the adapters and once on a head-only step.
``--scaled`` first multiplies each part by its ``dp.gradient_scales`` value, as the DP step
does before clipping. No DP is involved: this reads the platform's train split directly and
is a tool for whoever tunes the recipe on their own data, not something a platform releases.
"""

from __future__ import annotations

import argparse
import random
import tempfile
from pathlib import Path

import numpy as np

from client.gradient_rows import scaled_tensors
from common.adapters import load_trainable_arrays
from common.config import load_config, with_settings
from common.dataset_summary import markdown_table
from common.sharing import seeded_arrays
from common.training import loss_on
from server.simulation.baselines import platform_clients


def part(name: str) -> str:
    """A tensor's part: the head's module (mix, recency, user_down, ...) or LoRA A / B."""
    if name.startswith("head."):
        return name.split(".")[1]
    return "lora_A" if ".lora_A." in name else "lora_B"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="simulations/ml100k_default.toml")
    parser.add_argument("--platform", default="drama_romance")
    parser.add_argument("--units", type=int, default=64)
    parser.add_argument("--scaled", action="store_true", help="apply dp.gradient_scales")
    args = parser.parse_args()
    config = load_config(args.config)
    config = with_settings(
        config,
        data={"platforms": [args.platform]},
        federation={"min_nodes": 1, "fraction_evaluate": 0.0},
        dp={"enabled": False},  # the client opens no ledger: nothing is trained or released
    )
    with tempfile.TemporaryDirectory() as state:
        client = platform_clients(config, Path(state))[0]
        seeded = seeded_arrays(config.model, config.lora, config.federation.strategy)
        shared = {name: seeded[name] for name in client.shared}
        load_trainable_arrays(client.scorer, shared, client.shared)
    scorer, featurizer = client.scorer, client.featurizer
    scorer.prepare(featurizer)
    scorer.train()
    units = random.Random(0).sample(client.task.train, min(args.units, len(client.task.train)))
    tensors = [(n, p) for n, p in scorer.named_parameters() if p.requires_grad]
    sizes: dict[str, int] = {}
    for name, param in tensors:
        sizes[part(name)] = sizes.get(part(name), 0) + param.numel()
    scales = config.dp.gradient_scales if args.scaled else {}
    scaled = {id(param): value for param, value in scaled_tensors(scorer, scales)}

    for through_adapters in (True, False):
        squares: dict[str, list[float]] = {}  # per part, each unit's squared norm of it
        for number, unit in enumerate(units):
            scorer.zero_grad(set_to_none=True)
            loss_on(scorer, featurizer, [unit], through_adapters).backward()
            for name, param in tensors:
                if param.grad is not None:
                    value = float((param.grad * scaled.get(id(param), 1.0)).pow(2).sum())
                    per_unit = squares.setdefault(part(name), [0.0] * len(units))
                    per_unit[number] += value
        totals = np.sum(list(squares.values()), axis=0)
        rows = [
            [
                key,
                str(sizes[key]),
                f"{np.median(np.sqrt(values)):.4f}",
                f"{np.median(np.array(values) / np.maximum(totals, 1e-30)):.1%}",
            ]
            for key, values in sorted(squares.items())
        ]
        rows.append(["whole unit", "", f"{np.median(np.sqrt(totals)):.4f}", "100%"])
        step = "adapter step" if through_adapters else "head-only step"
        clipped = float(np.mean(np.sqrt(totals) > config.dp.max_grad_norm))
        print(
            f"\n{args.platform}, {len(units)} units, {step}"
            f"{', scaled by dp.gradient_scales' if scales else ''}: "
            f"{clipped:.0%} of units above C = {config.dp.max_grad_norm}\n"
        )
        print(markdown_table(["part", "coordinates", "median norm", "median share of norm²"], rows))


if __name__ == "__main__":
    main()
