"""BPR matrix factorisation (Rendle et al. 2009): the classic collaborative yardstick.

Not private and not text-based: a user vector, an item vector and an item bias, fitted with the
BPR pairwise loss on (user, positive, unseen item) triples of the TRAIN split only, so
``fedfuse compare`` can show what plain collaborative filtering reaches under the same protocol.

- ``bpr_local``: one model per platform on its own train positives.
- ``bpr_pooled``: one model on every platform's train positives; a user id is the same person on
  every platform (true of the ML-100K platforms), item ids get their platform as a prefix (the
  ``platform\\x1fitem`` convention of ``server.simulation.baselines.pooled_task``).

Hyper-parameters are chosen on the validation ranking cases only (NDCG@10 by the protocol's
``common.evaluation.evaluate``), never on test: every (dim, reg) of ``GRID`` is trained with Adam
at ``LEARNING_RATE`` for up to ``MAX_EPOCHS`` epochs, validated every ``EVAL_EVERY`` epochs and
stopped after ``PATIENCE`` validations without gain; the best validated state of the best grid
point is kept (the model is not refitted on train + valid). Everything is seeded by
``task.seed``. The chosen model is scored on test (a comparison on the validation split scores
it where it was tuned) by ``PlatformClient.score``, the code path of every other method; users
and items never seen in training get a zero vector and bias 0.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common.config import RunConfig
from common.evaluation import evaluate
from common.task import Example, PlatformTask, RankingCase
from server.simulation.baselines import Metrics, Scoring, evaluation_clients, pooled_item

# The documented search space, 12 points: both methods tune on ML-100K in about a minute on
# 2 CPU cores. reg spans the optimum found there (1e-2 to 3e-2) with a point either side.
GRID: tuple[tuple[int, float], ...] = tuple(
    (dim, reg) for dim in (16, 32, 64) for reg in (1e-3, 1e-2, 3e-2, 1e-1)
)
LEARNING_RATE = 1e-2  # Adam; fixed, the grid searches capacity and regularisation instead
BATCH_SIZE = 1024
MAX_EPOCHS = 100
EVAL_EVERY = 3
PATIENCE = 3  # validations without a better NDCG@10 before stopping
INIT_STD = 0.1
NEGATIVE_RETRIES = 50  # rejection rounds for a negative; a user who saw everything gets none


@dataclass(frozen=True)
class Settings:
    """One grid point plus the fixed optimiser settings."""

    dim: int
    reg: float
    lr: float = LEARNING_RATE
    batch_size: int = BATCH_SIZE
    max_epochs: int = MAX_EPOCHS
    eval_every: int = EVAL_EVERY
    patience: int = PATIENCE
    seed: int = 0


class Interactions:
    """Indexed train positives and every user's seen items (what negatives must avoid)."""

    def __init__(self, records: Iterable[tuple[str, str, int]]) -> None:
        """``records``: (user, item, label) of train examples; label 1 makes a positive."""
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
        """The train splits of ``tasks``; ``pooled``: item ids namespaced by platform."""
        key = pooled_item if pooled else lambda _, item: item
        return cls(
            (e.user, key(name, e.candidate), e.label)
            for name, task in tasks.items()
            for e in task.train
        )

    def sample_negatives(self, rng: np.random.Generator, users: np.ndarray) -> np.ndarray:
        """An item each user never had in train, uniformly; -1 where none was found."""
        n_items = len(self.items)
        if not n_items:
            return np.full(len(users), -1, dtype=np.int64)
        negatives = rng.integers(0, n_items, size=len(users))
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


