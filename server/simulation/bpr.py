"""BPR matrix factorisation (Rendle et al. 2009): the classic collaborative yardstick.

Not private and not text-based: a user vector, an item vector and an item bias, fitted with the
BPR pairwise loss on (user, positive, unseen item) triples of the TRAIN split only, so
``fedfuse compare`` can show what plain collaborative filtering reaches under the same protocol.

- ``bpr_local``: one model per platform on its own train positives.
- ``bpr_pooled``: one model on every platform's train positives; a user id is the same person on
  every platform (true of the ML-100K platforms), item ids get their platform as a prefix (the
  ``platform\\x1fitem`` convention of ``server.simulation.baselines.pooled_task``).

The model trains the ``[baselines]`` point (``bpr_dim``, ``bpr_reg``) with Adam at
``LEARNING_RATE`` for up to ``MAX_EPOCHS`` epochs, validated every ``EVAL_EVERY`` epochs on the
validation ranking cases (NDCG@10 by the protocol's ``common.evaluation.evaluate``, never test)
and stopped after ``PATIENCE`` validations without gain; the best validated state is kept (the
model is not refitted on train + valid). The epoch is all a run chooses: comparing points is
``fedfuse tune``'s job, over the same budget for every method (``GRID`` is BPR's documented
search space). Negatives are items the user never interacted with in the training period (the
protocol's sampled negatives are not interactions: ``server.simulation.inhouse``). Everything is
seeded by ``task.seed``. The model is scored on test (a comparison on the validation split
scores it where it was early-stopped) by ``PlatformClient.score``, the code path of every other
method; users and items never seen in training get a zero vector and bias 0.
"""

from __future__ import annotations

import logging
import zlib
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common.config import BaselineConfig, RunConfig
from common.task import Example, PlatformTask, RankingCase
from server.simulation.baselines import Metrics, Scoring, evaluation_clients, pooled_item
from server.simulation.inhouse import (
    EarlyStopping,
    Interactions,
    TrainedStore,
    mean_valid_ndcg,
)

__all__ = ["GRID", "BPRModel", "BPRScorer", "Interactions", "Settings", "bpr_local", "bpr_pooled"]

logger = logging.getLogger(__name__)

# BPR's documented search space for ``fedfuse tune`` (``baselines.bpr_dim`` × ``bpr_reg``),
# 15 points. On ML-100K's validation split reg 1e-2 was best under ``leave_last`` and 1e-1 to
# 3e-1 under ``global_time`` (where BPR barely reaches popularity), so reg spans both.
GRID: tuple[tuple[int, float], ...] = tuple(
    (dim, reg) for dim in (16, 32, 64) for reg in (1e-3, 1e-2, 3e-2, 1e-1, 3e-1)
)
LEARNING_RATE = 1e-2  # Adam; fixed, the grid searches capacity and regularisation instead
BATCH_SIZE = 1024
MAX_EPOCHS = 100
EVAL_EVERY = 3
PATIENCE = 3  # validations without a better NDCG@10 before stopping
INIT_STD = 0.1


def grid_overrides(grid: Sequence[tuple[int, float]] = GRID) -> list[list[str]]:
    """``GRID`` as ``--set`` overrides, one list per point (what ``fedfuse tune`` runs)."""
    return [[f"baselines.bpr_dim={dim}", f"baselines.bpr_reg={reg!r}"] for dim, reg in grid]


@dataclass(frozen=True)
class Settings:
    """The configured point plus the fixed optimiser settings."""

    dim: int
    reg: float
    lr: float = LEARNING_RATE
    batch_size: int = BATCH_SIZE
    max_epochs: int = MAX_EPOCHS
    eval_every: int = EVAL_EVERY
    patience: int = PATIENCE
    seed: int = 0

    @classmethod
    def of(cls, baselines: BaselineConfig, seed: int) -> Settings:
        return cls(dim=baselines.bpr_dim, reg=baselines.bpr_reg, seed=seed)


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

    def score_catalogue(
        self, featurizer: object, cases: Sequence[RankingCase], items: Sequence[str], _: int
    ) -> np.ndarray:
        """(cases, items) scores in one product: a full-catalogue ranking is one matrix."""
        rows = self._items(items)
        users = np.array([self._user(case.user) for case in cases], dtype=np.int64)
        return self.user[users] @ self.item[rows].T + self.bias[rows]

    def score_examples(
        self, featurizer: object, examples: Sequence[Example], batch_size: int
    ) -> np.ndarray:
        items = self._items([e.candidate for e in examples])
        users = np.array([self._user(e.user) for e in examples], dtype=np.int64)
        return (self.item[items] * self.user[users]).sum(1) + self.bias[items]


