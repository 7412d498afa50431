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
(docs/privacy.md: power and limits). The test is two-sided: a noise spread or clipped canary
mean off the record is flagged too (``client/step_bound.bound``).

Where. The probe and the trials live in ``client/step_check.py``, the bound in
``client/step_bound.py``: each platform runs them on its own step before it trains and records
the outcome in its ledger, which is the evidence of what *ran*. This module reruns them on the
auditor's machine, which shows what the code installed *here* does at the recorded parameters.
"""

from __future__ import annotations

from dataclasses import asdict
from typing import Any

from client.ledger import DP_SGD, EXAMPLE, PrivacyLedger
from client.step_bound import StepAudit, bound
from client.step_check import TRIALS, run_canaries
from common.config import RunConfig, with_settings
from common.errors import FedFuseError


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
                "flagged": result.flagged,
                "epsilon_ledger": ledger.spent(),
            }
        )
    return rows
