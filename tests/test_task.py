"""The evaluation protocol of common.task on a hand-built platform."""

from __future__ import annotations

import numpy as np
import pytest

from common.config import TaskConfig
from common.platform_data import PlatformData
from common.task import (
    Example,
    PlatformTask,
    SplitSizes,
    build_task,
    split_sizes,
    training_units,
)

# (user, item, rating, timestamp), deliberately not in time order.
ROWS = [
    ("a", "i3", 4, 30),
    ("b", "i1", 5, 10),
    ("a", "i1", 5, 10),
    ("a", "i8", 2, 80),
    ("a", "i2", 2, 20),
    ("c", "i3", 5, 3),
    ("a", "i5", 5, 50),
    ("a", "i4", 1, 40),
    ("b", "i9", 1, 20),
    ("a", "i7", 4, 70),
    ("c", "i1", 5, 1),
    ("a", "i6", 3, 60),
    ("b", "i2", 4, 30),
    ("c", "i2", 5, 2),
    ("d", "i4", 1, 5),
]
SEEN = {user: {item for u, item, _, _ in ROWS if u == user} for user in {row[0] for row in ROWS}}
# items each user touched in the training period (before their second-to-last positive)
TRAIN_SEEN = {"a": {"i1", "i2", "i3", "i4"}, "b": SEEN["b"], "c": {"i1"}, "d": {"i4"}}
CONFIG = TaskConfig(split="leave_last", history_len=2, negatives_per_positive=3, eval_negatives=99)


def platform(rows=ROWS, catalogue: int = 120, name: str = "tiny") -> PlatformData:
    users, items, ratings, times = zip(*rows, strict=True)
    return PlatformData(
        name=name,
        root=None,  # type: ignore[arg-type]
        users=np.asarray(users, dtype=object),
        items=np.asarray(items, dtype=object),
        ratings=np.asarray(ratings, dtype=np.float64),
        labels=np.full(len(rows), -1, np.int8),
        timestamps=np.asarray(times, dtype=np.float64),
        item_text={f"i{k}": f"item {k}" for k in range(1, catalogue + 1)},
        label_kind="rating",
    )


def real(examples: list[Example], user: str) -> list[Example]:
    """The user's examples from actual interactions (not sampled negatives)."""
    return [e for e in examples if e.user == user and e.candidate in SEEN[user]]


def sampled(examples: list[Example], user: str) -> list[Example]:
    return [e for e in examples if e.user == user and e.candidate not in SEEN[user]]


@pytest.fixture(scope="module")
def task() -> PlatformTask:
    return build_task(platform(), CONFIG)


def test_split_membership_follows_the_docstring(task: PlatformTask):
    # a's positives in time order: i1, i3, i5, i7.
    # Train: before the second-to-last positive (i5); valid: i5 up to i7; test: i7 and after.
    assert [(e.candidate, e.label) for e in real(task.train, "a")] == [
        ("i1", 1),
        ("i2", 0),
        ("i3", 1),
        ("i4", 0),
    ]
    assert [(e.candidate, e.label) for e in real(task.valid, "a")] == [("i5", 1), ("i6", 0)]
    assert [(e.candidate, e.label) for e in real(task.test, "a")] == [("i7", 1), ("i8", 0)]
    # c has exactly three positives: one of each.
    assert [e.candidate for e in real(task.train, "c")] == ["i1"]
    assert [e.candidate for e in task.valid if e.user == "c"] == ["i2"]
    assert [e.candidate for e in task.test if e.user == "c"] == ["i3"]


def test_valid_and_test_hold_no_sampled_negatives(task: PlatformTask):
    for examples in (task.valid, task.test):
        assert all(e.candidate in SEEN[e.user] for e in examples)
    assert len(task.valid) == 3 and len(task.test) == 3


def test_users_with_fewer_than_three_positives_are_train_only(task: PlatformTask):
    for user in ("b", "d"):  # two positives, none
        assert not [e for e in task.valid + task.test if e.user == user]
        assert not [c for c in task.valid_ranking + task.test_ranking if c.user == user]
    assert [(e.candidate, e.label) for e in real(task.train, "b")] == [
        ("i1", 1),
        ("i9", 0),
        ("i2", 1),
    ]
    assert [(e.candidate, e.label) for e in real(task.train, "d")] == [("i4", 0)]
    assert sampled(task.train, "d") == []


def test_history_is_newest_first_and_capped(task: PlatformTask):
    histories = {e.candidate: e.history for e in real(task.train + task.valid + task.test, "a")}
    assert histories == {
        "i1": (),
        "i2": ("i1",),
        "i3": ("i1",),
        "i4": ("i3", "i1"),
        "i5": ("i3", "i1"),
        "i6": ("i5", "i3"),
        "i7": ("i5", "i3"),
        "i8": ("i7", "i5"),  # four earlier positives, capped at history_len = 2
    }


