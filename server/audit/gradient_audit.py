"""White-box audit of the DP step: Dirac canary gradients through FedFuse's real DP-SGD step.

Why. The ledger records the mechanism the code says it ran (σ, q and steps read back from
Opacus' accountant, C from the configuration). A bug in clipping or noise leaves that record
self-consistent, so recomputing ε cannot see it, and the black-box canary audit
(``canary_audit.py``) sees only the final model, too weakly to notice (clipping switched off
came out clean). This audit looks inside the step instead, as the white-box auditor of Nasr et
al. ("Adversary Instantiation", 2021; "Tight Auditing of DPML", 2023) does: it adds crafted
gradients to a step and tests their presence in the noisy gradient the optimiser applies.

What runs. The real step, ``LocalTrainer._run_private`` with Opacus' ``DPOptimizer`` (hooks
mode), at a platform's recorded σ, C and privacy unit, on a tiny random BERT with the run's
scorer and objective and a handful of made-up examples, two per made-up user (the canaries
live in gradient space, so the model's weights and the data do not matter; the auditor needs
neither the platform's data nor its model). Under the user unit the rows the canaries join
are the per-user rows, each user's units already summed, so the audit tests the per-user
clipping and noise. Each step, every one of ``CANARIES_PER_STEP`` canaries joins the per-sample
gradients with probability ½ (seeded) as a row of its own: a Dirac gradient, ``CANARY_NORM``
× C in one coordinate of a trainable tensor and 0 elsewhere, so clipping must bind and cut it
to C. The real examples' rows get 0 in the canary coordinates (the auditor chooses the rest of
the data): each canary coordinate of the noisy sum is then that canary's clipped contribution
plus the noise alone. The learning rate is 0, so every step starts from the same model; with
fresh noise per step and coordinate the trials are independent and identically distributed.

The mechanism a trial audits is one noisy step with the canary inserted directly, without
sampling: the Gaussian mechanism with sensitivity C and noise σC, i.e. μ-Gaussian DP with
μ = 1/σ. Its ε at the ledger's δ (FedFuse's accountant, q = 1, one step) is the theory the
bound is compared with. That is not the ledger's cumulative ε: amplification by subsampling
and composition over steps are outside what one step can show.

The bound. The auditor guesses "in" when the canary coordinate exceeds C/2 (the midpoint,
fixed in advance). Clopper–Pearson gives upper bounds FPR⁺ and FNR⁺ on the two error rates,
each at level (1 − confidence)/2. Every μ-GDP mechanism has FNR ≥ Φ(Φ⁻¹(1 − FPR) − μ) for
every test, so μ ≥ μ⁻ = Φ⁻¹(1 − FPR⁺) − Φ⁻¹(FNR⁺) at the stated confidence (the Gaussian
DP estimate of Nasr et al. 2023). μ⁻ > 1/σ rejects the ledger's claim that the step is the
Gaussian mechanism with σ, with no further assumption; the ε lower bound is μ⁻'s ε at δ,
which is a lower bound on the step's ε when its privacy region is Gaussian. A bound above the
theoretical ε is *flagged*: the implementation leaks more than recorded. With m trials per
side the bound cannot exceed about μ = 2Φ⁻¹(1 − 3.7/m), which caps what it can certify
(docs/privacy.md: power and limits).
"""

from __future__ import annotations

import logging
import math
import re
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import lru_cache
from typing import Any

import numpy as np
import torch
from opacus.optimizers import DPOptimizer
from scipy.optimize import brentq
from scipy.stats import beta, norm
from torch import nn
from transformers.utils import logging as hf_logging

from client.dp_training import LocalTrainer
from client.ledger import DP_SGD, EXAMPLE, Mechanism, PrivacyLedger, epsilon
from common.config import DPConfig, LoraSettings, ModelConfig, RunConfig, TrainConfig, with_settings
from common.errors import FedFuseError
from common.model import Scorer, TextFeaturizer, build_scorer, load_backbone
from common.task import Example, training_units
from common.tiny_model import write_tiny_model

CANARY_NORM = 1e3  # a canary's gradient norm, in units of the recorded clip norm C
CANARIES_PER_STEP = 500
TRIALS = 20_000  # canary trials per audited mechanism (40 steps of 500 canaries)
SEED = 0  # canary coordinates, inclusion draws and the noise: the audit is reproducible
AUDIT_EXAMPLES = 8  # made-up real examples the step also trains on, 2 per made-up user
AUDIT_DP = {"expected_batch_size": 4, "max_examples_per_user": 2}  # q = ½ in either unit
# What the libraries say about the audit's own tiny model and step, not about the run audited:
# Opacus' secure-RNG reminder, torch's note on backward hooks, a transformers deprecation.
LIBRARY_NOTICES = (
    "Secure RNG turned off",
    "Full backward hook is firing",
    "`is_gradient_checkpointing` is deprecated",
)


