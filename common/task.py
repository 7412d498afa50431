"""The recommendation task and its evaluation protocol, identical for every method.

Example: the user's most recent positively rated items on the platform before the target
interaction (up to ``history_len`` item ids, newest first) and a candidate item -> label 1 if
the target is positive, else 0. Training adds sampled never-interacted items as negatives:
as labelled examples of their own (the pointwise objective) and, on the positive train example,
as its ``negatives`` (the ranking objective: the positive against its own negatives, so one
positive stays one privacy unit; see :func:`training_units`).

Split, per user and platform, by time: the last positive and everything after it -> test, the
second-to-last positive up to the last -> validation, the rest -> train. A user with fewer than
three positives on the platform is train-only. Ranking cases put each held-out positive among
``eval_negatives`` items the user never interacted with on that platform, drawn from a seeded
generator that depends only on the data and the seed, so every method sees the same lists.
"""

from __future__ import annotations

import zlib
from dataclasses import dataclass, field, replace

import numpy as np

from common.config import TaskConfig
from common.platform_data import PlatformData, distinct_codes


@dataclass(frozen=True)
class Example:
    """One labelled example: the privacy unit of DP training (record level)."""

    user: str
    history: tuple[str, ...]  # item ids, newest first
    candidate: str
    label: int
    negatives: tuple[str, ...] = ()  # a positive train example's own sampled negatives


@dataclass(frozen=True)
class RankingCase:
    """A held-out positive to rank among negatives the user never interacted with."""

    user: str
    history: tuple[str, ...]
    positive: str
    negatives: tuple[str, ...]

    @property
    def candidates(self) -> tuple[str, ...]:
        """Positive first, then the negatives: the scorer sees them in this fixed order."""
        return (self.positive, *self.negatives)


@dataclass
class PlatformTask:
    """A platform's examples for every split, plus its ranking cases."""

    platform: str
    train: list[Example] = field(default_factory=list)
    valid: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)
    valid_ranking: list[RankingCase] = field(default_factory=list)
    test_ranking: list[RankingCase] = field(default_factory=list)

    def split(self, name: str) -> list[Example]:
        return {"train": self.train, "valid": self.valid, "test": self.test}[name]

    def ranking(self, name: str) -> list[RankingCase]:
        return {"valid": self.valid_ranking, "test": self.test_ranking}[name]


def _rng(seed: int, platform: str, stream: str) -> np.random.Generator:
    """Independent, reproducible generators per (seed, platform, purpose)."""
    return np.random.default_rng([seed, zlib.crc32(platform.encode()), zlib.crc32(stream.encode())])


def _sample_unseen(
    rng: np.random.Generator, catalogue: np.ndarray, seen: set[str], count: int
) -> tuple[str, ...]:
    """``count`` distinct catalogue items not in ``seen`` (all of them if fewer exist)."""
    available = len(catalogue) - len(seen)
    if count >= available:
        picked = [item for item in catalogue if item not in seen]
        return tuple(rng.permutation(np.asarray(picked, dtype=object)).tolist())
    chosen: dict[str, None] = {}
    while len(chosen) < count:
        for index in rng.integers(0, len(catalogue), size=2 * (count - len(chosen))):
            item = catalogue[index]
            if item not in seen and item not in chosen:
                chosen[item] = None
                if len(chosen) == count:
                    break
    return tuple(chosen)