Validator = Callable[[BPRModel], float]


def fit(
    data: Interactions,
    settings: Settings,
    validate: Validator,
    store: TrainedStore | None = None,
    name: str = "bpr",
) -> tuple[BPRModel, dict]:
    """Train with early stopping on ``validate`` (a validation NDCG@10); returns the best
    validated state and how it was reached (``store``: kept as ``name``, or reused)."""
    generator = torch.Generator().manual_seed(settings.seed)
    rng = np.random.default_rng([settings.seed, zlib.crc32(repr(settings).encode())])
    model = BPRModel(len(data.users), len(data.items), settings.dim, generator)

    def train() -> dict[str, Any]:
        optimiser = torch.optim.Adam(model.parameters(), lr=settings.lr)
        users, items = np.divmod(data.positives, max(len(data.items), 1))
        stopping = EarlyStopping(settings.patience)
        epoch = 0
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
            if stopping.update(epoch, validate(model), model):
                break
        stopping.restore(model)
        return {"dim": settings.dim, "reg": settings.reg} | stopping.record(epoch)

    return model, store.fitted(name, model, train) if store else train()


def valid_ndcg(
    model: BPRModel, data: Interactions, tasks: dict[str, PlatformTask], pooled: bool
) -> float:
    """Mean over platforms of the protocol's validation NDCG@10 (test is never read)."""
    return mean_valid_ndcg(tasks, lambda name: BPRScorer(model, data, name if pooled else None))


def train_bpr(
    tasks: dict[str, PlatformTask],
    pooled: bool,
    settings: Settings,
    store: TrainedStore | None = None,
) -> tuple[BPRModel, Interactions, dict[str, Any]]:
    """The configured point fitted on the train interactions of ``tasks`` (``pooled``: items
    namespaced by platform), early-stopped on the mean validation NDCG@10. Returns the model,
    its indexed data and the tuning record (``chosen``: the epoch and its NDCG@10)."""
    data = Interactions.of_tasks(tasks, pooled)
    validate = lambda m: valid_ndcg(m, data, tasks, pooled)  # noqa: E731
    name = "bpr_pooled" if pooled else "bpr_local"
    model, chosen = fit(data, settings, validate, store, name)
    return model, data, {"chosen": chosen, "settings": asdict(settings)}


def _announce(label: str, tuning: dict) -> None:
    chosen = tuning["chosen"]
    logger.info(
        "%s: dim %d, reg %g, epoch %d, valid NDCG@10 %.4f",
        label,
        chosen["dim"],
        chosen["reg"],
        chosen["best_epoch"],
        chosen["valid_ndcg@10"],
    )


def bpr_local(
    config: RunConfig, state_root: Path, scoring: Scoring
) -> tuple[dict[str, Metrics], dict[str, Any]]:
    """Each platform's own BPR model at the configured point; metrics + tuning record."""
    settings = Settings.of(config.baselines, config.task.seed)
    metrics, tuning = {}, {}
    for client in evaluation_clients(config, state_root):
        name = client.identity.name
        model, data, tuning[name] = train_bpr({name: client.task}, False, settings)
        _announce(f"bpr_local {name}", tuning[name])
        metrics[name] = scoring.score(client, BPRScorer(model, data))  # type: ignore[arg-type]
    return metrics, tuning


def bpr_pooled(
    config: RunConfig, state_root: Path, scoring: Scoring
) -> tuple[dict[str, Metrics], dict[str, Any]]:
    """One BPR model on every platform's train interactions (users shared, items namespaced),
    early-stopped on the mean validation NDCG@10; each platform's metrics + tuning record."""
    clients = evaluation_clients(config, state_root)
    tasks = {c.identity.name: c.task for c in clients}
    settings = Settings.of(config.baselines, config.task.seed)
    model, data, tuning = train_bpr(tasks, True, settings)
    _announce("bpr_pooled", tuning)
    return {
        name: scoring.score(client, BPRScorer(model, data, name))  # type: ignore[arg-type]
        for name, client in zip(tasks, clients, strict=True)
    }, tuning