def test_history_only_holds_earlier_positives(task: PlatformTask):
    when = {(u, item): t for u, item, _, t in ROWS}
    liked = {(u, item) for u, item, rating, _ in ROWS if rating >= CONFIG.positive_threshold}
    examples = task.train + task.valid + task.test
    for e in examples:
        if e.candidate not in SEEN[e.user]:
            continue
        assert len(e.history) <= CONFIG.history_len
        times = [when[e.user, item] for item in e.history]
        assert all((e.user, item) in liked for item in e.history)
        assert all(t < when[e.user, e.candidate] for t in times)
        assert times == sorted(times, reverse=True)


def test_longer_history_len_keeps_all_earlier_positives():
    task = build_task(platform(), TaskConfig(split="leave_last", history_len=10))
    (last,) = [e for e in task.test if e.user == "a" and e.candidate == "i8"]
    assert last.history == ("i7", "i5", "i3", "i1")


def test_train_negatives_are_unseen_and_counted(task: PlatformTask):
    for user, train_positives in (("a", 2), ("b", 2), ("c", 1)):
        negatives = sampled(task.train, user)
        assert len(negatives) == CONFIG.negatives_per_positive * train_positives
        assert all(e.label == 0 for e in negatives)
        assert all(e.candidate in platform().item_text for e in negatives)
        assert not {e.candidate for e in negatives} & TRAIN_SEEN[user]
    # Each positive's negatives follow it, share its history and are distinct.
    train_a = [e for e in task.train if e.user == "a"]
    assert [e.candidate for e in train_a].index("i1") == 0
    group = train_a[1:4]
    assert all(e.history == () for e in group)
    assert len({e.candidate for e in group}) == 3
    assert train_a[4].candidate == "i2"


def test_each_train_positive_carries_its_own_negatives_as_a_ranking_unit(task: PlatformTask):
    units = training_units(task.train, "softmax")
    positives = [e for e in task.train if e.label]
    assert [(e.user, e.candidate) for e in units] == [(e.user, e.candidate) for e in positives]
    for unit in units:
        pointwise = [
            e.candidate
            for e in task.train
            if e.user == unit.user and e.history == unit.history and not e.label
        ]
        assert set(unit.negatives) <= set(pointwise) and len(unit.negatives) == 3
        assert not set(unit.negatives) & TRAIN_SEEN[unit.user]
    # the pointwise objective trains on every labelled example, negatives not attached
    bce = training_units(task.train, "bce")
    assert len(bce) == len(task.train) and not any(e.negatives for e in bce)
    assert [(e.user, e.candidate, e.label) for e in bce] == [
        (e.user, e.candidate, e.label) for e in task.train
    ]


def test_no_negatives_when_negatives_per_positive_is_zero():
    task = build_task(platform(), TaskConfig(split="leave_last", negatives_per_positive=0))
    assert all(e.candidate in SEEN[e.user] for e in task.train)
    assert len(task.train) == len(ROWS) - len(task.valid) - len(task.test)


def test_ranking_cases(task: PlatformTask):
    assert [(c.user, c.positive) for c in task.valid_ranking] == [("a", "i5"), ("c", "i2")]
    assert [(c.user, c.positive) for c in task.test_ranking] == [("a", "i7"), ("c", "i3")]
    (valid_a, _), (test_a, _) = task.valid_ranking, task.test_ranking
    assert valid_a.history == ("i3", "i1")
    assert test_a.history == ("i5", "i3")
    for case in task.valid_ranking + task.test_ranking:
        assert len(case.negatives) == 99
        assert len(set(case.negatives)) == 99
        assert not set(case.negatives) & SEEN[case.user]
        assert case.candidates == (case.positive, *case.negatives)
    assert valid_a.negatives != test_a.negatives


def test_ranking_takes_all_unseen_items_when_fewer_exist():
    task = build_task(
        platform(catalogue=12), TaskConfig(split="leave_last", negatives_per_positive=10)
    )
    unseen_a = {f"i{k}" for k in range(1, 13)} - SEEN["a"]
    assert len(unseen_a) == 4
    for case in task.valid_ranking + task.test_ranking:
        if case.user == "a":
            assert len(case.negatives) == 4
            assert set(case.negatives) == unseen_a
    # Train negatives are capped the same way, but only the training period counts as seen:
    # all eight items a had not touched before validation, per train positive, a's later
    # (held-out) items i5..i8 included: excluding them would leak a's future into training.
    negatives = [e.candidate for e in task.train if e.user == "a" and not e.label]
    negatives = [item for item in negatives if item not in TRAIN_SEEN["a"]]
    assert len(negatives) == 2 * 8
    assert set(negatives) == {f"i{k}" for k in range(1, 13)} - TRAIN_SEEN["a"]


