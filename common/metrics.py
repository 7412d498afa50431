"""Evaluation metrics for FedFuse recommenders.

Two families are provided:

* Ranking metrics (HR@k, NDCG@k, MRR) of one held-out positive ranked against negatives
  (sampled ones, or the whole catalogue), ties broken at random in expectation.
* Pointwise metrics (ROC AUC, log loss) for click-style binary labels scored by a model that
  outputs logits.

Everything is pure numpy (plus ``scipy.stats.rankdata``) so that clients and the server compute
identical numbers without depending on a training framework.
"""

from collections.abc import Sequence

import numpy as np
from scipy.special import digamma
from scipy.stats import rankdata

__all__ = [
    "auc",
    "log_loss",
    "log_loss_from_logits",
    "pointwise_metrics",
    "case_metrics",
    "list_metrics",
    "ranking_metrics",
    "tie_counts",
]

ArrayLike = Sequence[float] | np.ndarray


def _as_1d_float(values: ArrayLike, name: str) -> np.ndarray:
    """Convert to a 1-D float64 array so that all metrics run on one well-defined dtype."""
    arr = np.asarray(values, dtype=np.float64)
    if arr.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {arr.shape}")
    return arr


def _check_finite(arr: np.ndarray, name: str) -> None:
    """Reject NaN/inf: they would silently poison means and comparisons."""
    if not np.all(np.isfinite(arr)):
        bad = int(np.count_nonzero(~np.isfinite(arr)))
        raise ValueError(f"{name} must be finite, found {bad} non-finite value(s)")


def _labels_and_values(
    labels: ArrayLike, values: ArrayLike, values_name: str
) -> tuple[np.ndarray, np.ndarray]:
    """Validate a (labels, values) pair shared by all pointwise metrics."""
    y = _as_1d_float(labels, "labels")
    v = _as_1d_float(values, values_name)
    if y.shape != v.shape:
        raise ValueError(
            f"labels and {values_name} must have the same length, got {y.size} and {v.size}"
        )
    if not np.all(np.isin(y, (0.0, 1.0))):
        raise ValueError("labels must contain only 0 and 1")
    _check_finite(v, values_name)
    return y, v


def tie_counts(positive_score: float, negative_scores: ArrayLike) -> tuple[int, int]:
    """How many negatives score strictly above the positive, and how many exactly tie it."""
    pos = float(positive_score)
    if not np.isfinite(pos):
        raise ValueError(f"positive_score must be finite, got {pos}")
    neg = _as_1d_float(negative_scores, "negative_scores")
    _check_finite(neg, "negative_scores")
    return int(np.count_nonzero(neg > pos)), int(np.count_nonzero(neg == pos))


def _discount_prefix(k: int) -> np.ndarray:
    """``D[n] = sum_{p=1..n} 1/log2(p+1)`` for n = 0..k: NDCG@k's gain summed over positions."""
    return np.concatenate([[0.0], np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))])


def _harmonic(n: np.ndarray) -> np.ndarray:
    """H(n) = sum_{p=1..n} 1/p for integer arrays (exact through the digamma function)."""
    return digamma(n + 1.0) + np.euler_gamma


