"""The global time split of common.task: one cut in time for every user and platform."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from common.config import TaskConfig, load_config
from common.dataset_summary import describe
from common.errors import ConfigError
from common.task import (
    Example,
    PlatformTask,
    RankingCase,
    SplitSizes,
    build_task,
    split_sizes,
    time_cuts,
)
from tests.test_task import ROWS, platform

# ROWS plus e, who only arrives after the training period: a cold-start user.
LATE = [*ROWS, ("e", "i9", 1, 35), ("e", "i5", 5, 65), ("e", "i6", 4, 75)]
SEEN = {user: {item for u, item, _, _ in LATE if u == user} for user in {row[0] for row in LATE}}
WHEN = {(u, item): t for u, item, _, t in LATE}
# train: t < 30, validation: 30 <= t < 60, test: t >= 60
CUT = TaskConfig(
    history_len=2,
    negatives_per_positive=3,
    eval_negatives=99,
    split="global_time",
    valid_from=30,
    test_from=60,
)


@pytest.fixture(scope="module")
def task() -> PlatformTask:
    return build_task(platform(LATE), CUT)


def pairs(examples: list[Example], user: str | None = None) -> list[tuple[str, str, int]]:
    """(user, item, label) of the examples from actual interactions, in order."""
    return [
        (e.user, e.candidate, e.label)
        for e in examples
        if e.candidate in SEEN[e.user] and user in (None, e.user)
    ]


def test_periods_follow_the_cuts_for_every_user(task: PlatformTask) -> None:
    assert pairs(task.train) == [
        ("a", "i1", 1),
        ("a", "i2", 0),
        ("b", "i1", 1),
        ("b", "i9", 0),
        ("c", "i1", 1),
        ("c", "i2", 1),
        ("c", "i3", 1),
        ("d", "i4", 0),
    ]
    # the pointwise held-out lists hold every interaction of their period, negatives included
    assert pairs(task.valid) == [
        ("a", "i3", 1),
        ("a", "i4", 0),
        ("a", "i5", 1),
        ("b", "i2", 1),
        ("e", "i9", 0),
    ]
    assert pairs(task.test) == [("a", "i6", 0), ("a", "i7", 1), ("a", "i8", 0), ("e", "i5", 1)] + [
        ("e", "i6", 1)
    ]
    assert len(task.valid) == 5 and len(task.test) == 5  # no sampled negatives held out
    for e in task.train:
        assert e.time < 30
    for e in task.valid:
        assert 30 <= e.time < 60
    for e in task.test:
        assert e.time >= 60


def test_a_cut_equal_to_a_timestamp_starts_the_later_period() -> None:
    task = build_task(platform(LATE), TaskConfig(split="global_time", valid_from=20, test_from=70))
    assert ("a", "i2", 0) in pairs(task.valid) and ("a", "i7", 1) in pairs(task.test)
    assert ("a", "i1", 1) in pairs(task.train) and ("a", "i6", 0) in pairs(task.valid)


def test_every_held_out_positive_is_a_ranking_case(task: PlatformTask) -> None:
    # b has two positives only and e none in training: leave_last would hold out neither
    assert [(c.user, c.positive) for c in task.valid_ranking] == [
        ("a", "i3"),
        ("a", "i5"),
        ("b", "i2"),
    ]
    assert [(c.user, c.positive) for c in task.test_ranking] == [
        ("a", "i7"),
        ("e", "i5"),
        ("e", "i6"),
    ]
    for case in task.valid_ranking + task.test_ranking:
        assert case.time == WHEN[case.user, case.positive]
        assert len(set(case.negatives)) == len(case.negatives) == 99
        # never an item the user touches at any time: a later one would be a false negative
        assert not set(case.negatives) & SEEN[case.user]


def test_histories_cross_periods(task: PlatformTask) -> None:
    cases = {(c.user, c.positive): c.history for c in task.valid_ranking + task.test_ranking}
    assert cases == {
        ("a", "i3"): ("i1",),  # a train-period positive
        ("a", "i5"): ("i3", "i1"),  # validation and train
        ("b", "i2"): ("i1",),
        ("a", "i7"): ("i5", "i3"),  # test sees the validation period's positives
        ("e", "i5"): (),  # cold start: no history at all
        ("e", "i6"): ("i5",),  # an earlier test-period positive
    }
    (pointwise,) = [e for e in task.test if e.candidate == "i8"]
    assert pointwise.history == ("i7", "i5")


def test_cold_start_users_keep_their_cases(task: PlatformTask) -> None:
    assert not [e for e in task.train if e.user == "e"]
    assert [c.positive for c in task.test_ranking if c.user == "e"] == ["i5", "i6"]
    assert task.seen["e"] == frozenset({"i9", "i5", "i6"})


def test_train_negatives_exclude_only_the_training_period() -> None:
    # catalogue of 12: every item a had not touched before valid_from is each train positive's
    # negative, a's validation and test items (i3..i8) included, its train items never
    task = build_task(
        platform(LATE, catalogue=12), CUT.model_copy(update={"negatives_per_positive": 10})
    )
    train_a = {"i1", "i2"}
    negatives = [e.candidate for e in task.train if e.user == "a" and e.candidate not in train_a]
    assert sorted(negatives) == sorted({f"i{k}" for k in range(1, 13)} - train_a)
    assert {"i3", "i7"} <= set(negatives)
    (unit,) = [e for e in task.train if e.user == "a" and e.label]
    assert set(unit.negatives) == set(negatives) and unit.time == 10
    assert all(e.time == 10 for e in task.train if e.user == "a" and e.candidate in negatives)
    for case in task.valid_ranking + task.test_ranking:
        assert not set(case.negatives) & SEEN[case.user]


def test_a_users_units_depend_on_their_own_data_only(task: PlatformTask) -> None:
    without_b = build_task(platform([row for row in LATE if row[0] != "b"]), CUT)
    assert without_b.train == [e for e in task.train if e.user != "b"]


def test_build_is_deterministic_and_ignores_row_order(task: PlatformTask) -> None:
    assert build_task(platform(list(reversed(LATE))), CUT) == task


def test_split_sizes_of_the_hand_checked_platform(task: PlatformTask) -> None:
    # train: 8 interactions + 5 train positives x 3 negatives
    expected = SplitSizes(
        train=23, valid=5, test=5, test_cases=3, valid_cases=3, valid_users=2, test_users=2
    )
    assert split_sizes(platform(LATE), CUT) == expected
    assert len(task.train) == 23


def test_examples_and_cases_carry_their_time() -> None:
    task = build_task(platform(), TaskConfig(split="leave_last"))
    for e in task.train + task.valid + task.test:
        if e.candidate in SEEN[e.user]:
            assert e.time == WHEN[e.user, e.candidate]
    # positional construction, as before the field existed
    assert Example("u", (), "i1", 1, ("i2",)).time == 0.0
    assert RankingCase("u", (), "i1", ("i2",)).time == 0.0


def test_the_task_names_its_catalogue_and_what_each_user_touched(task: PlatformTask) -> None:
    assert task.catalogue == tuple(sorted(f"i{k}" for k in range(1, 121)))
    assert set(task.seen) == set(SEEN)
    assert all(task.seen[user] == frozenset(items) for user, items in SEEN.items())


def test_time_cuts_are_federation_quantiles() -> None:
    rows = [(f"u{t % 7}", f"i{t % 11 + 1}", 5, t) for t in range(1, 101)]
    first, second = platform(rows[:50], name="p1"), platform(rows[50:], name="p2")
    assert time_cuts([first, second]) == (71.0, 86.0)
    times = np.arange(1, 101)
    assert (times < 71).mean() == 0.7 and (times < 86).mean() == 0.85
    assert time_cuts([second, first], (0.5, 0.9)) == (51.0, 91.0)
    # platform 2 alone: its own quantiles, not the federation's
    assert time_cuts([second]) == (86.0, 93.0)
    tied = platform([("u", f"i{k}", 5, 7) for k in range(1, 5)])
    assert time_cuts([tied]) == (7.0, 7.0)
    with pytest.raises(ValueError, match="quantiles"):
        time_cuts([first], (0.9, 0.5))


def test_describe_prints_the_cuts_and_the_held_out_users() -> None:
    text = describe([platform(LATE, name="p1")], TaskConfig())
    lines = text.splitlines()
    # 18 timestamps: the 0.7 and 0.85 cuts are the 13th and 16th smallest (50 and 70)
    (line,) = [ln for ln in lines if ln.startswith("global time split")]
    assert line.startswith("global time split at quantiles 0.7/0.85: task.valid_from=50 (")
    assert "task.test_from=70 (" in line
    at_cuts = split_sizes(
        platform(LATE), TaskConfig(split="global_time", valid_from=50, test_from=70)
    )
    row = f"| p1 | {at_cuts.valid_users} | {at_cuts.valid_cases} | {at_cuts.test_users} | "
    assert row + f"{at_cuts.test_cases} |" in lines
    # today's table, for the configured split, is still there
    assert (
        "| platform | ratings | users | items | positive % | train | valid | test | test cases |"
        in lines
    )


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"valid_from": None}, "task.split = 'global_time' needs task.valid_from"),
        ({"split": "global_time", "test_from": None}, "needs task.test_from"),
        (
            {"split": "global_time", "valid_from": 5, "test_from": 5},
            r"task.valid_from \(5.0\) must be before task.test_from \(5.0\)",
        ),
        ({"split": "leave_last", "valid_from": 5}, "task.valid_from needs task.split = 'global_"),
        ({"split": "leave_last", "test_from": 5}, "task.test_from needs task.split = 'global_"),
        ({"split": "global_time", "valid_from": float("nan"), "test_from": 5}, "finite"),
        ({"split": "random"}, "'leave_last' or 'global_time'"),
    ],
)
def test_time_split_settings_are_validated(settings: dict[str, object], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TaskConfig(**settings)


def test_a_bad_time_split_override_is_a_one_line_error() -> None:
    with pytest.raises(ConfigError) as caught:
        load_config(None, ["task.split='global_time'", "task.valid_from=10", "task.test_from=5"])
    assert "\n" not in str(caught.value)
    assert "task.valid_from (10.0) must be before task.test_from (5.0)" in str(caught.value)
    config = load_config(
        None, ["task.split='global_time'", "task.valid_from=5", "task.test_from=10"]
    ).task
    assert (config.split, config.valid_from, config.test_from) == ("global_time", 5.0, 10.0)
