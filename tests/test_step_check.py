"""The platform's own check of its DP step, recorded in its ledger, and what the audit makes of it.

A patched DP step is run the way a platform runs it (``step_evidence`` in the training process);
the ledger it charges is then audited with the unpatched code, as a deployment's auditor would.
"""

from __future__ import annotations

import copy
from pathlib import Path
from typing import Any

import opacus.optimizers.optimizer as opacus_optimizer
import pytest

from client import step_check
from client.ledger import Mechanism, PrivacyLedger
from client.step_check import code_identity, step_evidence
from common.config import RunConfig
from server.audit.evidence_checks import code_flags, evidence_flags

SIGMA, CLIP = 1.0, 1.0
CONFIG = RunConfig.model_validate({"dp": {"max_grad_norm": CLIP, "delta": 1e-5}})


def _ledger(state: Path, evidence: dict[str, Any] | None, platform: str = "p0") -> PrivacyLedger:
    ledger = PrivacyLedger.open(state / platform, platform, 1e-5, 50.0, dataset_size=1000)
    ledger.charge(1, Mechanism(SIGMA, 0.1, 5, CLIP), "run", evidence)
    return ledger


@pytest.fixture
def fresh(monkeypatch: pytest.MonkeyPatch) -> None:
    """No self-test remembered from an earlier test in this process."""
    monkeypatch.setattr(step_check, "_SELF_TESTS", {})


def test_a_correct_step_records_a_passed_test_and_the_code_that_ran(fresh, tmp_path: Path) -> None:
    evidence = step_evidence(SIGMA, CONFIG)
    test = evidence["self_test"]
    assert test["passed"] and test["problems"] == []
    assert (test["noise_multiplier"], test["max_grad_norm"], test["unit"]) == (1.0, 1.0, "example")
    assert abs(test["noise_ratio"] - 1) < 0.05 and abs(test["clip_ratio"] - 1) < 0.1
    assert set(evidence["code"]) == {"source_sha256", "torch", "opacus", "flwr"}
    ledger = _ledger(tmp_path, evidence)
    assert ledger.entries[-1]["evidence"] == evidence  # in the hash chain
    PrivacyLedger.load(ledger.path)
    assert evidence_flags(ledger) == ([], [code_identity_json()])


def code_identity_json() -> str:
    import json

    return json.dumps(code_identity(), sort_keys=True)


def _noise_times(factor: float):
    generate = opacus_optimizer._generate_noise
    return lambda std, reference, **rest: generate(std * factor, reference, **rest)


@pytest.mark.parametrize("factor", [0.0, 0.5, 3.0])
def test_a_platform_whose_step_is_not_as_recorded_is_flagged_by_an_unpatched_audit(
    fresh, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, factor: float
) -> None:
    """No noise, half or three times the recorded noise, in the platform's own process: only
    the platform's own run of its step can show it; an auditor's rerun runs other code."""
    with monkeypatch.context() as patched:
        patched.setattr(opacus_optimizer, "_generate_noise", _noise_times(factor))
        evidence = step_evidence(SIGMA, CONFIG)
    assert not evidence["self_test"]["passed"]
    flags, _ = evidence_flags(_ledger(tmp_path, evidence))
    assert [(f["code"], f["platform"]) for f in flags] == [("self-test-failed", "p0")]
    assert "noise" in flags[0]["message"]


def test_missing_inconsistent_or_forged_evidence_is_flagged(fresh, tmp_path: Path) -> None:
    evidence = step_evidence(SIGMA, CONFIG)
    assert evidence_flags(_ledger(tmp_path / "a", None))[0][0]["code"] == "self-test-missing"
    other = copy.deepcopy(evidence)
    other["self_test"]["noise_multiplier"] = 2.0  # tested another σ than it charges
    assert evidence_flags(_ledger(tmp_path / "b", other))[0][0]["code"] == "self-test-inconsistent"
    forged = copy.deepcopy(evidence)
    forged["self_test"]["noise_ratio"] = 0.5  # the figures say "fails", the verdict "passed"
    flags = evidence_flags(_ledger(tmp_path / "c", forged))[0]
    assert [f["code"] for f in flags] == ["self-test-inconsistent"]


def test_a_platform_running_other_code_is_flagged(fresh, tmp_path: Path) -> None:
    evidence = step_evidence(SIGMA, CONFIG)
    patched = copy.deepcopy(evidence)
    patched["code"]["source_sha256"] = "0" * 64
    identities = {
        name: evidence_flags(_ledger(tmp_path, found, name))[1]
        for name, found in (("p0", evidence), ("p1", evidence), ("p2", patched))
    }
    flags = code_flags(identities, None)
    assert [(f["code"], f["platform"]) for f in flags] == [("code-identity-differs", "p2")]
    release = {"source_sha256": code_identity()["source_sha256"]}
    flags = code_flags(identities, release)
    assert ("code-identity-not-release", "p2") in [(f["code"], f["platform"]) for f in flags]
    assert len(flags) == 2
