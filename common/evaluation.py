"""The evaluation protocol applied to any scorer: ranking (HR@10, NDCG@10, MRR among sampled
negatives; NDCG@10 and Recall@20 over the whole catalogue) + AUC/LogLoss."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from common.featurizer import TextFeaturizer
from common.metrics import case_metrics, list_metrics, pointwise_metrics
from common.scorers import Scorer
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

    def score_catalogue(
        self,
        featurizer: TextFeaturizer,
        cases: Sequence[RankingCase],
        items: Sequence[str],
        batch_size: int,
    ) -> np.ndarray:
        row = np.array([self.counts.get(i, 0.0) for i in items], dtype=np.float64)
        return np.broadcast_to(row, (len(cases), len(items)))

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


FULL_K, FULL_RECALL_K = 10, 20  # full-catalogue NDCG@10 and Recall@20
CATALOGUE_CHUNK = 256  # cases scored against the whole catalogue at once (memory: chunk × items)


def catalogue_scores(
    scorer: Scorer,
    featurizer: TextFeaturizer,
    cases: Sequence[RankingCase],
    items: Sequence[str],
    batch_size: int,
) -> np.ndarray:
    """(cases, items) scores of every catalogue item for each case's user and history.

    A scorer with a ``score_catalogue`` method computes the matrix directly (the item tower
    scores one user vector against all item vectors); any other scorer is asked for the same
    scores as one long candidate list per case.
    """
    direct = getattr(scorer, "score_catalogue", None)
    if direct is not None:
        return np.asarray(direct(featurizer, cases, items, batch_size), dtype=np.float64)
    if not items:
        return np.zeros((len(cases), 0))
    lists = [RankingCase(c.user, c.history, items[0], tuple(items[1:])) for c in cases]
    return np.vstack(scorer.score_cases(featurizer, lists, batch_size)).astype(np.float64)


def full_catalogue_counts(
    scorer: Scorer,
    featurizer: TextFeaturizer,
    task: PlatformTask,
    cases: Sequence[RankingCase],
    batch_size: int,
) -> tuple[np.ndarray, np.ndarray]:
    """Each case's positive ranked against the platform's whole catalogue, the user's other
    items masked (``task.seen``): (greater, equal) counts for :func:`case_metrics`."""
    items = list(task.catalogue)
    column = {item: k for k, item in enumerate(items)}
    greater = np.zeros(len(cases), dtype=np.int64)
    equal = np.zeros(len(cases), dtype=np.int64)
    for start in range(0, len(cases), CATALOGUE_CHUNK):
        chunk = cases[start : start + CATALOGUE_CHUNK]
        scores = catalogue_scores(scorer, featurizer, chunk, items, batch_size)
        if not np.all(np.isfinite(scores)):
            raise ValueError("catalogue scores must be finite")
        rows, positives = np.arange(len(chunk)), [column[c.positive] for c in chunk]
        masked = np.zeros(scores.shape, dtype=bool)
        for row, case in enumerate(chunk):
            masked[row, [column[i] for i in task.seen.get(case.user, ()) if i in column]] = True
        masked[rows, positives] = True  # the positive is not its own rival
        positive = scores[rows, positives]
        rivals = ~masked
        greater[start : start + len(chunk)] = ((scores > positive[:, None]) & rivals).sum(1)
        equal[start : start + len(chunk)] = ((scores == positive[:, None]) & rivals).sum(1)
    return greater, equal


@dataclass
class CaseMetrics:
    """Per ranking case: its user and each metric's value (for intervals over users)."""

    users: list[str]
    values: dict[str, np.ndarray]

    def means(self) -> dict[str, float]:
        n = len(self.users)
        return {k: float(np.mean(v)) if n else float("nan") for k, v in self.values.items()}

    def record(self) -> dict[str, list]:
        """JSON-ready columns: ``user`` and one list per metric."""
        rounded = {k: [round(float(x), 6) for x in v] for k, v in self.values.items()}
        return {"user": list(self.users)} | rounded


def score_cases_metrics(
    scorer: Scorer,
    featurizer: TextFeaturizer,
    task: PlatformTask,
    cases: Sequence[RankingCase],
    batch_size: int,
    k: int = 10,
    full_catalogue: bool = True,
) -> CaseMetrics:
    """Every ranking metric of each case: among its sampled negatives (HR@k, NDCG@k, MRR) and,
    with ``full_catalogue``, over the whole catalogue (``full-ndcg@10``, ``full-recall@20``:
    with one held-out positive, recall@20 is whether it is in the top 20)."""
    values = list_metrics(scorer.score_cases(featurizer, cases, batch_size) if cases else [], k)
    if full_catalogue:
        greater, equal = full_catalogue_counts(scorer, featurizer, task, cases, batch_size)
        values[f"full-ndcg@{FULL_K}"] = case_metrics(greater, equal, FULL_K)[f"ndcg@{FULL_K}"]
        recall = case_metrics(greater, equal, FULL_RECALL_K)[f"hr@{FULL_RECALL_K}"]
        values[f"full-recall@{FULL_RECALL_K}"] = recall
    return CaseMetrics([c.user for c in cases], values)


def evaluate(
    scorer: Scorer,
    featurizer: TextFeaturizer,
    task: PlatformTask,
    split: str = "test",
    batch_size: int = 128,
    max_cases: int = 0,
    k: int = 10,
    per_case: bool = False,
) -> dict[str, Any]:
    """Protocol metrics of ``scorer`` on a platform's ``valid`` or ``test`` split; the
    full-catalogue ones too when every case is scored (``max_cases`` 0). ``per_case`` adds
    ``cases``: each case's user and metrics (:meth:`CaseMetrics.record`)."""
    was_training = scorer.training
    scorer.eval()
    try:
        cases = sample_cases(task.ranking(split), max_cases)
        full = not max_cases and bool(task.catalogue)  # a hand-made task may name none
        ranking = score_cases_metrics(scorer, featurizer, task, cases, batch_size, k, full)
        examples = task.split(split)
        if max_cases:  # pointwise metrics on the same sampled users as the ranking cases
            users = {case.user for case in cases}
            examples = [e for e in examples if e.user in users]
        logits = scorer.score_examples(featurizer, examples, batch_size)
        labels = np.asarray([e.label for e in examples], dtype=np.int64)
    finally:
        scorer.train(was_training)
    pointwise = pointwise_metrics(labels, logits)
    metrics: dict[str, Any] = {
        **ranking.means(),
        "auc": pointwise["auc"],
        "logloss": pointwise["logloss"],
        "ranking_cases": float(len(cases)),
        "examples": float(pointwise["n"]),
    }
    if per_case:
        metrics["cases"] = ranking.record()
    return metrics
