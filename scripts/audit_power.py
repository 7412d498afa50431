"""Power of the white-box audit: its ε lower bound against the theoretical ε of the step.

Usage: python scripts/audit_power.py [--epsilon 1 2 4 8] [--delta 1e-5] [--trials 20000 100000]

For each target ε, σ is calibrated with FedFuse's own noise calibration so that the audited
mechanism (one Gaussian step with the canary inserted directly: q = 1, sensitivity C = 1)
has that ε at δ; ``server.audit.gradient_audit.audit_dp_step`` then runs its canary trials
through the real DP step (the item tower, FedFuse's default scorer) at that σ and bounds ε at
95 % confidence. Prints one markdown row per (ε, trials): σ, the theoretical and certified μ
and ε, the share of the theory the bound reaches, the test's errors and the time taken.
"""

from __future__ import annotations

import argparse
import time

import torch

from client.noise_calibration import calibrate_noise
from common.config import DPConfig
from common.dataset_summary import markdown_table
from server.audit.gradient_audit import audit_dp_step

HEADER = [
    "target ε",
    "trials",
    "σ",
    "μ theory",
    "μ ≥ (95 %)",
    "ε theory",
    "ε ≥ (95 %)",
    "bound / theory",
    "false pos.",
    "false neg.",
    "seconds",
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epsilon", type=float, nargs="+", default=[1.0, 2.0, 4.0, 8.0])
    parser.add_argument("--delta", type=float, default=1e-5)
    parser.add_argument("--trials", type=int, nargs="+", default=[20_000, 100_000])
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = []
    for target in args.epsilon:
        dp = DPConfig(target_epsilon=target, delta=args.delta, max_grad_norm=1.0)
        sigma = calibrate_noise(dp, sample_rate=1.0, total_steps=1)
        for trials in args.trials:
            start = time.perf_counter()
            result = audit_dp_step(sigma, 1.0, args.delta, trials=trials)
            rows.append(
                [
                    f"{target:g}",
                    f"{result.trials:,}",
                    f"{sigma:.4f}",
                    f"{result.mu_theoretical:.4f}",
                    f"{result.mu_lower_bound:.4f}",
                    f"{result.epsilon_theoretical:.3f}",
                    f"{result.epsilon_lower_bound:.3f}",
                    f"{result.epsilon_lower_bound / result.epsilon_theoretical:.0%}",
                    f"{result.false_positives:,}",
                    f"{result.false_negatives:,}",
                    f"{time.perf_counter() - start:.1f}",
                ]
            )
            print(f"done: ε = {target:g}, {trials:,} trials", flush=True)
    print(f"\nδ = {args.delta:g}, confidence 95 %, canary norm 1000 C, C = 1\n")
    print(markdown_table(HEADER, rows))


if __name__ == "__main__":
    main()