class DiracCanaries:
    """The probe ``LocalTrainer`` hands its DP optimiser to.

    Before each clipping it zeroes the canary coordinates of the real rows and, on a logical
    batch's first clipping, appends that step's included canaries as rows of their own; after
    the noise (Opacus' step hook, before the optimiser applies the gradient) it records every
    canary coordinate of the privatised gradient, in units of the summed gradient.
    """

    def __init__(self, count: int, steps: int, clip: float, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.count = count
        self.value = CANARY_NORM * clip
        self.included = self.rng.random((steps, count)) < 0.5
        self.observed = np.full((steps, count), np.nan)
        self.step = 0
        self.batch_started = False
        self.places: list[tuple[np.ndarray, np.ndarray]] = []

    def __call__(self, optimizer: DPOptimizer) -> None:
        params = optimizer.params
        if not self.places:
            self.places = self._place(params)
        clip, account = optimizer.clip_and_accumulate, optimizer.step_hook

        def clip_with_canaries() -> None:
            self._insert(params)
            clip()

        def observe(opt: DPOptimizer) -> None:
            self._record(opt)
            if account is not None:
                account(opt)  # Opacus' accountant: the trainer counts its steps by it

        optimizer.clip_and_accumulate = clip_with_canaries  # this optimiser object only
        optimizer.attach_step_hook(observe)

    def _place(self, params: list[nn.Parameter]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Distinct coordinates over all trainable tensors, drawn once: per tensor, the ids
        of the canaries it holds and their flat indices."""
        sizes = np.array([p.numel() for p in params])
        if sizes.sum() < self.count:
            raise RuntimeError(f"{self.count} canaries need as many trainable coordinates")
        chosen = self.rng.choice(int(sizes.sum()), size=self.count, replace=False)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        owner = np.searchsorted(starts, chosen, side="right") - 1
        return [
            (np.flatnonzero(owner == i), chosen[owner == i] - starts[i]) for i in range(len(params))
        ]

    def _insert(self, params: list[nn.Parameter]) -> None:
        included = self.included[self.step] if not self.batch_started else np.zeros(0, bool)
        row = np.cumsum(included) - 1  # a canary's row among this step's included ones
        for param, (ids, flat) in zip(params, self.places, strict=True):
            sample = param.grad_sample
            rows = sample.reshape(len(sample), param.numel()).clone()
            rows[:, flat] = 0.0
            if included.any():
                extra = rows.new_zeros((int(included.sum()), rows.shape[1]))
                inside = included[ids]
                extra[row[ids[inside]], flat[inside]] = self.value
                rows = torch.cat([rows, extra])
            param.grad_sample = rows.view(len(rows), *param.shape)
        self.batch_started = True

    def _record(self, optimizer: DPOptimizer) -> None:
        scale = 1.0  # undo Opacus' mean reduction: the noisy *sum* of clipped rows
        if optimizer.loss_reduction == "mean":
            scale = optimizer.expected_batch_size * optimizer.accumulated_iterations
        for param, (ids, flat) in zip(optimizer.params, self.places, strict=True):
            values = param.grad.detach().reshape(-1)[torch.from_numpy(flat)]
            self.observed[self.step, ids] = values.cpu().double().numpy() * scale
        self.step += 1
        self.batch_started = False


# --- the bound ----------------------------------------------------------------------------


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


@dataclass(frozen=True)
class StepAudit:
    """One mechanism's audit: the trials, the test's errors, the bound against the theory."""

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
    flagged: bool


def bound(
    observed: np.ndarray,
    included: np.ndarray,
    noise_multiplier: float,
    max_grad_norm: float,
    delta: float,
    confidence: float,
) -> StepAudit:
    """The midpoint test on the recorded canary coordinates, and what it certifies."""
    guessed = observed > max_grad_norm / 2
    false_positives = int((guessed & ~included).sum())
    false_negatives = int((~guessed & included).sum())
    positives = int(included.sum())
    mu = mu_lower_bound(
        false_positives, included.size - positives, false_negatives, positives, confidence
    )
    eps = gdp_epsilon(mu, delta)
    theory = theoretical_epsilon(noise_multiplier, max_grad_norm, delta)
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
        flagged=eps > theory,
    )


# --- the audited step ---------------------------------------------------------------------


@contextmanager
def _quiet() -> Iterator[None]:
    """Without the libraries' notices, and without Opacus' log line when the audit's own
    Poisson draw leaves a round's first batch empty (one audit in 16 with 4 made-up users)."""
    loader_log = logging.getLogger("opacus.data_loader")
    level = loader_log.level
    loader_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for notice in LIBRARY_NOTICES:
                warnings.filterwarnings("ignore", message=re.escape(notice))
            yield
    finally:
        loader_log.setLevel(level)


@lru_cache(maxsize=4)
def _audit_model(scorer: str, private_factors: int) -> tuple[Scorer, TextFeaturizer]:
    """A tiny random BERT under FedFuse's ``scorer`` (with the run's private item factors, so
    the run's ``dp.gradient_scales`` find their tensors), dropout off (the forward pass then
    draws nothing from torch's generator, so the seeded noise is the same whatever the Poisson
    sample). Built once per process; the audit's learning rate of 0 never changes it."""
    hf_logging.disable_progress_bar()
    with _quiet(), tempfile.TemporaryDirectory() as folder:
        backbone, tokenizer = load_backbone(str(write_tiny_model(folder)))
        config = ModelConfig(
            scorer=scorer, max_length=16, private_factors=private_factors, private_item_slots=8
        )
        model = build_scorer(backbone, config, LoraSettings(rank=4))
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    items = {f"i{k}": f"audit item {k}" for k in range(6)}
    return model, TextFeaturizer(tokenizer, items, max_length=16)


def _audit_examples(objective: str) -> list[Example]:
    """Made-up training units (a positive or negative with its own sampled negatives), two per
    user, so that the user-level step sums rows before clipping."""
    examples = [
        Example("", (f"i{k % 3}",), f"i{3 + k % 3}", k % 2, (f"i{(k + 1) % 3}",))
        for k in range(2 * AUDIT_EXAMPLES)
    ]
    units = training_units(examples, objective)[:AUDIT_EXAMPLES]
    return [replace(unit, user=f"u{k // 2}") for k, unit in enumerate(units)]


def run_canaries(
    noise_multiplier: float,
    max_grad_norm: float,
    config: RunConfig | None = None,
    trials: int = TRIALS,
    seed: int = SEED,
) -> DiracCanaries:
    """Run at least ``trials`` canary trials through the DP step at (σ, C); the probe holds
    what each canary coordinate of the noisy gradient was and whether that canary was in.

    ``config``: the run's configuration, for its scorer, objective, private item factors and
    gradient scales (default: FedFuse's).
    Torch's generator is seeded for the run, and one thread used (the tiny model's steps gain
    nothing from more, and threads thrash on a busy machine); both are restored afterwards.
    """
    config = config or RunConfig()
    scorer, featurizer = _audit_model(config.model.scorer, config.model.private_factors)
    steps = math.ceil(trials / CANARIES_PER_STEP)
    probe = DiracCanaries(CANARIES_PER_STEP, steps, max_grad_norm, seed)
    trainer = LocalTrainer(
        scorer,
        featurizer,
        _audit_examples(config.objective),
        TrainConfig(batch_size=2, adapter_every=1, optimizer="sgd"),
        DPConfig(
            max_grad_norm=max_grad_norm,
            clipping="hooks",
            unit=config.dp.unit,
            gradient_scales=config.dp.gradient_scales,
            **AUDIT_DP,
        ),
        probe,
    )
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _quiet(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            trainer.run(steps, learning_rate=0.0, noise_multiplier=noise_multiplier)
    finally:
        torch.set_num_threads(threads)
    return probe


def audit_dp_step(
    noise_multiplier: float,
    max_grad_norm: float,
    delta: float,
    confidence: float = 0.95,
    config: RunConfig | None = None,
    trials: int = TRIALS,
) -> StepAudit:
    """The canary trials at (σ, C) and the ε lower bound at δ they certify."""
    probe = run_canaries(noise_multiplier, max_grad_norm, config, trials)
    return bound(probe.observed, probe.included, noise_multiplier, max_grad_norm, delta, confidence)


def audit_ledger_steps(ledger: PrivacyLedger, config: RunConfig) -> list[dict[str, Any]]:
    """The white-box audit of each distinct DP-SGD mechanism (σ, C) a platform's ledger
    records (σ may change on a restart), in its privacy unit, next to the ledger's cumulative
    ε (an unrecognised unit, flagged by the audit, is audited as ``example``)."""
    unit = ledger.unit or EXAMPLE
    config = with_settings(config, dp={"unit": unit})
    mechanisms = dict.fromkeys(
        (m.noise_multiplier, m.max_grad_norm)
        for m in ledger.mechanisms()
        if m.kind == DP_SGD and m.steps > 0
    )
    rows = []
    for sigma, clip in mechanisms:
        if sigma < 0 or clip <= 0:
            raise FedFuseError(
                f"{ledger.path}: σ = {sigma:g}, C = {clip:g} is no DP-SGD step to audit"
            )
        result = audit_dp_step(sigma, clip, ledger.delta, config.audit.confidence, config)
        platform = str(ledger.header["platform"])
        rows.append(
            {
                "platform": platform,
                "privacy_unit": unit,
                **asdict(result),
                "epsilon_ledger": ledger.spent(),
            }
        )
    return rows
