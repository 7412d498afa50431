"""What the in-house baselines (BPR, SASRec) share: the train period's real interactions, the
negatives they may sample, and early stopping on validation NDCG@10.

A platform's own recommender only knows what its users actually did in the training period.
The protocol's train split also holds SAMPLED negatives (``common.task.build_task`` adds, per
positive, never-interacted items as label-0 examples and as the positive's ``negatives``);
those are not interactions, so they are neither history nor excluded from negative sampling.
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load, save
from torch import nn

from common.atomic import atomic_write, atomic_write_bytes
from common.evaluation import evaluate
from common.task import Example, PlatformTask
from server.simulation.baselines import pooled_item

logger = logging.getLogger(__name__)

NEGATIVE_RETRIES = 50  # rejection rounds for a negative; a user who saw everything gets none


def rated_train(train: Iterable[Example]) -> Iterator[Example]:
    """The train examples that are interactions: positives and genuinely rated negatives.

    A label-0 example is a sampled negative when its item is among the sampled ``negatives``
    of one of the same user's positive train examples; ``build_task`` samples those from
    items the user never interacted with, so a rated item is never one of them.
    """
    train = list(train)
    sampled: dict[str, set[str]] = {}
    for example in train:
        if example.label and example.negatives:
            sampled.setdefault(example.user, set()).update(example.negatives)
    for example in train:
        if example.label or example.candidate not in sampled.get(example.user, ()):
            yield example


class Interactions:
    """Indexed train positives and every user's train-period interactions (what sampled
    negatives must avoid)."""

    def __init__(self, records: Iterable[tuple[str, str, int]]) -> None:
        """``records``: (user, item, label) of train interactions; label 1 makes a positive."""
        users: dict[str, int] = {}
        items: dict[str, int] = {}
        seen: list[tuple[int, int]] = []
        positive: list[tuple[int, int]] = []
        for user, item, label in records:
            pair = (users.setdefault(user, len(users)), items.setdefault(item, len(items)))
            seen.append(pair)
            if label == 1:
                positive.append(pair)
        self.users, self.items = users, items
        codes = lambda pairs: np.unique(  # noqa: E731
            np.asarray(pairs, np.int64).reshape(-1, 2) @ np.array([len(items), 1], np.int64)
        )
        self.seen = codes(seen)  # sorted user * n_items + item
        self.positives = codes(positive)  # a repeated like counts once

    @classmethod
    def of_tasks(cls, tasks: dict[str, PlatformTask], pooled: bool) -> Interactions:
        """The train-period interactions of ``tasks`` (sampled negatives left out);
        ``pooled``: item ids namespaced by platform."""
        key = pooled_item if pooled else lambda _, item: item
        return cls(
            (e.user, key(name, e.candidate), e.label)
            for name, task in tasks.items()
            for e in rated_train(task.train)
        )

    def sample_negatives(self, rng: np.random.Generator, users: np.ndarray) -> np.ndarray:
        """An item each user never interacted with in train, uniformly; -1 where none was
        found."""
        n_items = len(self.items)
        if not n_items:
            return np.full(len(users), -1, dtype=np.int64)
        negatives = rng.integers(0, n_items, size=len(users))
        if not len(self.seen):
            return negatives
        todo = np.arange(len(users))
        for _ in range(NEGATIVE_RETRIES):
            codes = users[todo] * n_items + negatives[todo]
            at = np.minimum(np.searchsorted(self.seen, codes), len(self.seen) - 1)
            todo = todo[self.seen[at] == codes]
            if not len(todo):
                return negatives
            negatives[todo] = rng.integers(0, n_items, size=len(todo))
        negatives[todo] = -1
        return negatives


class EarlyStopping:
    """Keeps the best validated state of a module; says when ``patience`` validations in a row
    brought no gain (the epoch count is all a run chooses; the rest is configuration)."""

    def __init__(self, patience: int) -> None:
        self.patience = patience
        self.best, self.best_epoch, self.stale = -math.inf, 0, 0
        self.state: dict[str, torch.Tensor] | None = None

    def update(self, epoch: int, score: float, model: nn.Module) -> bool:
        """Record ``score`` at ``epoch``; True when training should stop."""
        if score > self.best:
            self.best, self.best_epoch, self.stale = score, epoch, 0
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            return False
        self.stale += 1
        return self.stale >= self.patience

    def restore(self, model: nn.Module) -> None:
        """Load the best validated state back into ``model``."""
        assert self.state is not None, "no validation ran"
        model.load_state_dict(self.state)

    def record(self, epochs_run: int) -> dict[str, Any]:
        return {"best_epoch": self.best_epoch, "epochs_run": epochs_run, "valid_ndcg@10": self.best}


def mean_valid_ndcg(tasks: dict[str, PlatformTask], scorer_of: Callable[[str], object]) -> float:
    """Mean over platforms of the protocol's validation NDCG@10 (test is never read);
    ``scorer_of(platform)`` gives the scorer for that platform."""
    values = [
        evaluate(scorer_of(name), None, task, "valid")["ndcg@10"]  # type: ignore[arg-type]
        for name, task in tasks.items()
    ]
    return float(np.mean(values))


@dataclass(frozen=True)
class TrainedStore:
    """Trained in-house models kept in ``folder``, so that a resumed or repeated command
    reuses them instead of training them again (an hour and more on ML-1M). Training is
    seeded and runs on the CPU, so a kept state is the state training would give again; its
    file names carry ``digest``, a hash of everything the training reads (the settings, the
    platform's data files and the training code), so a change of any of them trains anew."""

    folder: Path
    digest: str

    def fitted(
        self, name: str, model: nn.Module, train: Callable[[], dict[str, Any]]
    ) -> dict[str, Any]:
        """``model`` (freshly built) as trained by ``train()``, which trains it in place and
        returns its record: loaded from the folder when kept there, else trained and kept."""
        stem = self.folder / f"{name}-{self.digest[:16]}"
        weights, record = stem.with_suffix(".safetensors"), stem.with_suffix(".json")
        if weights.exists() and record.exists():
            model.load_state_dict(load(weights.read_bytes()))
            kept: dict[str, Any] = json.loads(record.read_text(encoding="utf-8"))
            logger.info("%s: trained state reused from %s", name, weights)
            return kept
        trained = train()
        self.folder.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
        atomic_write_bytes(weights, save(state))
        atomic_write(record, json.dumps(trained, indent=2) + "\n")  # written last: complete
        return trained


def training_digest(*parts: str, files: Iterable[Path] = ()) -> str:
    """SHA-256 over ``parts``, the bytes of ``files`` and the in-house training code (this
    module, BPR's and SASRec's) with torch's version."""
    digest = hashlib.sha256()
    here = Path(__file__).resolve().parent
    code = [here / name for name in ("inhouse.py", "bpr.py", "sasrec.py")]
    for part in [*parts, torch.__version__]:
        digest.update(part.encode() + b"\0")
    for path in [*code, *files]:
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()