def case_metrics(greater: ArrayLike, equal: ArrayLike, k: int = 10) -> dict[str, np.ndarray]:
    """Per-case HR@k, NDCG@k and MRR of a single relevant item, each the metric's expectation
    over a uniformly random order of the candidates tied with it.

    The positive's position is uniform on ``greater + 1 .. greater + equal + 1``, so each
    metric is its mean over those positions — not the metric of the mean position, which
    scores a constant scorer 0 where chance is NDCG@10 ≈ 0.045 among 100 candidates.
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    g = _as_1d_float(greater, "greater")
    e = _as_1d_float(equal, "equal")
    if g.shape != e.shape:
        raise ValueError(f"greater and equal must have the same length, got {g.size}, {e.size}")
    _check_finite(g, "greater")
    _check_finite(e, "equal")
    if np.any(g < 0) or np.any(e < 0) or np.any(g % 1) or np.any(e % 1):
        raise ValueError("greater and equal must be counts (non-negative integers)")
    spread = e + 1.0  # positions the tie spreads the positive over
    first, last = g, g + e + 1.0  # positions first + 1 .. last
    prefix = _discount_prefix(int(k))
    inside = lambda n: np.minimum(n, k).astype(np.int64)  # noqa: E731
    return {
        f"hr@{k}": (np.minimum(last, k) - np.minimum(first, k)) / spread,
        f"ndcg@{k}": (prefix[inside(last)] - prefix[inside(first)]) / spread,
        "mrr": (_harmonic(last) - _harmonic(first)) / spread,
    }


def list_metrics(scores: Sequence[np.ndarray], k: int = 10) -> dict[str, np.ndarray]:
    """:func:`case_metrics` of ranked lists, each a scorer's scores with the positive's first."""
    counts = np.array([tie_counts(s[0], s[1:]) for s in scores], dtype=np.int64).reshape(-1, 2)
    return case_metrics(counts[:, 0], counts[:, 1], k)


def ranking_metrics(greater: ArrayLike, equal: ArrayLike, k: int = 10) -> dict[str, float]:
    """Mean HR@k, NDCG@k and (untruncated) MRR over cases given by :func:`tie_counts`.

    Empty input yields NaN metrics rather than a misleading 0, so an evaluation that saw no
    data cannot pass for a bad model.
    """
    per_case = case_metrics(greater, equal, k)
    n = int(next(iter(per_case.values())).size)
    if n == 0:
        return {name: float("nan") for name in per_case} | {"n": 0}
    return {name: float(np.mean(values)) for name, values in per_case.items()} | {"n": n}


def auc(labels: ArrayLike, scores: ArrayLike) -> float:
    """Compute ROC AUC via the Mann-Whitney U statistic, counting tied pairs as 1/2.

    Average ranks make ties neutral, so a constant scorer gets exactly 0.5. Returns NaN when only
    one class is present because AUC is undefined there (and 0 or 1 would bias averages).
    """
    y, s = _labels_and_values(labels, scores, "scores")
    pos = y == 1.0
    n_pos = int(np.count_nonzero(pos))
    n_neg = int(y.size - n_pos)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ranks = rankdata(s, method="average")
    u = float(np.sum(ranks[pos])) - n_pos * (n_pos + 1) / 2.0
    return u / (n_pos * n_neg)


def log_loss(labels: ArrayLike, probabilities: ArrayLike, eps: float = 1e-7) -> float:
    """Mean binary cross-entropy on probabilities, clipped to ``[eps, 1 - eps]``.

    Clipping keeps a single confident mistake from producing an infinite loss. Prefer
    ``log_loss_from_logits`` when logits are available: it needs no clipping.
    """
    if not 0.0 < eps < 0.5:
        raise ValueError(f"eps must be in (0, 0.5), got {eps}")
    y, p = _labels_and_values(labels, probabilities, "probabilities")
    if np.any((p < 0.0) | (p > 1.0)):
        raise ValueError("probabilities must lie in [0, 1]")
    if y.size == 0:
        return float("nan")
    p = np.clip(p, eps, 1.0 - eps)
    return float(-np.mean(y * np.log(p) + (1.0 - y) * np.log1p(-p)))


def log_loss_from_logits(labels: ArrayLike, logits: ArrayLike) -> float:
    """Mean binary cross-entropy computed directly from logits.

    Uses ``softplus(z) - y * z`` (``softplus`` via ``logaddexp``), which equals
    ``-[y log sigmoid(z) + (1 - y) log(1 - sigmoid(z))]`` but never overflows or takes log(0),
    so large-magnitude logits get their exact loss instead of a clipped one.
    """
    y, z = _labels_and_values(labels, logits, "logits")
    if y.size == 0:
        return float("nan")
    return float(np.mean(np.logaddexp(0.0, z) - y * z))


def pointwise_metrics(labels: ArrayLike, logits: ArrayLike) -> dict[str, float]:
    """Compute AUC and log loss from model logits (AUC is invariant to the sigmoid)."""
    y, z = _labels_and_values(labels, logits, "logits")
    return {"auc": auc(y, z), "logloss": log_loss_from_logits(y, z), "n": int(y.size)}
