"""The evaluation protocol applied to any scorer: ranking (HR@10, NDCG@10, MRR) + AUC/LogLoss."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from common.metrics import pointwise_metrics, rank_of_positive, ranking_metrics
from common.model import Scorer, TextFeaturizer
from common.task import Example, PlatformTask, RankingCase


class CountScorer:
    """Ranks items by a per-item count (popularity; unknown items 0). No model, no training:
    the yardstick every learned scorer has to beat, scored by the same protocol."""

    training = False

    def __init__(self, counts: dict[str, float]) -> None:
        self.counts = counts

    def eval(self) -> None:
        """Nothing to switch: the evaluation protocol calls it on every scorer."""

    def train(self, mode: bool = True) -> None:
        """Nothing to switch: the evaluation protocol calls it on every scorer."""

    def score_cases(
        self, featurizer: TextFeaturizer, cases: Sequence[RankingCase], batch_size: int
    ) -> list[np.ndarray]:
        return [np.array([self.counts.get(i, 0.0) for i in case.candidates]) for case in cases]

    def score_examples(
        self, featurizer: TextFeaturizer, examples: Sequence[Example], batch_size: int
    ) -> np.ndarray:
        return np.log1p(np.clip([self.counts.get(e.candidate, 0.0) for e in examples], 0, None))


def sample_cases(cases: list[RankingCase], max_cases: int, seed: int = 0) -> list[RankingCase]:
    """A fixed random subset (same for every method and run), or all cases when max_cases is 0."""
    if not max_cases or max_cases >= len(cases):
        return cases
    keep = np.sort(np.random.default_rng(seed).permutation(len(cases))[:max_cases])
    return [cases[k] for k in keep]


def evaluate(
    scorer: Scorer,
    featurizer: TextFeaturizer,
    task: PlatformTask,
    split: str = "test",
    batch_size: int = 128,
    max_cases: int = 0,
    k: int = 10,
) -> dict[str, float]:
    """Protocol metrics of ``scorer`` on a platform's ``valid`` or ``test`` split."""
    was_training = scorer.training
    scorer.eval()
    try:
        cases = sample_cases(task.ranking(split), max_cases)
        scores = scorer.score_cases(featurizer, cases, batch_size) if cases else []
        ranks = [rank_of_positive(s[0], s[1:]) for s in scores]
        examples = task.split(split)
        if max_cases:  # pointwise metrics on the same sampled users as the ranking cases
            users = {case.user for case in cases}
            examples = [e for e in examples if e.user in users]
        logits = scorer.score_examples(featurizer, examples, batch_size)
        labels = np.asarray([e.label for e in examples], dtype=np.int64)
    finally:
        scorer.train(was_training)
    ranking = ranking_metrics(ranks, k)
    pointwise = pointwise_metrics(labels, logits)
    return {
        **{key: value for key, value in ranking.items() if key != "n"},
        "auc": pointwise["auc"],
        "logloss": pointwise["logloss"],
        "ranking_cases": float(ranking["n"]),
        "examples": float(pointwise["n"]),
    }
