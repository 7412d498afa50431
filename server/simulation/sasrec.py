"""SASRec (Kang & McAuley 2018): the self-attentive sequence model a platform runs in-house.

Not private and not text-based: item embeddings plus learned positions through a causal
(pre-LN) transformer encoder, trained on each user's chronological TRAIN-period positives to
predict the next item with binary cross-entropy against one sampled negative per position (an
item the user never interacted with in the training period; the protocol's sampled negatives
are not interactions: ``server.simulation.inhouse``). A user's sequence is cut, from its end,
into windows of ``max_len`` + 1 items so that every transition is a target once, each with at
most ``max_len`` items of context — what a ranking case's history gives at scoring time.

- ``sasrec_local``: one model per platform on its own sequences.
- ``sasrec_pooled``: one model over all platforms; a person's sequence is their positives on
  every platform merged by time (items namespaced ``platform\\x1fitem``), and a case on platform
  p is scored from the person's merged positives before the case's time (``RankingCase.time``)
  on every platform: the non-private ceiling that links users across platforms. The merged
  history reads the splits up to the one scored (train and valid for validation; test too for
  test), never a later one. A case without a time (0) falls back to its own history.

A run trains the ``[baselines]`` ``sasrec_*`` point with early stopping on validation NDCG@10
(the epoch is all it chooses; ``fedfuse tune`` compares points). Seeded by ``task.seed``;
deterministic on CPU. A case's history is newest first (reversed here); unknown history items
are dropped, unknown candidates get the zero padding embedding (score 0).
"""

from __future__ import annotations

import bisect
import logging
import math
import zlib
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from common.config import RunConfig
from common.errors import ConfigError
from common.task import Example, PlatformTask, RankingCase, global_periods
from server.simulation.baselines import Metrics, Scoring, evaluation_clients, pooled_item
from server.simulation.inhouse import (
    EarlyStopping,
    Interactions,
    TrainedStore,
    mean_valid_ndcg,
    rated_train,
)

logger = logging.getLogger(__name__)

SCORE_BATCH = 512  # histories per forward pass when scoring


@dataclass(frozen=True)
class SASRecSettings:
    """One configured point (``[baselines]`` ``sasrec_*``), ``max_len`` resolved."""

    dim: int = 64
    layers: int = 2
    heads: int = 1
    dropout: float = 0.5
    lr: float = 3e-3
    weight_decay: float = 0.0
    max_len: int = 20
    batch_size: int = 128
    max_epochs: int = 100
    eval_every: int = 5
    patience: int = 3
    seed: int = 0

    @classmethod
    def of(cls, config: RunConfig) -> SASRecSettings:
        b = config.baselines
        return cls(
            dim=b.sasrec_dim,
            layers=b.sasrec_layers,
            heads=b.sasrec_heads,
            dropout=b.sasrec_dropout,
            lr=b.sasrec_learning_rate,
            weight_decay=b.sasrec_weight_decay,
            max_len=b.sasrec_max_len or config.task.history_len,
            batch_size=b.sasrec_batch_size,
            max_epochs=b.sasrec_max_epochs,
            eval_every=b.sasrec_eval_every,
            patience=b.sasrec_patience,
            seed=config.task.seed,
        )


