"""Tests for common.metrics against hand-computed values."""

import math

import numpy as np
import pytest

from common.metrics import (
    auc,
    case_metrics,
    log_loss,
    log_loss_from_logits,
    pointwise_metrics,
    ranking_metrics,
    tie_counts,
)

# ---------------------------------------------------------------- tie_counts


def test_tie_counts_counts_greater_and_equal_negatives():
    assert tie_counts(0.5, np.array([0.9, 0.5, 0.5, 0.1, 0.7])) == (2, 2)
    assert tie_counts(0.3, np.array([])) == (0, 0)


@pytest.mark.parametrize(
    ("pos", "neg"),
    [(float("nan"), np.array([0.1])), (0.1, np.array([0.2, np.inf])), (0.1, np.zeros((2, 2)))],
)
def test_tie_counts_rejects_bad_input(pos, neg):
    with pytest.raises(ValueError):
        tie_counts(pos, neg)


# ---------------------------------------------------------------- ranking_metrics


def _ranks(*ranks: int) -> tuple[list[int], list[int]]:
    """Untied ranks as (greater, equal) counts."""
    return [r - 1 for r in ranks], [0] * len(ranks)


def test_ranking_metrics_hand_values():
    m = ranking_metrics(*_ranks(1, 3, 11), k=10)
    assert set(m) == {"hr@10", "ndcg@10", "mrr", "n"}
    assert m["hr@10"] == pytest.approx(2 / 3)
    # (1/log2(2) + 1/log2(4) + 0) / 3 = (1 + 0.5) / 3 = 0.5
    assert m["ndcg@10"] == pytest.approx(0.5)
    # MRR is not truncated at k: rank 11 still contributes 1/11.
    assert m["mrr"] == pytest.approx((1 + 1 / 3 + 1 / 11) / 3)
    assert m["n"] == 3


def test_ranking_metrics_cutoff_is_inclusive_and_key_follows_k():
    m = ranking_metrics(*_ranks(5, 6), k=5)
    assert set(m) == {"hr@5", "ndcg@5", "mrr", "n"}
    assert m["hr@5"] == pytest.approx(0.5)
    assert m["ndcg@5"] == pytest.approx((1 / math.log2(6)) / 2)


def test_constant_scorer_scores_chance_not_zero():
    # 99 tied negatives: the positive is equally likely at each of the 100 positions.
    m = ranking_metrics([0], [99], k=10)
    assert m["hr@10"] == pytest.approx(0.1)
    chance = sum(1 / math.log2(p + 1) for p in range(1, 11)) / 100
    assert m["ndcg@10"] == pytest.approx(chance)
    assert m["ndcg@10"] == pytest.approx(0.0454, abs=1e-4)
    assert m["mrr"] == pytest.approx(sum(1 / p for p in range(1, 101)) / 100)


def test_a_tie_is_the_average_over_random_orderings():
    # One negative above, two tied: positions 2, 3, 4 equally likely.
    m = ranking_metrics([1], [2], k=3)
    assert m["hr@3"] == pytest.approx(2 / 3)
    assert m["ndcg@3"] == pytest.approx((1 / math.log2(3) + 1 / math.log2(4)) / 3)
    assert m["mrr"] == pytest.approx((1 / 2 + 1 / 3 + 1 / 4) / 3)


def test_expected_metrics_match_a_simulation_of_random_tie_breaking():
    rng = np.random.default_rng(0)
    scores = rng.integers(0, 4, size=(400, 30)).astype(float)  # many ties
    greater, equal = zip(*(tie_counts(s[0], s[1:]) for s in scores), strict=True)
    expected = case_metrics(greater, equal, k=5)
    draws = []
    for _ in range(300):
        jitter = scores + rng.random(scores.shape) * 1e-3  # a random order within each tie
        g, e = zip(*(tie_counts(s[0], s[1:]) for s in jitter), strict=True)
        draws.append(case_metrics(g, e, k=5)["ndcg@5"].mean())
    assert np.mean(draws) == pytest.approx(expected["ndcg@5"].mean(), abs=3e-3)


def test_ranking_metrics_empty_is_nan():
    m = ranking_metrics([], [], k=10)
    assert math.isnan(m["hr@10"])
    assert math.isnan(m["ndcg@10"])
    assert math.isnan(m["mrr"])
    assert m["n"] == 0


@pytest.mark.parametrize(
    ("greater", "equal"),
    [([0.5], [0]), ([-1], [0]), ([1], [-2]), ([float("nan")], [0]), ([1, 2], [0]), ([[1]], [[0]])],
)
def test_ranking_metrics_rejects_invalid_counts(greater, equal):
    with pytest.raises(ValueError):
        ranking_metrics(greater, equal)


@pytest.mark.parametrize("k", [0, -1, 2.5, True])
def test_ranking_metrics_rejects_invalid_k(k):
    with pytest.raises(ValueError, match="k must be"):
        ranking_metrics([0], [0], k=k)


# ---------------------------------------------------------------- auc


def test_auc_hand_worked_with_tie():
    # (pos, neg) pairs: (0.9, 0.9)=0.5, (0.9, 0.1)=1, (0.3, 0.9)=0, (0.3, 0.1)=1 -> 2.5 / 4.
    assert auc([1, 0, 1, 0], [0.9, 0.9, 0.3, 0.1]) == pytest.approx(0.625)


