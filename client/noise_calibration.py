"""How much noise a platform's DP-SGD needs: the sampling rate and steps of its plan, and the
smallest σ that keeps the whole plan (and the releases already made) within the target ε.

Apart from the training loop (``client/dp_training.py``) because it runs once, before round 1,
on the ledger's accountant alone: nothing here touches data or the model.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Sequence

from client.ledger import Mechanism, epsilon
from common.config import DPConfig, TrainConfig
from common.errors import ConfigError

log = logging.getLogger(__name__)


def expected_batch(dp: DPConfig) -> int:
    """Expected privacy units per logical batch. ``dp.expected_batch_size`` counts training
    units; a user brings at most k of them, so under ``user`` a batch expects B / k users: a
    logical batch is then no larger than under ``example``, and a platform's few hundred users
    still make several steps per round."""
    if dp.user_level:
        return max(1, dp.expected_batch_size // dp.max_examples_per_user)
    return dp.expected_batch_size


def sample_rate(privacy_units: int, dp: DPConfig) -> float:
    """Poisson sampling probability q of one privacy unit (training unit or user) per batch.

    Opacus sets q = 1 / len(data_loader) = 1 / ceil(N / B); using the same formula here keeps
    the planned mechanism (noise calibration, budget check) identical to the executed one.
    """
    return 1.0 / math.ceil(privacy_units / min(expected_batch(dp), privacy_units))


def steps_per_round(privacy_units: int, train: TrainConfig, dp: DPConfig) -> int:
    """Optimiser steps one round runs: ``local_steps``, or ``local_epochs`` expected passes
    over the privacy units (under ``user``: over the platform's users)."""
    if train.local_steps:
        return train.local_steps
    return max(1, math.ceil(train.local_epochs / sample_rate(privacy_units, dp)))


def calibrate_noise(
    dp: DPConfig, sample_rate: float, total_steps: int, committed: Sequence[Mechanism] = ()
) -> float:
    """Smallest σ (within 0.1 %) whose ε after ``total_steps``, composed with the
    ``committed`` releases (the popularity prior), stays within the target.

    Bisection on the ledger's own accountant rather than Opacus' ``get_noise_multiplier``: the
    two estimate PRV ε with different settings, and the last planned round must fit the budget
    by the very measure the ledger enforces.
    """
    if dp.noise_multiplier is not None:
        return dp.noise_multiplier
    target = min(dp.target_epsilon, dp.budget)

    def eps(sigma: float) -> float:
        planned = Mechanism(sigma, sample_rate, total_steps, dp.max_grad_norm, unit=dp.unit)
        return epsilon([*committed, planned], dp.delta)

    already = epsilon(list(committed), dp.delta)
    if already >= target:
        raise ConfigError(
            f"dp.target_epsilon = {target:g} leaves nothing for training after the "
            f"popularity prior (ε = {already:.3g}); raise prior.noise_multiplier"
        )

    progress = _Progress(f"calibrating σ to ε = {target:g} over {total_steps} steps")
    low, high = 0.3, 1.0
    while eps(high) > target:
        low, high = high, high * 2
        progress.step(low, high)
        if high > 1e4:
            raise ConfigError(f"dp.target_epsilon = {target:g} is unreachable for this run")
    while eps(low) <= target and low > 0.05:
        high, low = low, low / 2
        progress.step(low, high)
    while (high - low) / high > 1e-3:
        middle = (low + high) / 2
        low, high = (low, middle) if eps(middle) <= target else (middle, high)
        progress.step(low, high)
    progress.done(high)
    return high


class _Progress:
    """Progress of a slow calibration (each ε of a long run can take seconds): a line once
    every ``EVERY`` seconds, and the result if any line was written; a fast one stays silent."""

    EVERY = 5.0

    def __init__(self, what: str) -> None:
        self.what = what
        self.started = self.last = time.monotonic()
        self.steps = 0
        self.spoke = False

    def step(self, low: float, high: float) -> None:
        self.steps += 1
        now = time.monotonic()
        if now - self.last >= self.EVERY:
            self.last, self.spoke = now, True
            elapsed = now - self.started
            log.info(
                "%s: σ in [%.4g, %.4g] after %d steps, %.0f s",
                self.what,
                low,
                high,
                self.steps,
                elapsed,
            )

    def done(self, sigma: float) -> None:
        if self.spoke:
            elapsed = time.monotonic() - self.started
            log.info("%s: σ = %.4g (%.0f s)", self.what, sigma, elapsed)
