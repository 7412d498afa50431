"""The DP popularity prior: a Gaussian mechanism in the ledger, released once, audited."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from client.ledger import (
    EXAMPLE,
    GAUSSIAN_HISTOGRAM,
    LEDGER_FILE,
    USER,
    LedgerError,
    PrivacyLedger,
    epsilon,
)
from client.noise_calibration import calibrate_noise
from client.platform_client import PlatformClient, PlatformIdentity
from client.popularity_prior import (
    PRIOR_FILE,
    popularity_prior,
    prior_mechanism,
    prior_scores,
    unit_histogram,
)
from common.config import DPConfig, TaskConfig, load_config, with_settings
from common.platform_data import read_dataset
from common.task import Example, PlatformTask, build_task
from server.audit.ledger_checks import audit_ledger


@pytest.fixture(scope="module")
def task(synthetic_dir: Path):
    data = read_dataset(synthetic_dir)[0]
    return build_task(data, TaskConfig(split="leave_last")), sorted(data.item_text)


def _ledger(folder: Path, task, unit: str = EXAMPLE) -> PrivacyLedger:
    return PrivacyLedger.open(folder, "p", 1e-4, 8.0, len(task[0].train), unit)


def test_exact_counts_without_dp(tmp_path: Path, task) -> None:
    platform_task, items = task
    counts = popularity_prior(tmp_path, platform_task, items, None, None)
    positives = [e.candidate for e in platform_task.train if e.label == 1]
    assert counts == {item: float(positives.count(item)) for item in items}
    assert not (tmp_path / PRIOR_FILE).exists()  # nothing released, nothing stored


@pytest.mark.parametrize("unit", [EXAMPLE, USER])
def test_dp_release_is_charged_once_and_reused(tmp_path: Path, task, unit: str) -> None:
    platform_task, items = task
    ledger = _ledger(tmp_path, task, unit)
    first = popularity_prior(tmp_path, platform_task, items, 2.0, ledger)
    again = popularity_prior(tmp_path, platform_task, items, 2.0, _ledger(tmp_path, task, unit))
    assert first == again  # a restart reads the stored release, it does not draw again
    entries = PrivacyLedger.load(tmp_path / LEDGER_FILE).entries
    assert [
        (e["kind"], e["unit"], e["server_round"], e["sample_rate"], e["steps"]) for e in entries
    ] == [(GAUSSIAN_HISTOGRAM, unit, 0, 1.0, 1)]
    exact = unit_histogram(platform_task, unit)
    assert not np.allclose(list(first.values()), [exact.get(i, 0.0) for i in items])  # noised
    stored = json.loads((tmp_path / PRIOR_FILE).read_text())
    assert stored["noise_multiplier"] == 2.0 and stored["l2_sensitivity"] == 1.0
    assert stored["privacy_unit"] == unit


@pytest.mark.parametrize("unit", [EXAMPLE, USER])
def test_one_privacy_unit_moves_the_histogram_by_at_most_one(task, unit: str) -> None:
    """The L2 sensitivity the release is noised for: removing one positive example, or all of
    one user's examples (one user liking an item twice included), moves it by ≤ 1."""
    platform_task, _ = task
    train = [*platform_task.train, Example("fan", (), "i1", 1), Example("fan", (), "i1", 1)]
    full = unit_histogram(PlatformTask("p", train=train), unit)
    if unit == EXAMPLE:
        neighbours = [train[:k] + train[k + 1 :] for k, e in enumerate(train) if e.label]
    else:
        neighbours = [[e for e in train if e.user != user] for user in {e.user for e in train}]
    moves = []
    for neighbour in neighbours:
        smaller = unit_histogram(PlatformTask("p", train=neighbour), unit)
        moves.append(np.sqrt(sum((full[i] - smaller.get(i, 0.0)) ** 2 for i in full)))
    assert max(moves) == pytest.approx(1.0) and len(moves) > 10
    if unit == USER:  # a user of n distinct likes adds 1/√n to each: here 4 likes, ½ each
        alone = [Example("solo", (), item, 1) for item in "abcd"]
        assert unit_histogram(PlatformTask("p", train=alone), USER) == dict.fromkeys("abcd", 0.5)


def test_release_with_another_sigma_is_refused(tmp_path: Path, task) -> None:
    platform_task, items = task
    popularity_prior(tmp_path, platform_task, items, 2.0, _ledger(tmp_path, task))
    with pytest.raises(LedgerError, match="released with σ = 2"):
        popularity_prior(tmp_path, platform_task, items, 3.0, _ledger(tmp_path, task))