def build_task(data: PlatformData, config: TaskConfig | None = None) -> PlatformTask:
    """Turn a validated platform into examples and ranking cases under the fixed protocol."""
    config = config or TaskConfig()
    positive = data.positives(config.positive_threshold)
    catalogue = np.asarray(sorted(data.item_text), dtype=object)
    # Stable order: by time, ties broken by file order, so the split never depends on sorting luck.
    order = np.lexsort((np.arange(data.num_interactions), data.timestamps, data.users))
    task = PlatformTask(platform=data.name)
    eval_rng = _rng(config.seed, data.name, "eval-negatives")

    users = data.users[order]
    boundaries = np.flatnonzero(users[1:] != users[:-1]) + 1
    for rows in np.split(order, boundaries):
        user = str(data.users[rows[0]])
        # a generator per user: a user's training units depend on their own data alone, so
        # adding or removing a user (the user-level DP neighbour) changes no one else's
        train_rng = _rng(config.seed, data.name, f"train-negatives:{user}")
        seen = {str(item) for item in data.items[rows]}
        positive_positions = [k for k, row in enumerate(rows) if positive[row]]
        held_out = len(positive_positions) >= config.min_positives
        valid_start = positive_positions[-2] if held_out else len(rows)
        test_start = positive_positions[-1] if held_out else len(rows)

        history: list[str] = []  # newest last while scanning
        for k, row in enumerate(rows):
            item = str(data.items[row])
            label = int(positive[row])
            recent = tuple(reversed(history[-config.history_len :]))
            example = Example(user=user, history=recent, candidate=item, label=label)
            if k < valid_start:
                if label:
                    negatives = _sample_unseen(
                        train_rng, catalogue, seen, config.negatives_per_positive
                    )
                    task.train.append(Example(user, recent, item, 1, negatives))
                    task.train += [Example(user, recent, n, 0) for n in negatives]
                else:
                    task.train.append(example)
            else:
                split_examples, ranking = (
                    (task.valid, task.valid_ranking)
                    if k < test_start
                    else (task.test, task.test_ranking)
                )
                split_examples.append(example)
                if k in (valid_start, test_start):
                    negatives = _sample_unseen(eval_rng, catalogue, seen, config.eval_negatives)
                    if negatives:
                        ranking.append(RankingCase(user, recent, item, negatives))
            if label:
                history.append(item)
    return task


def training_units(train: list[Example], objective: str) -> list[Example]:
    """What one DP-SGD privacy unit is under ``objective``: every labelled example (``bce``),
    or each positive with its own sampled negatives (``softmax``: rated negatives, which have
    no positive to be ranked below, are left out)."""
    if objective == "bce":
        return [replace(e, negatives=()) if e.negatives else e for e in train]
    return [e for e in train if e.label and e.negatives]


@dataclass(frozen=True)
class SplitSizes:
    """How many examples and test ranking cases :func:`build_task` makes from a platform."""

    train: int
    valid: int
    test: int
    test_cases: int


def split_sizes(data: PlatformData, config: TaskConfig | None = None) -> SplitSizes:
    """The sizes :func:`build_task` would give, counted with array operations instead of one
    Python object per example: `fedfuse data check` summarises 10⁷-row platforms with it."""
    config = config or TaskConfig()
    if data.num_interactions == 0:
        return SplitSizes(0, 0, 0, 0)
    positive = data.positives(config.positive_threshold)
    users, _ = distinct_codes(data.users)
    items, _ = distinct_codes(data.items)
    # build_task's order, up to which user comes first: each user's rows by time, then file order
    order = np.lexsort((np.arange(data.num_interactions), data.timestamps, users))
    user_codes, item_codes = users[order], items[order]  # int32: memory for 10⁷ rows
    del users, items
    starts = np.flatnonzero(np.r_[True, user_codes[1:] != user_codes[:-1]])
    rows = np.diff(np.r_[starts, len(order)])
    is_positive = positive[order].astype(np.int32)
    positives = np.add.reduceat(is_positive, starts)
    # position (within the user's rows) of each positive, counted from the last one
    from_last = np.cumsum(is_positive[::-1], dtype=np.int32)[::-1]  # at or after each row
    from_last -= np.repeat(np.r_[from_last[starts[1:]], 0], rows)  # ... within the user
    position = np.arange(len(order), dtype=np.int32) - np.repeat(starts, rows).astype(np.int32)
    held_out = positives >= config.min_positives
    user_of_row = user_codes  # lexsort put the users' groups in code order: 0, 1, ...
    counted = (is_positive == 1) & held_out[user_of_row]
    valid_start, test_start = rows.copy(), rows.copy()  # users not held out: all train
    second_last, last = counted & (from_last == 2), counted & (from_last == 1)
    valid_start[user_of_row[second_last]] = position[second_last]
    test_start[user_of_row[last]] = position[last]
    # negatives are drawn from the items the user never interacted with
    width = int(item_codes.max()) + 1
    pairs = np.unique(user_codes.astype(np.int64) * width + item_codes)
    seen = np.bincount(pairs // width, minlength=len(starts))
    unseen = len(data.item_text) - seen
    train_positives = np.where(held_out, positives - 2, positives)
    negatives = np.minimum(config.negatives_per_positive, unseen)
    train = valid_start + train_positives * negatives
    valid = test_start - valid_start
    test = rows - test_start
    cases = held_out & (np.minimum(config.eval_negatives, unseen) > 0)
    return SplitSizes(int(train.sum()), int(valid.sum()), int(test.sum()), int(cases.sum()))
