"""The recommendation task and its evaluation protocol, identical for every method.

Example: the user's most recent positively rated items on the platform before the target
interaction (up to ``history_len`` item ids, newest first) and a candidate item -> label 1 if
the target is positive, else 0. Training adds sampled items as negatives that the user never
interacted with in the training period: as labelled examples of their own (the pointwise
objective) and, on the positive train example, as its ``negatives`` (the ranking objective: the
positive against its own negatives, so one positive stays one privacy unit; see
:func:`training_units`). Only training-period items are excluded: excluding the user's held-out
items too would leak which items they go on to touch into the training data.

Two splits (``task.split``), both by time:

- ``leave_last`` (per user and platform): the last positive and everything after it -> test,
  the second-to-last positive up to the last -> validation, the rest -> train; a user with
  fewer than ``min_positives`` positives is train-only. One ranking case per held-out user and
  split (its first positive).
- ``global_time`` (one cut for every user and platform of a federation): train before
  ``valid_from``, validation from ``valid_from`` to ``test_from``, test from ``test_from`` on.
  Every held-out positive is a ranking case, users without training interactions included
  (cold start: what a deployed model faces), and its history is the user's positives before it
  in any period (a deployed model sees the history up to now). Nothing after a cut can shape a
  model selected on the period before it, so the protocol cannot be tuned on by accident.

Ranking cases put each held-out positive among ``eval_negatives`` items the user never
interacted with on that platform at any time, drawn from a seeded generator that depends only
on the data and the seed, so every method sees the same lists; full-catalogue metrics rank it
against every item instead (``PlatformTask.catalogue``, ``seen``).
"""

from __future__ import annotations

import zlib
from collections.abc import Iterator, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from common.config import TaskConfig
from common.errors import DataError
from common.platform_data import PlatformData, distinct_codes, read_carried
from common.platform_format import CARRIED

TRAIN, VALID, TEST = 0, 1, 2  # a row's period
CARRIED_PREFIX = "carried:"  # item ids from a platform's carried/ data, apart from its own


@dataclass(frozen=True)
class Example:
    """One labelled example: the privacy unit of DP training (record level)."""

    user: str
    history: tuple[str, ...]  # item ids, newest first
    candidate: str
    label: int
    negatives: tuple[str, ...] = ()  # a positive train example's own sampled negatives
    # Unix seconds of the interaction (a sampled negative: its positive's): pooled baselines
    # merge a person's histories across platforms by time
    time: float = 0.0
    # the person's liked items on other platforms before ``time``, newest first, as they
    # brought them (``carried_history``; ids namespaced by CARRIED_PREFIX)
    carried: tuple[str, ...] = ()


@dataclass(frozen=True)
class RankingCase:
    """A held-out positive to rank among negatives the user never interacted with."""

    user: str
    history: tuple[str, ...]
    positive: str
    negatives: tuple[str, ...]
    time: float = 0.0  # Unix seconds of the held-out interaction
    carried: tuple[str, ...] = ()  # as Example.carried

    @property
    def candidates(self) -> tuple[str, ...]:
        """Positive first, then the negatives: the scorer sees them in this fixed order."""
        return (self.positive, *self.negatives)


@dataclass
class PlatformTask:
    """A platform's examples for every split, plus its ranking cases.

    ``catalogue`` (sorted item ids) and ``seen`` (every item each user interacted with, at any
    time) let an evaluator rank a case's positive against the whole catalogue, the user's
    other items masked (common/evaluation.py).
    """

    platform: str
    train: list[Example] = field(default_factory=list)
    valid: list[Example] = field(default_factory=list)
    test: list[Example] = field(default_factory=list)
    valid_ranking: list[RankingCase] = field(default_factory=list)
    test_ranking: list[RankingCase] = field(default_factory=list)
    catalogue: tuple[str, ...] = ()
    seen: dict[str, frozenset[str]] = field(default_factory=dict)
    carried_text: dict[str, str] = field(default_factory=dict)  # texts of carried item ids
    carried: CarriedHistory | None = None  # what each person brought, with times

    def split(self, name: str) -> list[Example]:
        return {"train": self.train, "valid": self.valid, "test": self.test}[name]

    def ranking(self, name: str) -> list[RankingCase]:
        return {"valid": self.valid_ranking, "test": self.test_ranking}[name]


