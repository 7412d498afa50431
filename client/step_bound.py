"""The statistics of the DP step's canary test (``client/step_check.py`` runs the step): from
the canary coordinates a step left, a lower bound on its ε against the one Gaussian step's
theoretical ε, and the measured noise spread and clipped canary mean against the record.
No model and no training: ``fedfuse audit`` rechecks a recorded verdict with these alone."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.optimize import brentq
from scipy.stats import beta, norm

from client.ledger import Mechanism, epsilon


def clopper_pearson_upper(failures: int, trials: int, level: float) -> float:
    """Upper end of the one-sided Clopper–Pearson interval for a rate, at confidence 1 − level."""
    if trials == 0 or failures >= trials:
        return 1.0
    return float(beta.ppf(1 - level, failures + 1, trials - failures))


def mu_lower_bound(
    false_positives: int, negatives: int, false_negatives: int, positives: int, confidence: float
) -> float:
    """μ⁻ = Φ⁻¹(1 − FPR⁺) − Φ⁻¹(FNR⁺), both rates at level (1 − confidence)/2: any μ-GDP
    mechanism has μ ≥ μ⁻ at ``confidence`` (0 when the errors are at chance or worse)."""
    level = (1 - confidence) / 2
    fpr = clopper_pearson_upper(false_positives, negatives, level)
    fnr = clopper_pearson_upper(false_negatives, positives, level)
    return max(0.0, float(norm.isf(fpr) - norm.ppf(fnr)))


def _gdp_delta(eps: float, mu: float) -> float:
    """δ(ε) of μ-GDP (Dong, Roth and Su 2019), its second term in log space."""
    return float(norm.cdf(mu / 2 - eps / mu) - math.exp(eps + norm.logcdf(-mu / 2 - eps / mu)))


def gdp_epsilon(mu: float, delta: float) -> float:
    """The exact ε of μ-GDP at δ (the Gaussian mechanism with σ = 1/μ)."""
    if mu <= 0 or _gdp_delta(0.0, mu) <= delta:
        return 0.0
    high = 1.0
    while _gdp_delta(high, mu) > delta:
        high *= 2
    return float(brentq(lambda eps: _gdp_delta(eps, mu) - delta, 0.0, high, xtol=1e-9))


def theoretical_epsilon(noise_multiplier: float, max_grad_norm: float, delta: float) -> float:
    """ε of the audited mechanism — one Gaussian step, sensitivity C, no subsampling — by
    FedFuse's own accountant (∞ without noise)."""
    if noise_multiplier <= 0:
        return math.inf
    return epsilon([Mechanism(noise_multiplier, 1.0, 1, max_grad_norm)], delta)


# A step whose measured noise spread or clipped canary mean is off the record by more than
# this share (and by more than SAMPLING_SIGMAS standard errors of its estimate) is flagged:
# far outside sampling error at any trial count used here (1.6 % and 2 % of C at σ = 1 with
# the self-test's trials), yet well inside the bugs worth catching (σ halved, C off).
RATIO_TOLERANCE = 0.1
SAMPLING_SIGMAS = 6.0


@dataclass(frozen=True)
class StepAudit:
    """One mechanism's audit: the trials, the test's errors, the bound against the theory, and
    the noise and clipping measured against the record (each as a ratio, 1 when as recorded).
    ``problems`` names each way the step differs from its record (empty: consistent)."""

    noise_multiplier: float
    max_grad_norm: float
    delta: float
    confidence: float
    trials: int
    canaries_in: int
    false_positives: int
    false_negatives: int
    mu_lower_bound: float
    mu_theoretical: float
    epsilon_lower_bound: float
    epsilon_theoretical: float
    noise_ratio: float
    clip_ratio: float
    problems: tuple[str, ...]

    @property
    def flagged(self) -> bool:
        return bool(self.problems)