class BPRModel(nn.Module):
    """x_ui = p_u · q_i + b_i; the user bias would cancel in every pairwise difference."""

    def __init__(self, n_users: int, n_items: int, dim: int, generator: torch.Generator) -> None:
        super().__init__()
        self.user = nn.Parameter(torch.randn(n_users, dim, generator=generator) * INIT_STD)
        self.item = nn.Parameter(torch.randn(n_items, dim, generator=generator) * INIT_STD)
        self.bias = nn.Parameter(torch.zeros(n_items))

    def loss(self, u: torch.Tensor, i: torch.Tensor, j: torch.Tensor, reg: float) -> torch.Tensor:
        """BPR-Opt: -ln σ(x_ui - x_uj) + reg · ‖Θ of the triple‖², averaged over the batch."""
        p, qi, qj = self.user[u], self.item[i], self.item[j]
        difference = (p * (qi - qj)).sum(1) + self.bias[i] - self.bias[j]
        norms = p.square().sum(1) + qi.square().sum(1) + qj.square().sum(1)
        norms = norms + self.bias[i].square() + self.bias[j].square()
        return (-nn.functional.logsigmoid(difference) + reg * norms).mean()


class BPRScorer:
    """A fitted BPR model behind the evaluation protocol's scorer interface.

    ``platform`` set: item ids are looked up namespaced (the pooled model scoring one platform).
    """

    training = False

    def __init__(self, model: BPRModel, data: Interactions, platform: str | None = None) -> None:
        with torch.no_grad():
            zero = lambda t: np.vstack([t.numpy(), np.zeros((1, *t.shape[1:]))])  # noqa: E731
            self.user, self.item = zero(model.user), zero(model.item)  # last row: unseen
            self.bias = np.append(model.bias.numpy(), 0.0).astype(np.float64)
        self.users, self.items, self.platform = data.users, data.items, platform

    def eval(self) -> None:
        """Nothing to switch: the evaluation protocol calls it on every scorer."""

    def train(self, mode: bool = True) -> None:
        """Nothing to switch: the evaluation protocol calls it on every scorer."""

    def _items(self, ids: Sequence[str]) -> np.ndarray:
        key = (lambda i: pooled_item(self.platform, i)) if self.platform else (lambda i: i)
        return np.array([self.items.get(key(i), -1) for i in ids], dtype=np.int64)

    def _user(self, user: str) -> int:
        return self.users.get(user, -1)

    def score_cases(
        self, featurizer: object, cases: Sequence[RankingCase], batch_size: int
    ) -> list[np.ndarray]:
        return [
            self.item[items] @ self.user[self._user(case.user)] + self.bias[items]
            for case in cases
            for items in [self._items(case.candidates)]
        ]

    def score_examples(
        self, featurizer: object, examples: Sequence[Example], batch_size: int
    ) -> np.ndarray:
        items = self._items([e.candidate for e in examples])
        users = np.array([self._user(e.user) for e in examples], dtype=np.int64)
        return (self.item[items] * self.user[users]).sum(1) + self.bias[items]


Validator = Callable[[BPRModel], float]


def fit(data: Interactions, settings: Settings, validate: Validator) -> tuple[BPRModel, dict]:
    """Train with early stopping on ``validate`` (a validation NDCG@10); returns the best
    validated state and how it was reached."""
    generator = torch.Generator().manual_seed(settings.seed)
    rng = np.random.default_rng([settings.seed, zlib.crc32(repr(settings).encode())])
    model = BPRModel(len(data.users), len(data.items), settings.dim, generator)
    optimiser = torch.optim.Adam(model.parameters(), lr=settings.lr)
    users, items = np.divmod(data.positives, max(len(data.items), 1))
    best, best_epoch, best_state, stale = -math.inf, 0, None, 0
    for epoch in range(1, settings.max_epochs + 1):
        order = rng.permutation(len(users))
        u, i = users[order], items[order]
        j = data.sample_negatives(rng, u)
        keep = j >= 0
        u, i, j = (torch.from_numpy(a[keep]) for a in (u, i, j))
        for start in range(0, len(u), settings.batch_size):
            batch = slice(start, start + settings.batch_size)
            optimiser.zero_grad()
            model.loss(u[batch], i[batch], j[batch], settings.reg).backward()
            optimiser.step()
        if epoch % settings.eval_every and epoch != settings.max_epochs:
            continue
        score = validate(model)
        if score > best:
            best, best_epoch, stale = score, epoch, 0
            best_state = {k: v.detach().clone() for k, v in model.state_dict().items()}
        else:
            stale += 1
            if stale >= settings.patience:
                break
    assert best_state is not None
    model.load_state_dict(best_state)
    record = {"dim": settings.dim, "reg": settings.reg, "best_epoch": best_epoch}
    return model, record | {"epochs_run": epoch, "valid_ndcg@10": best}


