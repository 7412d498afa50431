"""Evaluation metrics for FedFuse recommenders.

Two families are provided:

* Ranking metrics (HR@k, NDCG@k, MRR) for the leave-one-out protocol in which one held-out
  positive item is ranked against sampled negatives.
* Pointwise metrics (ROC AUC, log loss) for click-style binary labels scored by a model that
  outputs logits.

Everything is pure numpy (plus ``scipy.stats.rankdata``) so that clients and the server compute
identical numbers without depending on a training framework.
"""

from collections.abc import Sequence

import numpy as np
from scipy.stats import rankdata

__all__ = [
    "auc",
    "log_loss",
    "log_loss_from_logits",
    "pointwise_metrics",
    "rank_of_positive",
    "ranking_metrics",
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


def rank_of_positive(positive_score: float, negative_scores: np.ndarray) -> float:
    """Return the 1-based rank of the positive among itself and the negatives (higher = better).

    Ties count as half a position each, i.e. the expected rank under random tie-breaking:
    ``1 + #(neg > pos) + 0.5 * #(neg == pos)``. Optimistic tie-breaking would let a constant
    (untrained or collapsed) scorer reach HR = 1; pessimistic tie-breaking would penalise
    legitimately tied scores. The expected rank gives a constant scorer exactly chance level.
    """
    pos = float(positive_score)
    if not np.isfinite(pos):
        raise ValueError(f"positive_score must be finite, got {pos}")
    neg = _as_1d_float(negative_scores, "negative_scores")
    _check_finite(neg, "negative_scores")
    greater = np.count_nonzero(neg > pos)
    equal = np.count_nonzero(neg == pos)
    return 1.0 + float(greater) + 0.5 * float(equal)


def ranking_metrics(ranks: ArrayLike, k: int = 10) -> dict[str, float]:
    """Compute HR@k, NDCG@k and (untruncated) MRR from per-case ranks of a single relevant item.

    With one relevant item the ideal DCG is 1, so NDCG@k reduces to ``1 / log2(rank + 1)`` inside
    the cut-off. Fractional ranks from ``rank_of_positive`` go through the same formulas, so a
    tie is never scored as an outright win. Empty input yields NaN metrics rather than a
    misleading 0, so an evaluation that saw no data cannot pass for a bad model.
    """
    if isinstance(k, bool) or not isinstance(k, int | np.integer) or k < 1:
        raise ValueError(f"k must be a positive integer, got {k!r}")
    r = _as_1d_float(ranks, "ranks")
    _check_finite(r, "ranks")
    if np.any(r < 1):
        raise ValueError(f"ranks must be >= 1 (1-based), got minimum {r.min()}")
    n = int(r.size)
    if n == 0:
        nan = float("nan")
        return {f"hr@{k}": nan, f"ndcg@{k}": nan, "mrr": nan, "n": 0}
    hit = r <= k
    ndcg = np.where(hit, 1.0 / np.log2(r + 1.0), 0.0)
    return {
        f"hr@{k}": float(np.mean(hit)),
        f"ndcg@{k}": float(np.mean(ndcg)),
        "mrr": float(np.mean(1.0 / r)),
        "n": n,
    }


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