def _off(ratio: float, standard_error: float) -> bool:
    """Whether a measured ratio (1 when as recorded) is off beyond tolerance and sampling."""
    return abs(ratio - 1) > max(RATIO_TOLERANCE, SAMPLING_SIGMAS * standard_error)


def _problems(
    eps: float,
    theory: float,
    noise_ratio: float,
    without: int,
    clip_ratio: float,
    with_canary: int,
    noise_multiplier: float,
) -> tuple[str, ...]:
    """Each way the step differs from its record, from the test's summary figures."""
    problems = []
    if eps > theory:
        problems.append(f"leaks more than recorded (ε ≥ {eps:.4f} > {theory:.4f} of one step)")
    if _off(noise_ratio, 1 / math.sqrt(2 * max(without, 1))):
        problems.append(f"noise {noise_ratio:.3g}× the recorded σ·C")
    if not with_canary or _off(clip_ratio, noise_multiplier / math.sqrt(with_canary)):
        problems.append(f"a canary's clipped contribution {clip_ratio:.3g}× the recorded C")
    return tuple(problems)


def bound_verdict(record: dict[str, Any]) -> tuple[str, ...] | None:
    """The problems a recorded test's own numbers imply, recomputed (the auditor's check that a
    ledger's self-test verdict follows from its figures); None when a figure is missing."""
    try:
        trials, positives = int(record["trials"]), int(record["canaries_in"])
        mu = mu_lower_bound(
            int(record["false_positives"]),
            trials - positives,
            int(record["false_negatives"]),
            positives,
            float(record["confidence"]),
        )
        sigma, clip = float(record["noise_multiplier"]), float(record["max_grad_norm"])
        theory = theoretical_epsilon(sigma, clip, float(record["delta"]))
        eps = gdp_epsilon(mu, float(record["delta"]))
        noise_ratio, clip_ratio = float(record["noise_ratio"]), float(record["clip_ratio"])
    except (KeyError, TypeError, ValueError):
        return None
    return _problems(eps, theory, noise_ratio, trials - positives, clip_ratio, positives, sigma)


def bound(
    observed: np.ndarray,
    included: np.ndarray,
    noise_multiplier: float,
    max_grad_norm: float,
    delta: float,
    confidence: float,
) -> StepAudit:
    """The midpoint test on the recorded canary coordinates, what it certifies, and the
    noise (spread where no canary was) and clipping (mean where one was) against the record."""
    guessed = observed > max_grad_norm / 2
    false_positives = int((guessed & ~included).sum())
    false_negatives = int((~guessed & included).sum())
    positives = int(included.sum())
    mu = mu_lower_bound(
        false_positives, included.size - positives, false_negatives, positives, confidence
    )
    eps = gdp_epsilon(mu, delta)
    theory = theoretical_epsilon(noise_multiplier, max_grad_norm, delta)
    noise, clipped = observed[~included], observed[included]
    scale = noise_multiplier * max_grad_norm  # the recorded noise's standard deviation
    spread = float(noise.std()) if noise.size else 0.0
    noise_ratio = spread / scale if scale > 0 else (1.0 if spread == 0 else math.inf)
    clip_ratio = float(clipped.mean()) / max_grad_norm if clipped.size else math.nan
    problems = _problems(
        eps, theory, noise_ratio, noise.size, clip_ratio, clipped.size, noise_multiplier
    )
    return StepAudit(
        noise_multiplier=noise_multiplier,
        max_grad_norm=max_grad_norm,
        delta=delta,
        confidence=confidence,
        trials=included.size,
        canaries_in=positives,
        false_positives=false_positives,
        false_negatives=false_negatives,
        mu_lower_bound=mu,
        mu_theoretical=1 / noise_multiplier if noise_multiplier > 0 else math.inf,
        epsilon_lower_bound=eps,
        epsilon_theoretical=theory,
        noise_ratio=noise_ratio,
        clip_ratio=clip_ratio,
        problems=tuple(problems),
    )
