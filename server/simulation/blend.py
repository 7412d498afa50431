"""A platform's in-house model blended with a second scorer, the weight fitted on validation.

The blend is what a platform serves after joining: its own non-private model (trained on its
own data, which never leaves it) next to the federation's DP-trained model. Scores of two
models live on different scales, so each model's scores are standardised within the list
being ranked (a case's candidates, or the whole catalogue) before they are mixed:
``w · z(in-house) + (1 − w) · z(other)``. The weight is the one of :data:`WEIGHTS` with the
best NDCG@10 on the platform's validation cases (ties: the smaller weight), so test is never
read to choose it. Fitting reads the platform's own validation data in the clear, on the
platform, and releases nothing: it is outside the DP ledger like any setting chosen there.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np

from common.evaluation import catalogue_scores
from common.metrics import list_metrics
from common.task import Example, RankingCase

WEIGHTS = tuple(np.round(np.linspace(0.0, 1.0, 21), 2))  # the in-house model's share


class CaseScorer(Protocol):
    """What the evaluation protocol asks of a scorer (common/evaluation.py)."""

    training: bool

    def eval(self) -> Any: ...

    def train(self, mode: bool = True) -> Any: ...

    def score_cases(
        self, featurizer: Any, cases: Sequence[RankingCase], batch_size: int
    ) -> list[np.ndarray]: ...

    def score_examples(
        self, featurizer: Any, examples: Sequence[Example], batch_size: int
    ) -> np.ndarray: ...


def standardise(scores: np.ndarray) -> np.ndarray:
    """Scores of one list (last axis) to mean 0 and standard deviation 1; a constant list to
    zeros (it ranks nothing, so it must not move the other model's ranking)."""
    scores = np.asarray(scores, dtype=np.float64)
    spread = scores.std(axis=-1, keepdims=True)
    centred = scores - scores.mean(axis=-1, keepdims=True)
    return np.divide(centred, spread, out=np.zeros_like(centred), where=spread > 0)


@dataclass
class BlendScorer:
    """``weight`` · z(``inhouse``) + (1 − ``weight``) · z(``other``), per ranked list."""

    inhouse: CaseScorer
    other: CaseScorer
    weight: float
    training: bool = False

    def eval(self) -> None:
        self.inhouse.eval()
        self.other.eval()

    def train(self, mode: bool = True) -> None:
        """Evaluation only: the parts were trained before they were blended."""

    def _mix(self, first: np.ndarray, second: np.ndarray) -> np.ndarray:
        return self.weight * standardise(first) + (1.0 - self.weight) * standardise(second)

    def score_cases(
        self, featurizer: Any, cases: Sequence[RankingCase], batch_size: int
    ) -> list[np.ndarray]:
        first = self.inhouse.score_cases(featurizer, cases, batch_size)
        second = self.other.score_cases(featurizer, cases, batch_size)
        return [self._mix(a, b) for a, b in zip(first, second, strict=True)]

    def score_catalogue(
        self, featurizer: Any, cases: Sequence[RankingCase], items: Sequence[str], batch_size: int
    ) -> np.ndarray:
        first = catalogue_scores(self.inhouse, featurizer, cases, items, batch_size)  # type: ignore[arg-type]
        second = catalogue_scores(self.other, featurizer, cases, items, batch_size)  # type: ignore[arg-type]
        return self._mix(first, second)

    def score_examples(
        self, featurizer: Any, examples: Sequence[Example], batch_size: int
    ) -> np.ndarray:
        """Pointwise logits (AUC only): the two models' logits standardised over the examples."""
        first = self.inhouse.score_examples(featurizer, examples, batch_size)
        second = self.other.score_examples(featurizer, examples, batch_size)
        return self._mix(first, second) if len(examples) else np.zeros(0)


def fit_weight(
    inhouse: CaseScorer,
    other: CaseScorer,
    featurizer: Any,
    cases: Sequence[RankingCase],
    batch_size: int = 256,
) -> tuple[float, dict[float, float]]:
    """The weight of :data:`WEIGHTS` with the best mean NDCG@10 on ``cases`` (a platform's
    validation cases), and every weight's NDCG@10. Each model scores the cases once."""
    for scorer in (inhouse, other):
        scorer.eval()
    first = inhouse.score_cases(featurizer, cases, batch_size)
    second = other.score_cases(featurizer, cases, batch_size)
    standard = [(standardise(a), standardise(b)) for a, b in zip(first, second, strict=True)]
    found = {
        float(weight): float(
            list_metrics([weight * a + (1 - weight) * b for a, b in standard])["ndcg@10"].mean()
        )
        for weight in WEIGHTS
    }
    best = max(found, key=lambda w: (found[w], -w))
    return best, found