def valid_ndcg(
    model: BPRModel, data: Interactions, tasks: dict[str, PlatformTask], pooled: bool
) -> float:
    """Mean over platforms of the protocol's validation NDCG@10 (test is never read)."""
    values = [
        evaluate(
            BPRScorer(model, data, name if pooled else None),  # type: ignore[arg-type]
            None,  # type: ignore[arg-type]
            task,
            "valid",
        )["ndcg@10"]
        for name, task in tasks.items()
    ]
    return float(np.mean(values))


def tune(
    tasks: dict[str, PlatformTask],
    pooled: bool,
    seed: int = 0,
    grid: Sequence[tuple[int, float]] = GRID,
    fixed: Settings = Settings(dim=0, reg=0.0),
) -> tuple[BPRModel, Interactions, dict[str, Any]]:
    """Every (dim, reg) of ``grid`` fitted on the train positives of ``tasks`` (``pooled``:
    items namespaced by platform) with the rest of ``fixed``; the best by validation NDCG@10 is
    kept (ties: the earlier grid point). Returns it, its indexed data and the tuning record."""
    data = Interactions.of_tasks(tasks, pooled)
    best: tuple[BPRModel, dict] | None = None
    trials = []
    for dim, reg in grid:
        settings = replace(fixed, dim=dim, reg=reg, seed=seed)
        model, record = fit(data, settings, lambda m: valid_ndcg(m, data, tasks, pooled))
        trials.append(record)
        if best is None or record["valid_ndcg@10"] > best[1]["valid_ndcg@10"]:
            best = (model, record)
    assert best is not None
    common = {k: v for k, v in asdict(fixed).items() if k not in ("dim", "reg")} | {"seed": seed}
    return best[0], data, {"chosen": best[1], "settings": common, "trials": trials}


def _announce(label: str, tuning: dict) -> None:
    chosen = tuning["chosen"]
    print(
        f"[fedfuse] {label}: dim {chosen['dim']}, reg {chosen['reg']:g}, "
        f"epoch {chosen['best_epoch']}, valid NDCG@10 {chosen['valid_ndcg@10']:.4f}",
        flush=True,
    )


def bpr_local(
    config: RunConfig, state_root: Path, scoring: Scoring
) -> tuple[dict[str, Metrics], dict[str, Any]]:
    """Each platform's own BPR model, tuned on its validation split; metrics + tuning."""
    metrics, tuning = {}, {}
    for client in evaluation_clients(config, state_root):
        name = client.identity.name
        model, data, tuning[name] = tune({name: client.task}, False, config.task.seed)
        _announce(f"bpr_local {name}", tuning[name])
        scorer = BPRScorer(model, data)
        metrics[name] = scoring.score(client, scorer)  # type: ignore[arg-type]
    return metrics, tuning


def bpr_pooled(
    config: RunConfig, state_root: Path, scoring: Scoring
) -> tuple[dict[str, Metrics], dict[str, Any]]:
    """One BPR model on every platform's train positives (users shared, items namespaced),
    tuned on the mean validation NDCG@10; each platform's metrics + tuning."""
    clients = evaluation_clients(config, state_root)
    tasks = {c.identity.name: c.task for c in clients}
    model, data, tuning = tune(tasks, True, config.task.seed)
    _announce("bpr_pooled", tuning)
    return {
        name: scoring.score(client, BPRScorer(model, data, name))  # type: ignore[arg-type]
        for name, client in zip(tasks, clients, strict=True)
    }, tuning
