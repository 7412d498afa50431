"""The DP popularity prior, checked by ``fedfuse audit`` for the noise its ledger records."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from client.ledger import PrivacyLedger
from client.popularity_prior import FORMAT, PRIOR_FILE, prior_mechanism
from server.audit.evidence_checks import prior_flags

SIGMA = 0.5  # below 1 the distance to the nearest integer still shows σ


def _released(state: Path, counts: np.ndarray, recorded: float = SIGMA) -> PrivacyLedger:
    ledger = PrivacyLedger.open(state, "p0", 1e-5, 50.0, dataset_size=1000)
    ledger.charge(0, prior_mechanism(recorded))
    document = {
        "format": FORMAT,
        "noise_multiplier": recorded,
        "counts": {f"i{k}": float(v) for k, v in enumerate(counts)},
    }
    (state / PRIOR_FILE).write_text(json.dumps(document))
    return ledger


@pytest.fixture
def exact() -> np.ndarray:
    return np.random.default_rng(1).poisson(3.0, 1500).astype(float)


def test_a_noised_release_is_clean(tmp_path: Path, exact: np.ndarray) -> None:
    for seed in range(5):
        noisy = exact + np.random.default_rng(seed).normal(0, SIGMA, exact.size)
        state = tmp_path / str(seed)
        assert prior_flags(state, _released(state, noisy)) == []


@pytest.mark.parametrize(
    ("noise", "code"),
    [
        (0.0, "prior-without-noise"),  # the counts as they are: every value an integer
        (0.1, "prior-noise-inconsistent"),  # a fifth of the recorded σ
    ],
)
def test_a_release_without_its_recorded_noise_is_flagged(
    tmp_path: Path, exact: np.ndarray, noise: float, code: str
) -> None:
    released = exact + np.random.default_rng(0).normal(0, noise, exact.size)
    flags = prior_flags(tmp_path, _released(tmp_path, released))
    assert [(f["code"], f["platform"]) for f in flags] == [(code, "p0")]


def test_a_release_of_another_sigma_than_charged_is_flagged(
    tmp_path: Path, exact: np.ndarray
) -> None:
    ledger = _released(tmp_path, exact + 0.3)
    document = json.loads((tmp_path / PRIOR_FILE).read_text())
    document["noise_multiplier"] = 2.0
    (tmp_path / PRIOR_FILE).write_text(json.dumps(document))
    assert [f["code"] for f in prior_flags(tmp_path, ledger)] == ["prior-inconsistent"]
