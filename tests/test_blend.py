"""The in-house + federation blend: standardised mixing, a weight fitted on validation."""

from __future__ import annotations

import numpy as np
import pytest

from common.evaluation import CountScorer, evaluate
from common.task import Example, PlatformTask, RankingCase
from server.simulation.blend import BlendScorer, fit_weight, standardise


def test_standardise_is_scale_free_and_a_constant_list_is_neutral() -> None:
    scores = np.array([[1.0, 2.0, 3.0], [5.0, 5.0, 5.0]])
    assert np.allclose(standardise(scores * 100 + 7)[0], standardise(scores)[0])
    assert np.allclose(standardise(scores)[1], 0.0)


class _ByUser:
    """Scores items from a per-user table (a stand-in for a trained model)."""

    training = False

    def __init__(self, table: dict[str, dict[str, float]]) -> None:
        self.table = table

    def eval(self) -> None: ...

    def train(self, mode: bool = True) -> None: ...

    def score_cases(self, featurizer, cases, batch_size):  # noqa: ANN001
        return [np.array([self.table[c.user].get(i, 0.0) for i in c.candidates]) for c in cases]

    def score_examples(self, featurizer, examples, batch_size):  # noqa: ANN001
        return np.array([self.table[e.user].get(e.candidate, 0.0) for e in examples])


def _cases(rng: np.random.Generator, n: int) -> list[RankingCase]:
    items = [f"i{k}" for k in range(20)]
    return [
        RankingCase(f"u{k}", (), items[k % 20], tuple(i for i in items if i != items[k % 20]))
        for k in range(n)
    ]


def test_the_fitted_weight_follows_the_model_that_knows_more() -> None:
    rng = np.random.default_rng(0)
    cases = _cases(rng, 200)
    # in-house: the positive gets a weak boost; other: a strong one, for every user
    weak = {
        c.user: {i: rng.normal() + (1.0 if i == c.positive else 0) for i in c.candidates}
        for c in cases
    }
    strong = {
        c.user: {i: rng.normal() + (3.0 if i == c.positive else 0) for i in c.candidates}
        for c in cases
    }
    weight, curve = fit_weight(_ByUser(weak), _ByUser(strong), None, cases)
    assert weight < 0.5 and curve[weight] >= max(curve[0.0], curve[1.0])
    # two independent noisy views of the same signal: the blend beats either alone
    assert curve[weight] > curve[0.0] and weight > 0.0


def test_a_blend_at_weight_one_ranks_as_the_inhouse_model() -> None:
    counts = {"a": 3.0, "b": 1.0, "c": 2.0}
    case = RankingCase("u", (), "c", ("a", "b"))
    task = PlatformTask(
        "p",
        test=[Example("u", (), "c", 1)],
        test_ranking=[case],
        catalogue=("a", "b", "c"),
        seen={"u": frozenset({"c"})},
    )
    blend = BlendScorer(CountScorer(counts), CountScorer({"c": 9.0}), 1.0)
    alone = evaluate(CountScorer(counts), None, task, "test")  # type: ignore[arg-type]
    mixed = evaluate(blend, None, task, "test")  # type: ignore[arg-type]
    for key in ("ndcg@10", "full-ndcg@10"):
        assert mixed[key] == pytest.approx(alone[key])
    other = evaluate(BlendScorer(CountScorer(counts), CountScorer({"c": 9.0}), 0.0), None, task)  # type: ignore[arg-type]
    assert other["ndcg@10"] == pytest.approx(1.0)