def test_auc_unbalanced_hand_value():
    # One positive at 0.6 vs negatives 0.2, 0.7, 0.5: wins 2 of 3 pairs.
    assert auc([0, 1, 0, 0], [0.2, 0.6, 0.7, 0.5]) == pytest.approx(2 / 3)


def test_auc_perfect_and_inverted():
    labels = [0, 0, 1, 1, 0, 1]
    scores = np.array([0.1, 0.2, 0.8, 0.9, 0.3, 0.7])
    assert auc(labels, scores) == 1.0
    assert auc(labels, -scores) == 0.0


def test_auc_constant_scores_is_half():
    assert auc([0, 1, 1, 0, 1], np.full(5, 3.0)) == pytest.approx(0.5)


def test_auc_matches_brute_force_pair_count():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 2, size=60)
    scores = rng.integers(0, 8, size=60).astype(float)  # many ties
    pos, neg = scores[labels == 1], scores[labels == 0]
    diff = pos[:, None] - neg[None, :]
    expected = (np.sum(diff > 0) + 0.5 * np.sum(diff == 0)) / diff.size
    assert auc(labels, scores) == pytest.approx(expected)


@pytest.mark.parametrize("labels", [[1, 1, 1], [0, 0], []])
def test_auc_single_class_or_empty_is_nan(labels):
    assert math.isnan(auc(labels, np.linspace(0, 1, len(labels))))


# ---------------------------------------------------------------- log loss


def test_log_loss_hand_value():
    # -(log 0.8 + log(1 - 0.4)) / 2
    expected = -(math.log(0.8) + math.log(0.6)) / 2
    assert log_loss([1, 0], [0.8, 0.4]) == pytest.approx(expected)


def test_log_loss_clips_certain_mistakes():
    eps = 1e-7
    value = log_loss([1, 0], [0.0, 1.0], eps=eps)
    assert math.isfinite(value)
    assert value == pytest.approx(-math.log(eps))


def test_log_loss_from_logits_hand_value():
    # z = 0 -> sigmoid 0.5 -> loss log 2 for either label.
    assert log_loss_from_logits([1, 0], [0.0, 0.0]) == pytest.approx(math.log(2))
    # y=1, z=2: log(1 + e^-2); y=0, z=-1: log(1 + e^-1).
    expected = (math.log1p(math.exp(-2)) + math.log1p(math.exp(-1))) / 2
    assert log_loss_from_logits([1, 0], [2.0, -1.0]) == pytest.approx(expected)


def test_log_loss_logits_and_probabilities_agree():
    rng = np.random.default_rng(1)
    labels = rng.integers(0, 2, size=50)
    logits = rng.normal(scale=3.0, size=50)
    probs = 1.0 / (1.0 + np.exp(-logits))
    assert log_loss_from_logits(labels, logits) == pytest.approx(log_loss(labels, probs), rel=1e-9)


def test_log_loss_from_logits_is_stable_for_extreme_logits():
    # Exact loss for a confident mistake with |z| = 1000 is ~1000; no overflow, no clipping.
    value = log_loss_from_logits([1, 0], [-1000.0, 1000.0])
    assert value == pytest.approx(1000.0)
    assert log_loss_from_logits([1, 0], [1000.0, -1000.0]) == pytest.approx(0.0, abs=1e-300)


def test_log_loss_empty_is_nan():
    assert math.isnan(log_loss([], []))
    assert math.isnan(log_loss_from_logits([], []))


@pytest.mark.parametrize("probs", [[1.2, 0.5], [-0.1, 0.5]])
def test_log_loss_rejects_out_of_range_probabilities(probs):
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        log_loss([1, 0], probs)


# ---------------------------------------------------------------- pointwise_metrics


def test_pointwise_metrics_combines_auc_and_logloss():
    labels = [1, 0, 1, 0]
    logits = [2.0, 2.0, -0.5, -3.0]
    m = pointwise_metrics(labels, logits)
    assert set(m) == {"auc", "logloss", "n"}
    assert m["auc"] == pytest.approx(0.625)
    assert m["logloss"] == pytest.approx(log_loss_from_logits(labels, logits))
    assert m["n"] == 4


def test_pointwise_metrics_single_class_auc_is_nan_but_logloss_defined():
    m = pointwise_metrics([1, 1], [0.0, 0.0])
    assert math.isnan(m["auc"])
    assert m["logloss"] == pytest.approx(math.log(2))


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize("fn", [auc, log_loss, log_loss_from_logits, pointwise_metrics])
def test_length_mismatch_rejected(fn):
    with pytest.raises(ValueError, match="same length"):
        fn([1, 0, 1], [0.5, 0.5])


@pytest.mark.parametrize("fn", [auc, log_loss, log_loss_from_logits, pointwise_metrics])
@pytest.mark.parametrize("labels", [[1, 2], [1, -1], [1, 0.5], [1, float("nan")]])
def test_non_binary_labels_rejected(fn, labels):
    with pytest.raises(ValueError, match="0 and 1"):
        fn(labels, [0.5, 0.5])


@pytest.mark.parametrize("fn", [auc, log_loss, log_loss_from_logits, pointwise_metrics])
@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_scores_rejected(fn, bad):
    with pytest.raises(ValueError, match="finite"):
        fn([1, 0], [0.5, bad])


def test_boolean_labels_accepted():
    assert auc(np.array([True, False]), [0.9, 0.1]) == 1.0