class SASRec(nn.Module):
    """Left-padded item sequences (0 = padding) -> a representation after every position."""

    def __init__(self, n_items: int, settings: SASRecSettings) -> None:
        super().__init__()
        dim, length = settings.dim, settings.max_len
        self.item = nn.Embedding(n_items + 1, dim, padding_idx=0)
        self.position = nn.Embedding(length, dim)
        nn.init.normal_(self.item.weight, std=dim**-0.5)
        nn.init.normal_(self.position.weight, std=dim**-0.5)
        with torch.no_grad():
            self.item.weight[0].zero_()
        self.dropout = nn.Dropout(settings.dropout)
        layer = nn.TransformerEncoderLayer(
            dim, settings.heads, dim, settings.dropout, batch_first=True, norm_first=True
        )
        self.encoder = nn.TransformerEncoder(layer, settings.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        causal = torch.triu(torch.full((length, length), -math.inf), diagonal=1)
        self.register_buffer("causal", causal, persistent=False)

    def forward(self, sequences: torch.Tensor) -> torch.Tensor:
        """(batch, max_len) -> (batch, max_len, dim). Padding is zeroed after every block
        instead of masked as keys: a row of only padding would otherwise give NaN."""
        keep = (sequences > 0).unsqueeze(-1).to(self.item.weight.dtype)
        x = self.item(sequences) * math.sqrt(self.item.embedding_dim) + self.position.weight
        x = self.dropout(x) * keep
        for block in self.encoder.layers:
            x = block(x, src_mask=self.causal, is_causal=True) * keep
        return self.norm(x)


class Sequences:
    """Every user's chronological train positives as item indices (1-based; 0 = padding),
    and the train interactions negatives must avoid."""

    def __init__(self, tasks: dict[str, PlatformTask], pooled: bool) -> None:
        self.data = Interactions.of_tasks(tasks, pooled)
        key = pooled_item if pooled else lambda _, item: item
        events: dict[str, list[tuple[float, int, int, int]]] = {}
        for rank, (name, task) in enumerate(tasks.items()):
            for position, e in enumerate(rated_train(task.train)):
                if e.label:
                    index = self.data.items[key(name, e.candidate)] + 1
                    events.setdefault(e.user, []).append((e.time, rank, position, index))
        # by time; ties (and a platform without times) keep platform then file order
        self.of_user = {user: [e[3] for e in sorted(rows)] for user, rows in events.items()}

    @property
    def n_items(self) -> int:
        return len(self.data.items)

    def windows(self, max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """(inputs, users): windows of max_len + 1 items cut from each sequence's end, left-
        padded; a window's targets are its inputs shifted by one."""
        rows, users = [], []
        for user, items in self.of_user.items():
            end = len(items)
            while end >= 2:
                chunk = items[max(0, end - max_len - 1) : end]
                rows.append([0] * (max_len + 1 - len(chunk)) + chunk)
                users.append(self.data.users[user])
                end -= max_len
        return np.asarray(rows, np.int64).reshape(-1, max_len + 1), np.asarray(users, np.int64)


def _train_epoch(
    model: SASRec,
    optimiser: torch.optim.Optimizer,
    sequences: Sequences,
    windows: tuple[np.ndarray, np.ndarray],
    rng: np.random.Generator,
    batch_size: int,
) -> float:
    """One pass over the windows in a seeded order; returns the mean loss."""
    rows, users = windows
    order = rng.permutation(len(rows))
    rows, users = rows[order], users[order]
    targets = rows[:, 1:]
    flat = sequences.data.sample_negatives(rng, np.repeat(users, targets.shape[1]))
    negatives = flat.reshape(targets.shape) + 1  # -1 (none found) -> 0, masked below
    model.train()
    total, count = 0.0, 0
    for start in range(0, len(rows), batch_size):
        batch = slice(start, start + batch_size)
        inputs = torch.from_numpy(rows[batch, :-1])
        positive, negative = torch.from_numpy(targets[batch]), torch.from_numpy(negatives[batch])
        mask = (inputs > 0) & (positive > 0) & (negative > 0)
        hidden = model(inputs)
        pos = (hidden * model.item(positive)).sum(-1)[mask]
        neg = (hidden * model.item(negative)).sum(-1)[mask]
        loss = -(nn.functional.logsigmoid(pos) + nn.functional.logsigmoid(-neg)).mean()
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        total, count = total + loss.item() * len(pos), count + len(pos)
    return total / max(count, 1)


Timeline = dict[str, tuple[list[float], list[int], list[str]]]


def timeline(
    tasks: dict[str, PlatformTask], splits: Sequence[str], items: dict[str, int]
) -> Timeline:
    """Each person's positives on every platform in ``splits`` (sampled negatives left out),
    by time: (times, item indices, namespaced ids) for the pooled scorer's merged histories."""
    events: dict[str, list[tuple[float, int, int, str]]] = {}
    for rank, (name, task) in enumerate(tasks.items()):
        for split in splits:
            examples = rated_train(task.train) if split == "train" else task.split(split)
            for e in examples:
                item = pooled_item(name, e.candidate)
                if e.label and item in items:
                    events.setdefault(e.user, []).append((e.time, rank, items[item] + 1, item))
    out: Timeline = {}
    for user, rows in events.items():
        rows.sort(key=lambda r: r[:2])
        out[user] = ([r[0] for r in rows], [r[2] for r in rows], [r[3] for r in rows])
    return out


class SASRecScorer:
    """A fitted SASRec behind the evaluation protocol's scorer interface. ``platform`` set:
    the pooled model scoring that platform (ids namespaced; with a ``merged`` timeline, the
    person's history on every platform before the case's time)."""

    training = False

    def __init__(
        self,
        model: SASRec,
        items: dict[str, int],
        max_len: int,
        platform: str | None = None,
        merged: Timeline | None = None,
    ) -> None:
        self.model, self.items, self.max_len = model, items, max_len
        self.platform, self.merged = platform, merged
        with torch.no_grad():
            self.table = model.item.weight.detach().numpy().astype(np.float64)

    def eval(self) -> None:
        """The model is switched to eval mode per scoring call (dropout off)."""

    def train(self, mode: bool = True) -> None:
        """Nothing to switch: training happens in :func:`fit`, not through the scorer."""

    def _key(self, item: str) -> str:
        return pooled_item(self.platform, item) if self.platform else item

    def _index(self, ids: Sequence[str]) -> np.ndarray:
        """1-based rows of ``ids``; unknown -> 0, the zero padding row."""
        return np.array([self.items.get(self._key(i), -1) + 1 for i in ids], dtype=np.int64)

    def _history(self, user: str, history: Sequence[str], when: float) -> list[int]:
        """Oldest-first item rows the model reads for one case or example."""
        if self.merged is not None and when and user in self.merged:
            times, rows, ids = self.merged[user]
            before, upto = bisect.bisect_left(times, when), bisect.bisect_right(times, when)
            own = {self._key(i) for i in history}  # same-second items: the case's own history
            tied = [rows[k] for k in range(before, upto) if ids[k] in own]
            return (rows[max(0, before - self.max_len) : before] + tied)[-self.max_len :]
        known = [r for r in self._index(history[::-1]).tolist() if r > 0]
        return known[-self.max_len :]

    def represent(self, histories: Sequence[list[int]]) -> np.ndarray:
        """(n, dim) user vectors: the encoder's output at the newest position."""
        out = np.zeros((len(histories), self.table.shape[1]))
        was_training = self.model.training
        self.model.eval()
        with torch.no_grad():
            for start in range(0, len(histories), SCORE_BATCH):
                chunk = histories[start : start + SCORE_BATCH]
                padded = [[0] * (self.max_len - len(h)) + h for h in chunk]
                hidden = self.model(
                    torch.tensor(padded, dtype=torch.int64).reshape(-1, self.max_len)
                )
                out[start : start + len(chunk)] = hidden[:, -1].numpy()
        self.model.train(was_training)
        return out

    def _users(self, cases: Sequence[RankingCase | Example]) -> np.ndarray:
        return self.represent(
            [self._history(c.user, c.history, getattr(c, "time", 0.0)) for c in cases]
        )

    def score_cases(
        self, featurizer: object, cases: Sequence[RankingCase], batch_size: int
    ) -> list[np.ndarray]:
        users = self._users(cases)
        return [
            self.table[self._index(c.candidates)] @ u for c, u in zip(cases, users, strict=True)
        ]

    def score_catalogue(
        self, featurizer: object, cases: Sequence[RankingCase], items: Sequence[str], _: int
    ) -> np.ndarray:
        """(cases, items) scores in one product: a full-catalogue ranking is one matrix."""
        return self._users(cases) @ self.table[self._index(items)].T

    def score_examples(
        self, featurizer: object, examples: Sequence[Example], batch_size: int
    ) -> np.ndarray:
        users = self._users(examples)
        return (self.table[self._index([e.candidate for e in examples])] * users).sum(1)


def fit(
    tasks: dict[str, PlatformTask],
    pooled: bool,
    settings: SASRecSettings,
    scored: Sequence[str] | None = None,
    store: TrainedStore | None = None,
    name: str = "sasrec",
) -> tuple[SASRec, Sequences, dict[str, Any]]:
    """Train the configured point on the train sequences of ``tasks``, early-stopped on the
    mean validation NDCG@10 over them (over ``scored`` only, when given); returns the best
    validated model and its record (``store``: kept as ``name``, or reused)."""
    torch.manual_seed(settings.seed)  # initialisation and dropout
    rng = np.random.default_rng([settings.seed, zlib.crc32(b"sasrec"), int(pooled)])
    sequences = Sequences(tasks, pooled)
    model = SASRec(sequences.n_items, settings)

    def train() -> dict[str, Any]:
        optimiser = torch.optim.AdamW(
            model.parameters(), lr=settings.lr, weight_decay=settings.weight_decay
        )
        windows = sequences.windows(settings.max_len)
        merged = timeline(tasks, ("train", "valid"), sequences.data.items) if pooled else None

        def validate() -> float:
            return mean_valid_ndcg(
                {name: tasks[name] for name in scored or tasks},
                lambda name: SASRecScorer(
                    model, sequences.data.items, settings.max_len, name if pooled else None, merged
                ),
            )

        stopping = EarlyStopping(settings.patience)
        epoch = 0
        for epoch in range(1, settings.max_epochs + 1):
            loss = _train_epoch(model, optimiser, sequences, windows, rng, settings.batch_size)
            if epoch % settings.eval_every and epoch != settings.max_epochs:
                continue
            score = validate()
            logger.debug("epoch %d: loss %.4f, valid NDCG@10 %.4f", epoch, loss, score)
            if stopping.update(epoch, score, model):
                break
        stopping.restore(model)
        return asdict(settings) | stopping.record(epoch)

    record = store.fitted(name, model, train) if store else train()
    model.eval()
    return model, sequences, record


def _announce(label: str, chosen: dict[str, Any]) -> None:
    logger.info(
        "%s: epoch %d of %d, valid NDCG@10 %.4f",
        label,
        chosen["best_epoch"],
        chosen["epochs_run"],
        chosen["valid_ndcg@10"],
    )


def with_carried(task: PlatformTask, config: RunConfig) -> dict[str, PlatformTask]:
    """The platform and what its people brought (``task.carried``) as a second "platform" of
    positives split at the same global cuts, for :func:`fit` pooled: a platform's own SASRec
    over each person's history here and elsewhere merged by time, as it could train alone
    once people bring their histories (no federation needed)."""
    if task.carried is None or config.task.split != "global_time":
        raise ConfigError(
            "an in-house model over carried histories needs model.carried_history and "
            "task.split = global_time"
        )
    brought = PlatformTask(platform=f"{task.platform}/carried")
    events = list(task.carried.events())
    periods = global_periods(np.array([when for _, when, _ in events]), config.task)
    for (user, when, item), period in zip(events, periods.tolist(), strict=True):
        (brought.train, brought.valid, brought.test)[period].append(
            Example(user, (), item, 1, time=when)
        )
    return {task.platform: task, brought.platform: brought}


def sasrec_carried_scorer(
    task: PlatformTask, config: RunConfig, store: TrainedStore | None = None
) -> tuple[SASRecScorer, dict[str, Any]]:
    """The platform's own SASRec trained and scoring over merged own + carried histories
    (:func:`with_carried`); a case reads the person's positives anywhere before its time."""
    settings = SASRecSettings.of(config)
    tasks = with_carried(task, config)
    model, sequences, chosen = fit(tasks, True, settings, [task.platform], store, "sasrec_carried")
    _announce(f"sasrec_carried {task.platform}", chosen)
    merged = timeline(tasks, ("train", "valid", "test"), sequences.data.items)
    scorer = SASRecScorer(model, sequences.data.items, settings.max_len, task.platform, merged)
    return scorer, chosen


def sasrec_local(
    config: RunConfig, state_root: Path, scoring: Scoring
) -> tuple[dict[str, Metrics], dict[str, Any]]:
    """Each platform's own SASRec at the configured point; metrics + tuning record."""
    settings = SASRecSettings.of(config)
    metrics, tuning = {}, {}
    for client in evaluation_clients(config, state_root):
        name = client.identity.name
        model, sequences, chosen = fit({name: client.task}, False, settings)
        tuning[name] = {"chosen": chosen}
        _announce(f"sasrec_local {name}", chosen)
        scorer = SASRecScorer(model, sequences.data.items, settings.max_len)
        metrics[name] = scoring.score(client, scorer)  # type: ignore[arg-type]
    return metrics, tuning


def sasrec_pooled(
    config: RunConfig, state_root: Path, scoring: Scoring
) -> tuple[dict[str, Metrics], dict[str, Any]]:
    """One SASRec over every platform's merged sequences (people linked across platforms),
    early-stopped on the mean validation NDCG@10; each platform's metrics + tuning record."""
    settings = SASRecSettings.of(config)
    clients = evaluation_clients(config, state_root)
    tasks = {c.identity.name: c.task for c in clients}
    model, sequences, chosen = fit(tasks, True, settings)
    _announce("sasrec_pooled", chosen)
    splits = ("train", "valid") if scoring.split == "valid" else ("train", "valid", "test")
    merged = timeline(tasks, splits, sequences.data.items)
    items = sequences.data.items
    return {
        name: scoring.score(
            client,
            SASRecScorer(model, items, settings.max_len, name, merged),  # type: ignore[arg-type]
        )
        for name, client in zip(tasks, clients, strict=True)
    }, {"chosen": chosen}
