"""The evaluation protocol: sampled and full-catalogue ranking, ties, per-case output."""

from __future__ import annotations

import math

import numpy as np
import pytest

from common.evaluation import CountScorer, evaluate
from common.task import Example, PlatformTask, RankingCase


def _task() -> PlatformTask:
    """Items a..f; user u liked a and b before, the held-out positive is c."""
    case = RankingCase("u", ("b", "a"), "c", ("d", "e"))
    other = RankingCase("v", (), "f", ("a", "b"))
    return PlatformTask(
        "p",
        test=[Example("u", ("b", "a"), "c", 1), Example("v", (), "f", 1)],
        test_ranking=[case, other],
        catalogue=("a", "b", "c", "d", "e", "f"),
        seen={"u": frozenset({"a", "b", "c"}), "v": frozenset({"f"})},
    )


def test_full_catalogue_masks_the_users_own_items() -> None:
    # a and b (u's history) score highest but are masked: c is first among d, e, f for u;
    # f is ranked after a, b, c, d (4 above), e below it, for v.
    counts = {"a": 10.0, "b": 9.0, "c": 5.0, "d": 4.0, "e": 1.0, "f": 2.0}
    metrics = evaluate(CountScorer(counts), None, _task(), "test", per_case=True)  # type: ignore[arg-type]
    assert metrics["full-ndcg@10"] == pytest.approx((1.0 + 1 / math.log2(6)) / 2)
    assert metrics["full-recall@20"] == pytest.approx(1.0)
    assert metrics["cases"]["user"] == ["u", "v"]
    assert metrics["cases"]["full-ndcg@10"] == pytest.approx([1.0, 1 / math.log2(6)])
    # among the sampled negatives only: u's c beats d and e, v's f loses to a and b
    assert metrics["cases"]["ndcg@10"] == pytest.approx([1.0, 1 / math.log2(4)])


def test_a_constant_scorer_scores_chance_on_both_rankings() -> None:
    metrics = evaluate(CountScorer({}), None, _task(), "test")  # type: ignore[arg-type]
    # sampled: 3 tied candidates; full: u has 3 unmasked rivals... c among c, d, e, f
    sampled = sum(1 / math.log2(p + 1) for p in range(1, 4)) / 3
    assert metrics["ndcg@10"] == pytest.approx(sampled)
    full_u = sum(1 / math.log2(p + 1) for p in range(1, 5)) / 4  # c, d, e, f
    full_v = sum(1 / math.log2(p + 1) for p in range(1, 7)) / 6  # all six
    assert metrics["full-ndcg@10"] == pytest.approx((full_u + full_v) / 2)
    assert "cases" not in metrics


def test_sampled_evaluation_skips_the_full_catalogue() -> None:
    metrics = evaluate(CountScorer({}), None, _task(), "test", max_cases=1)  # type: ignore[arg-type]
    assert "full-ndcg@10" not in metrics and metrics["ranking_cases"] == 1


def test_the_generic_catalogue_path_equals_a_direct_one() -> None:
    counts = {"a": 3.0, "b": 1.0, "c": 2.0, "d": 2.0, "e": 0.0, "f": 5.0}

    class ListOnly:
        """A scorer without ``score_catalogue``: scored through long candidate lists."""

        training = False

        def eval(self) -> None: ...

        def train(self, mode: bool = True) -> None: ...

        def score_cases(self, featurizer, cases, batch_size):  # noqa: ANN001
            return [np.array([counts[i] for i in c.candidates]) for c in cases]

        def score_examples(self, featurizer, examples, batch_size):  # noqa: ANN001
            return np.array([counts[e.candidate] for e in examples])

    task = _task()
    direct = evaluate(CountScorer(counts), None, task, "test")  # type: ignore[arg-type]
    generic = evaluate(ListOnly(), None, task, "test")  # type: ignore[arg-type]
    for key in ("full-ndcg@10", "full-recall@20", "ndcg@10"):
        assert generic[key] == pytest.approx(direct[key])