def test_release_over_budget_draws_nothing(tmp_path: Path, task) -> None:
    platform_task, items = task
    ledger = PrivacyLedger.open(tmp_path, "p", 1e-4, 0.1, len(platform_task.train))
    with pytest.raises(Exception, match="budget exhausted"):
        popularity_prior(tmp_path, platform_task, items, 1.0, ledger)
    assert not (tmp_path / PRIOR_FILE).exists() and not (tmp_path / LEDGER_FILE).exists()


def test_noise_has_the_recorded_scale(tmp_path: Path) -> None:
    """Many items, zero counts: the released values are N(0, σ²) draws."""
    from common.task import PlatformTask

    items = [str(k) for k in range(4000)]
    empty = PlatformTask("p")
    ledger = PrivacyLedger.open(tmp_path, "p", 1e-4, 8.0, 1000)
    counts = popularity_prior(tmp_path, empty, items, 5.0, ledger)
    values = np.array(list(counts.values()))
    assert abs(values.std() - 5.0) < 0.3 and abs(values.mean()) < 0.3


def test_prior_scores_are_standardised_log_counts() -> None:
    scores = prior_scores({"a": 0.0, "b": 9.0, "c": -4.0, "d": 99.0})
    assert scores["a"] == scores["c"]  # negative noisy counts clip to 0
    assert scores["d"] > scores["b"] > scores["a"]
    values = np.array(list(scores.values()))
    assert abs(values.mean()) < 1e-9 and abs(values.std() - 1) < 1e-9


def test_training_noise_is_calibrated_with_the_prior_composed() -> None:
    dp = DPConfig(target_epsilon=2.0, delta=1e-5)
    prior = prior_mechanism(3.0)
    alone = calibrate_noise(dp, 0.05, 200)
    with_prior = calibrate_noise(dp, 0.05, 200, [prior])
    assert with_prior > alone  # the prior's share leaves less for training
    from client.ledger import Mechanism

    total = epsilon([prior, Mechanism(with_prior, 0.05, 200, 1.0)], dp.delta)
    assert 1.95 < total <= 2.0
    with pytest.raises(Exception, match="leaves nothing for training"):
        calibrate_noise(DPConfig(target_epsilon=0.1, delta=1e-5), 0.05, 200, [prior_mechanism(1.0)])


def test_audit_recomputes_the_release_independently(tmp_path: Path, task) -> None:
    platform_task, items = task
    popularity_prior(tmp_path, platform_task, items, 2.0, _ledger(tmp_path, task))
    summary, flags = audit_ledger(PrivacyLedger.load(tmp_path / LEDGER_FILE))
    assert flags == []
    (release,) = summary["rounds"]
    assert release["mechanism"] == GAUSSIAN_HISTOGRAM
    assert release["epsilon_pld_recomputed"] == pytest.approx(release["epsilon_prv"], rel=0.01)


@pytest.mark.parametrize("unit", [EXAMPLE, USER])
def test_platform_client_uses_its_release_and_evaluation_reuses_it(
    tmp_path: Path, write_run_config, synthetic_dir: Path, unit: str
) -> None:
    """Also: the ledger, the release and the planned rounds are in ``dp.unit``; under ``user``
    the ledger counts users and q is over users (4 of them expected: 32 units / k = 8)."""
    config = load_config(
        write_run_config(
            tmp_path / "run.toml",
            prior={"noise_multiplier": 2.0},
            dp={"target_epsilon": 4.0, "delta": 1e-3, "expected_batch_size": 32, "unit": unit},
        )
    )
    name = read_dataset(synthetic_dir)[0].name
    identity = PlatformIdentity(name, synthetic_dir / name, tmp_path / "state")
    client = PlatformClient(identity, config)
    stored = json.loads((tmp_path / "state" / PRIOR_FILE).read_text())["counts"]
    assert client.prior_counts == stored
    assert client.ledger is not None and client.ledger.unit == unit
    units = len(client.trainer.examples)
    users = len({e.user for e in client.trainer.examples})
    size = users if unit == USER else units
    assert client.ledger.header["dataset_size"] == client.trainer.privacy_units == size
    assert [e["unit"] for e in client.ledger.entries] == [unit]  # the prior's release
    planned = client.planned_mechanism()
    assert planned is not None and planned.unit == unit
    assert planned.sample_rate == 1 / math.ceil(size / min(size, 4 if unit == USER else 32))
    # an evaluation-only client (DP off) on the same state folder scores with the release
    judge = PlatformClient(identity, with_settings(config, dp={"enabled": False}))
    assert judge.prior_counts == stored
    assert judge.featurizer.prior.tolist() == client.featurizer.prior.tolist()