def _rng(seed: int, platform: str, stream: str) -> np.random.Generator:
    """Independent, reproducible generators per (seed, platform, purpose)."""
    return np.random.default_rng([seed, zlib.crc32(platform.encode()), zlib.crc32(stream.encode())])


def _sample_unseen(
    rng: np.random.Generator, catalogue: np.ndarray, seen: AbstractSet[str], count: int
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


def global_periods(times: np.ndarray, config: TaskConfig) -> np.ndarray:
    """TRAIN, VALID or TEST for each time under the global time split's two cuts."""
    return (times >= config.valid_from).astype(np.int8) + (times >= config.test_from)


def _user_periods(
    times: np.ndarray, positive: np.ndarray, config: TaskConfig
) -> tuple[np.ndarray, np.ndarray]:
    """One user's rows (in time order): each row's period (TRAIN, VALID, TEST) and whether it
    is a ranking case. The reference :func:`split_sizes` is checked against."""
    if config.split == "global_time":
        period = global_periods(times, config)
        return period, positive & (period != TRAIN)
    period = np.full(len(times), TRAIN, dtype=np.int8)
    case = np.zeros(len(times), dtype=bool)
    positions = np.flatnonzero(positive)
    if len(positions) >= config.min_positives:
        period[positions[-2] :] = VALID
        period[positions[-1] :] = TEST
        case[positions[-2:]] = True
    return period, case


class CarriedHistory:
    """Each person's liked items from other platforms (the platform's ``carried/`` data), to
    look up what they had liked elsewhere before a given time."""

    def __init__(self, data: PlatformData, config: TaskConfig) -> None:
        liked = data.positives(config.positive_threshold)
        order = np.lexsort((np.arange(data.num_interactions), data.timestamps, data.users))
        order = order[liked[order]]
        self.limit = config.history_len
        self.times: dict[str, np.ndarray] = {}
        self.items: dict[str, list[str]] = {}
        users = data.users[order]
        for rows in np.split(order, np.flatnonzero(users[1:] != users[:-1]) + 1):
            if len(rows):
                user = str(data.users[rows[0]])
                self.times[user] = data.timestamps[rows]
                self.items[user] = [CARRIED_PREFIX + str(i) for i in data.items[rows]]
        self.text = {CARRIED_PREFIX + k: v for k, v in data.item_text.items()}

    def events(self) -> Iterator[tuple[str, float, str]]:
        """Every (user, time, item) brought, each person's in time order."""
        for user, times in self.times.items():
            yield from zip([user] * len(times), times.tolist(), self.items[user], strict=True)

    def before(self, user: str, when: float) -> tuple[str, ...]:
        """The person's liked items elsewhere strictly before ``when``, newest first."""
        times = self.times.get(user)
        if times is None:
            return ()
        end = int(np.searchsorted(times, when, side="left"))
        return tuple(reversed(self.items[user][max(0, end - self.limit) : end]))


def build_task(
    data: PlatformData, config: TaskConfig | None = None, carried: bool = False
) -> PlatformTask:
    """Turn a validated platform into examples and ranking cases under the configured split;
    ``carried``: each example and case also holds the person's history from elsewhere (the
    platform's ``carried/`` data, which must then exist)."""
    config = config or TaskConfig()
    positive = data.positives(config.positive_threshold)
    catalogue = np.asarray(sorted(data.item_text), dtype=object)
    # Stable order: by time, ties broken by file order, so the split never depends on sorting luck.
    order = np.lexsort((np.arange(data.num_interactions), data.timestamps, data.users))
    task = PlatformTask(platform=data.name, catalogue=tuple(catalogue.tolist()))
    elsewhere = None
    if carried:
        other_platforms = read_carried(data)
        if other_platforms is None:
            raise DataError(
                data.root / CARRIED,
                "model.carried_history needs the platform's carried/ folder (its users' "
                "histories from other platforms; fedfuse data prepare writes it for MovieLens)",
            )
        elsewhere = task.carried = CarriedHistory(other_platforms, config)
        task.carried_text.update(elsewhere.text)
    eval_rng = _rng(config.seed, data.name, "eval-negatives")

    users = data.users[order]
    boundaries = np.flatnonzero(users[1:] != users[:-1]) + 1
    for rows in np.split(order, boundaries):
        user = str(data.users[rows[0]])
        # a generator per user: a user's training units depend on their own data alone, so
        # adding or removing a user (the user-level DP neighbour) changes no one else's
        train_rng = _rng(config.seed, data.name, f"train-negatives:{user}")
        items = [str(item) for item in data.items[rows]]
        times = data.timestamps[rows]
        labels = positive[rows]
        periods, cases = _user_periods(times, labels, config)
        seen = task.seen[user] = frozenset(items)
        train_seen = {item for item, period in zip(items, periods, strict=True) if period == TRAIN}

        history: list[str] = []  # newest last while scanning
        for item, when, label, period, is_case in zip(
            items, times.tolist(), labels.tolist(), periods.tolist(), cases.tolist(), strict=True
        ):
            recent = tuple(reversed(history[-config.history_len :]))
            brought = elsewhere.before(user, when) if elsewhere is not None else ()
            example = Example(user, recent, item, int(label), time=when, carried=brought)
            if period == TRAIN:
                if label:
                    negatives = _sample_unseen(
                        train_rng, catalogue, train_seen, config.negatives_per_positive
                    )
                    task.train.append(replace(example, negatives=negatives))
                    task.train += [
                        Example(user, recent, n, 0, time=when, carried=brought) for n in negatives
                    ]
                else:
                    task.train.append(example)
            else:
                split_examples, ranking = (
                    (task.valid, task.valid_ranking)
                    if period == VALID
                    else (task.test, task.test_ranking)
                )
                split_examples.append(example)
                if is_case:
                    negatives = _sample_unseen(eval_rng, catalogue, seen, config.eval_negatives)
                    if negatives:
                        ranking.append(RankingCase(user, recent, item, negatives, when, brought))
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
    """How many examples, ranking cases and users with a case :func:`build_task` makes."""

    train: int
    valid: int
    test: int
    test_cases: int
    valid_cases: int
    valid_users: int  # users with at least one validation ranking case
    test_users: int  # users with at least one test ranking case


def _leave_last_periods(
    user_codes: np.ndarray, starts: np.ndarray, is_positive: np.ndarray, min_positives: int
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_user_periods` of ``leave_last`` for every row at once (rows grouped by user)."""
    rows = np.diff(np.r_[starts, len(user_codes)])
    positive = is_positive.astype(np.int32)
    # positives strictly after each row, within its user: 0 from the last positive on (test),
    # 1 from the second-to-last (validation)
    after = np.cumsum(positive[::-1], dtype=np.int32)[::-1] - positive
    after -= np.repeat(np.r_[after[starts[1:]] + positive[starts[1:]], 0], rows).astype(np.int32)
    held_out = (np.add.reduceat(positive, starts) >= min_positives)[user_codes]
    period = np.where(held_out, TEST - np.minimum(after, 2), TRAIN).astype(np.int8)
    return period, held_out & is_positive & (after <= 1)


def split_sizes(data: PlatformData, config: TaskConfig | None = None) -> SplitSizes:
    """The sizes :func:`build_task` would give, counted with array operations instead of one
    Python object per example: `fedfuse data check` summarises 10⁷-row platforms with it."""
    config = config or TaskConfig()
    if data.num_interactions == 0:
        return SplitSizes(0, 0, 0, 0, 0, 0, 0)
    positive = data.positives(config.positive_threshold)
    users, _ = distinct_codes(data.users)
    items, _ = distinct_codes(data.items)
    # build_task's order, up to which user comes first: each user's rows by time, then file order
    order = np.lexsort((np.arange(data.num_interactions), data.timestamps, users))
    user_codes, item_codes = users[order], items[order]  # int32: memory for 10⁷ rows
    del users, items
    # lexsort put the users' groups in code order (0, 1, ...): a code indexes per-user arrays
    starts = np.flatnonzero(np.r_[True, user_codes[1:] != user_codes[:-1]])
    is_positive = positive[order]
    if config.split == "global_time":
        period = global_periods(data.timestamps[order], config)
        case = is_positive & (period != TRAIN)
    else:
        period, case = _leave_last_periods(user_codes, starts, is_positive, config.min_positives)
    # negatives are drawn from the items the user never interacted with: in the training
    # period for train negatives, at any time for ranking cases
    width = int(item_codes.max()) + 1
    pairs = user_codes.astype(np.int64) * width + item_codes
    in_train = period == TRAIN

    def unseen(mask: np.ndarray | None = None) -> np.ndarray:
        distinct = np.unique(pairs if mask is None else pairs[mask])
        return len(data.item_text) - np.bincount(distinct // width, minlength=len(starts))

    train_positives = np.bincount(user_codes[in_train & is_positive], minlength=len(starts))
    negatives = np.minimum(config.negatives_per_positive, unseen(in_train))
    ranked = case & (np.minimum(config.eval_negatives, unseen()) > 0)[user_codes]
    valid_cases, test_cases = ranked & (period == VALID), ranked & (period == TEST)
    return SplitSizes(
        train=int(in_train.sum() + (train_positives * negatives).sum()),
        valid=int((period == VALID).sum()),
        test=int((period == TEST).sum()),
        test_cases=int(test_cases.sum()),
        valid_cases=int(valid_cases.sum()),
        valid_users=len(np.unique(user_codes[valid_cases])),
        test_users=len(np.unique(user_codes[test_cases])),
    )


def check_ranking_cases(
    path: Path | str, platforms: Sequence[PlatformData], config: TaskConfig, split: str
) -> None:
    """Refuse a federation without one ranking case on ``split``: there would be nothing to
    evaluate (Flower's weighted mean of the platforms' metrics divides by zero). ``fedfuse
    data check`` and ``fedfuse simulate`` both call it, so they accept the same data."""
    if any(getattr(split_sizes(p, config), f"{split}_cases") for p in platforms):
        return
    need = (
        f"a user with at least {config.min_positives} positive interactions"
        if config.split == "leave_last"
        else f"a positive interaction in the {split} period of task.split = global_time"
    )
    raise DataError(path, f"no platform has a {split} ranking case: the {split} split needs {need}")


def time_cuts(
    platforms: Sequence[PlatformData], quantiles: tuple[float, float] = (0.7, 0.85)
) -> tuple[float, float]:
    """``(valid_from, test_from)`` for a global time split: the interaction times at
    ``quantiles`` over the whole federation (one cut for every platform, so no platform's
    test period overlaps another's training period). Each cut is an observed timestamp, the
    q-th share of interactions lying before it (fewer where timestamps tie); heavy ties can
    make the cuts equal, which ``task.valid_from < task.test_from`` then rejects."""
    low, high = quantiles
    if not 0 < low < high < 1:
        raise ValueError(f"time_cuts: quantiles must satisfy 0 < low < high < 1, got {quantiles}")
    times = np.concatenate(
        [np.asarray(p.timestamps, dtype=np.float64) for p in platforms] or [np.zeros(0)]
    )
    if not len(times):
        raise ValueError("time_cuts: the federation has no interactions")
    ranks = [min(int(q * len(times) + 1e-9), len(times) - 1) for q in quantiles]
    cut = np.partition(times, ranks)
    return float(cut[ranks[0]]), float(cut[ranks[1]])