def test_no_ranking_case_when_every_item_was_seen():
    rows = [("a", "i1", 5, 1), ("a", "i2", 5, 2), ("a", "i3", 5, 3)]
    task = build_task(platform(rows, catalogue=3), CONFIG)
    assert [e.candidate for e in task.test] == ["i3"]
    assert task.valid_ranking == task.test_ranking == []


def test_build_is_deterministic(task: PlatformTask):
    assert build_task(platform(), CONFIG) == task
    # Only the data matter, not the order of the file's rows.
    assert build_task(platform(list(reversed(ROWS))), CONFIG) == task


def test_seed_and_platform_change_the_samples(task: PlatformTask):
    other_seed = build_task(platform(), CONFIG.model_copy(update={"seed": 1}))
    other_name = build_task(platform(name="other"), CONFIG)
    for other in (other_seed, other_name):
        assert [e.candidate for e in real(other.train, "a")] == ["i1", "i2", "i3", "i4"]
        assert [c.negatives for c in other.test_ranking] != [c.negatives for c in task.test_ranking]


def test_a_users_training_units_depend_on_their_own_data_only(task: PlatformTask):
    """The user-level DP neighbour: without user b, every other user's training units,
    sampled negatives included, are exactly as with b."""
    without_b = build_task(platform([row for row in ROWS if row[0] != "b"]), CONFIG)
    assert without_b.train == [e for e in task.train if e.user != "b"]
    assert any(e.user == "c" for e in without_b.train)  # a user after b in the draw order


def test_timestamp_ties_keep_file_order():
    rows = [("a", "i2", 5, 10), ("a", "i1", 5, 10), ("a", "i3", 5, 20), ("a", "i4", 5, 30)]
    task = build_task(platform(rows), CONFIG)
    assert [e.candidate for e in real(task.train, "a")] == ["i2", "i1"]
    assert [e.history for e in real(task.train, "a")] == [(), ("i2",)]


def test_threshold_and_label_platforms():
    strict = build_task(platform(), TaskConfig(split="leave_last", positive_threshold=5.0))
    # With rating >= 5 only, a has two positives (i1, i5): train-only.
    assert not [e for e in strict.valid + strict.test if e.user == "a"]
    labelled = platform()
    labelled.labels = (labelled.ratings >= 4).astype(np.int8)
    labelled.ratings = np.full(len(ROWS), np.nan)
    labelled.label_kind = "label"
    assert build_task(labelled, CONFIG) == build_task(platform(), CONFIG)


def _random_platform(seed: int) -> PlatformData:
    """Random users, items, ratings and timestamps with ties and a small catalogue, so every
    branch of the split counts: users never held out, too few unseen items, none at all."""
    rng = np.random.default_rng(seed)
    size = int(rng.integers(1, 400))
    rows = [
        (f"u{rng.integers(0, 25)}", f"i{rng.integers(1, 13)}", int(rng.integers(1, 6)), int(t))
        for t in rng.integers(0, 40, size)
    ]
    return platform(rows, catalogue=int(rng.integers(12, 20)), name=f"p{seed}")


def sizes_of(task: PlatformTask) -> SplitSizes:
    """What split_sizes must count, read off a built task."""
    return SplitSizes(
        train=len(task.train),
        valid=len(task.valid),
        test=len(task.test),
        test_cases=len(task.test_ranking),
        valid_cases=len(task.valid_ranking),
        valid_users=len({case.user for case in task.valid_ranking}),
        test_users=len({case.user for case in task.test_ranking}),
    )


def _time_split(valid_from: float, test_from: float, **settings: object) -> TaskConfig:
    return TaskConfig(split="global_time", valid_from=valid_from, test_from=test_from, **settings)


SIZE_CONFIGS = [
    CONFIG,
    TaskConfig(split="leave_last", negatives_per_positive=4, eval_negatives=5),
    _time_split(15, 28, history_len=2, negatives_per_positive=3),
    _time_split(0.5, 39.5, negatives_per_positive=4, eval_negatives=5),
    _time_split(-1, 0),  # nothing trains, time 0 is already test
    _time_split(100, 200),  # everything trains
]


@pytest.mark.parametrize("seed", range(40))
@pytest.mark.parametrize("config", SIZE_CONFIGS, ids=lambda c: f"{c.split}:{c.valid_from}")
def test_split_sizes_count_what_build_task_builds(seed: int, config: TaskConfig) -> None:
    data = _random_platform(seed)
    assert split_sizes(data, config) == sizes_of(build_task(data, config))


def test_split_sizes_of_the_hand_checked_platform(task: PlatformTask) -> None:
    assert split_sizes(platform(), CONFIG) == sizes_of(task)
    # train: 15 rows - 6 held out + 3 negatives for each of the 5 train positives (a 2, b 2, c 1)
    expected = SplitSizes(9 + 3 * 5, 3, 3, test_cases=2, valid_cases=2, valid_users=2, test_users=2)
    assert sizes_of(task) == expected
