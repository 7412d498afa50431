"""Empirical privacy check: an ε lower bound from one training run with canaries.

The one-run audit of Steinke, Nasr and Jagielski, "Privacy Auditing with One (1) Training
Run" (NeurIPS 2023). m canaries are each put into one platform's training data independently
with probability ½ (``client/canaries.py``). After training, the auditor scores every canary
with the trained model, guesses "included" for the k highest scores and "excluded" for the k
lowest (abstaining on the rest) and counts the correct guesses v out of r = 2k.

The paper's theorem: if training is (ε, δ)-DP with respect to each canary, then for every v

    P[correct ≥ v] ≤ f(v) + 2mδ · max_{i = 1..v} (f(v − i) − f(v)) / i,
    f(v) = P[Binomial(r, e^ε / (1 + e^ε)) ≥ v].

Observing v correct guesses therefore rejects "(ε, δ)-DP" at level β whenever that p-value is
below β; the lower bound is the largest such ε. It is valid whatever scores or guessing rule
are used, as long as the guesses depend only on the trained model and the canaries (never on
which canaries were included). k is taken from a small grid fixed in advance
(``GUESS_FRACTIONS``) and every k is tested at level β / |grid| (Bonferroni), so reporting
the best k after seeing the scores keeps the stated confidence. The δ term is the paper's
(approximate DP), as in the p-value routine the authors published with it.

The theoretical ε is the platform's cumulative ε from its own ledger (``client/ledger.py``); a
lower bound above it means the implementation leaks more than the accounting claims
(``flagged``). The bound is loose for correct DP-SGD (the auditor sees only the last model,
not every noisy step), so "not flagged" is no proof of privacy: the check catches gross errors
such as missing noise, not subtle ones. Written here rather than taken from a library because
neither Opacus nor dp-accounting ships this test.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
from scipy.stats import binom

from client.canaries import Canaries, canaries_for, score_canaries
from client.ledger import LEDGER_FILE, PrivacyLedger
from client.platform_client import PrivateTensors
from common.adapters import load_adapter, load_trainable_arrays, trainable_arrays
from common.atomic import atomic_write
from common.config import RunConfig
from common.errors import ConfigError
from common.featurizer import TextFeaturizer
from common.platform_data import federation_platforms
from common.scorers import Scorer
from common.sharing import private_names, shared_scorer

AUDIT_FILE = "canary_audit.json"
# Guesses per side as a share of the canaries, declared before any score is seen.
GUESS_FRACTIONS = (0.05, 0.1, 0.25, 0.5)
EPSILON_CEILING = 50.0  # beyond any ε a test of ≤ 10^6 guesses can certify


def p_value(m: int, r: int, v: int, epsilon: float, delta: float) -> float:
    """P[≥ v correct of r guesses] allowed by (ε, δ)-DP over m canaries (the paper's theorem)."""
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= v <= r <= m, got v={v}, r={r}, m={m}")
    q = 1.0 / (1.0 + math.exp(-epsilon))  # accuracy of ε-DP randomised response
    tail = float(binom.sf(v - 1, r, q))  # f(v) = P[Binomial(r, q) >= v]
    slack = 0.0
    if delta > 0 and v > 0:
        # f(v - i) - f(v) = P[v - i <= Binomial(r, q) <= v - 1], for i = 1..v
        below = np.cumsum(binom.pmf(np.arange(v - 1, -1, -1), r, q))
        slack = 2 * m * delta * float(np.max(below / np.arange(1, v + 1)))
    return min(1.0, tail + slack)


def epsilon_lower_bound(m: int, r: int, v: int, delta: float, beta: float) -> float:
    """Largest ε that v correct of r guesses reject at level β (0 if none): bisection.

    The p-value grows with ε (the guesser may be more accurate), so the rejected ε form an
    interval [0, bound).
    """
    if p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    low, high = 0.0, 1.0
    while p_value(m, r, v, high, delta) < beta:
        low, high = high, 2 * high
        if high > EPSILON_CEILING:
            return EPSILON_CEILING
    for _ in range(60):
        middle = (low + high) / 2
        low, high = (middle, high) if p_value(m, r, v, middle, delta) < beta else (low, middle)
    return low


@dataclass(frozen=True)
class AuditResult:
    """The best guess count of the grid and what it certifies."""

    canaries: int
    guesses: int
    correct: int
    epsilon_lower_bound: float
    per_side: int


def guess_counts(m: int) -> list[int]:
    """Guesses per side for m canaries: the pre-declared grid, rounded, without repeats."""
    return sorted({max(1, min(m // 2, round(f * m))) for f in GUESS_FRACTIONS})


def audit_scores(
    scores: np.ndarray, included: np.ndarray, delta: float, confidence: float
) -> AuditResult:
    """Guess from the scores (high = included), count, and bound ε at ``confidence``.

    Ties are broken by canary index, which is independent of the inclusion draw.
    """
    scores, included = np.asarray(scores, dtype=np.float64), np.asarray(included, dtype=bool)
    m = len(scores)
    if m < 2 or len(included) != m:
        raise ValueError(f"need at least 2 canaries with one inclusion bit each, got {m}")
    order = np.argsort(-scores, kind="stable")  # highest score first
    counts = guess_counts(m)
    beta = (1 - confidence) / len(counts)
    results = []
    for k in counts:
        correct = int(included[order[:k]].sum() + (~included[order[-k:]]).sum())
        bound = epsilon_lower_bound(m, 2 * k, correct, delta, beta)
        results.append(AuditResult(m, 2 * k, correct, bound, k))
    return max(results, key=lambda result: result.epsilon_lower_bound)  # first (fewest) on ties


def write_audit(run_dir: Path, confidence: float, platforms: list[dict[str, object]]) -> Path:
    """``RUN_DIR/canary_audit.json``, written atomically (the format ``fedfuse audit`` reads).

    A platform without DP claims ε = ∞, written ``Infinity`` as in ``metrics.jsonl``.
    """
    path = Path(run_dir) / AUDIT_FILE
    document = {"confidence": confidence, "platforms": platforms}
    atomic_write(path, json.dumps(document, indent=2) + "\n")
    return path


def platform_entry(
    platform: str, result: AuditResult, epsilon_theoretical: float, delta: float, **extra: object
) -> dict[str, object]:
    """One platform's line of the audit file; ``flagged`` when the bound beats the claim."""
    entry: dict[str, object] = {"platform": platform, **asdict(result)}
    entry |= {
        "epsilon_theoretical": epsilon_theoretical,
        "delta": delta,
        "flagged": result.epsilon_lower_bound > epsilon_theoretical,
    }
    return entry | extra


def check_audit_platform(config: RunConfig) -> None:
    """Refuse, before any training, to audit a platform the federation does not have."""
    if not config.audit.canaries:
        return
    names = [name for name, _ in federation_platforms(config.data)]
    if config.audit.canary_platform not in names:
        raise ConfigError(
            f"audit.canary_platform = {config.audit.canary_platform!r} is not one of {names}"
        )


def audited_model(
    config: RunConfig, canaries: Canaries, adapter_dir: Path
) -> tuple[Scorer, TextFeaturizer, str]:
    """The model the canaries are scored with, its featurizer, and a word on what it is.

    The final global adapter — what the world sees, post-processing of the platform's DP
    releases — plus whatever the strategy keeps private (the item factors and mixing weights of
    the recipe; fedsa's B and head too) from the platform's state folder, i.e. the model it
    serves: the private part comes out of the same DP-SGD, so the same ε covers it. Either way the
    auditor sees only the last model, not the noisy steps: the weakest (black-box) setting.
    """
    strategy = config.federation.strategy
    scorer, tokenizer = shared_scorer(config.model, config.lora, strategy)
    load_adapter(scorer, adapter_dir)
    private = private_names(trainable_arrays(scorer), strategy)
    described = "final global adapter"
    if private:
        state = Path(config.dp.state_dir) / config.audit.canary_platform
        stored = PrivateTensors(state, trainable_arrays(scorer, private)).load()
        load_trainable_arrays(scorer, stored, private)
        described += " + the platform's private part"
    featurizer = TextFeaturizer(tokenizer, canaries.item_text, config.model.max_length)
    return scorer, featurizer, described


def claimed_privacy(config: RunConfig) -> tuple[float, float]:
    """(ε, δ) the audited platform's ledger claims after the run.

    Without DP the claim is ε = ∞ (nothing to contradict) and the bound is for pure DP (δ = 0).
    A DP platform without a ledger never trained (e.g. budget exhausted at once): ε = 0.
    """
    if not config.dp.enabled:
        return math.inf, 0.0
    path = Path(config.dp.state_dir) / config.audit.canary_platform / LEDGER_FILE
    if not path.exists():
        return 0.0, config.dp.delta
    ledger = PrivacyLedger.load(path)
    return ledger.spent(), ledger.delta


def run_canary_audit(config: RunConfig, run_dir: Path, adapter_dir: Path) -> str:
    """Score the canaries with the final model, bound ε, write ``RUN_DIR/canary_audit.json``;
    returns a one-line summary for the log."""
    canaries = canaries_for(config, config.audit.canary_platform)
    if canaries is None:
        raise ConfigError("the canary audit needs audit.canaries > 0 and audit.canary_platform")
    scorer, featurizer, described = audited_model(config, canaries, adapter_dir)
    scores = score_canaries(scorer, featurizer, canaries, config.train.eval_batch_size)
    epsilon, delta = claimed_privacy(config)
    result = audit_scores(scores, canaries.included, delta, config.audit.confidence)
    entry = platform_entry(
        config.audit.canary_platform,
        result,
        epsilon,
        delta,
        canary_seed=canaries.seed,
        included=int(canaries.included.sum()),
        model=described,
        mean_score_included=_mean(scores[canaries.included]),
        mean_score_excluded=_mean(scores[~canaries.included]),
    )
    path = write_audit(run_dir, config.audit.confidence, [entry])
    claim = f"ledger ε = {epsilon:.3f}" if math.isfinite(epsilon) else "no DP claim"
    verdict = "FLAGGED: leaks more than claimed" if entry["flagged"] else "not flagged"
    return (
        f"canary audit of {entry['platform']}: {result.correct}/{result.guesses} "
        f"correct guesses on {result.canaries} canaries -> ε >= {result.epsilon_lower_bound:.3f} "
        f"at {config.audit.confidence:.0%} confidence ({claim}, δ = {delta:g}): {verdict} "
        f"({path.name})"
    )


def _mean(values: np.ndarray) -> float | None:
    return float(values.mean()) if len(values) else None
