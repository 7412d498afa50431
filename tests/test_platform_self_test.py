"""The platform's self-test runs through the platform's own trainer (issue 33's acceptance
experiment): a fault in how one platform's trainer was made is in that platform's ledger
evidence and flagged by an unpatched audit, while the other platforms stay clean."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
from opacus.optimizers import DPOptimizer

from client import step_check
from client.dp_training import LocalTrainer
from client.ledger import Mechanism, PrivacyLedger
from client.step_check import step_evidence
from common.config import RunConfig
from server.audit.audit import evidence_flags

SIGMA, CLIP = 1.0, 1.0
CONFIG = RunConfig.model_validate({"dp": {"max_grad_norm": CLIP, "delta": 1e-5}})


class UnclippedTrainer(LocalTrainer):
    """One platform's trainer that adds the recorded noise σC but never clips."""

    def _run_private(self, *args, **kwargs):  # type: ignore[no-untyped-def]
        clip = DPOptimizer.clip_and_accumulate

        def unclipped(optimizer: DPOptimizer) -> None:
            kept, optimizer.max_grad_norm = optimizer.max_grad_norm, math.inf
            try:
                clip(optimizer)
            finally:
                optimizer.max_grad_norm = kept

        DPOptimizer.clip_and_accumulate = unclipped  # type: ignore[method-assign]
        try:
            return super()._run_private(*args, **kwargs)
        finally:
            DPOptimizer.clip_and_accumulate = clip  # type: ignore[method-assign]


def _platform(kind: type[LocalTrainer]) -> LocalTrainer:
    """A platform's trainer as far as the self-test reads it: its class and its own state (the
    test puts its own model, examples and settings in place of the rest)."""
    return kind.__new__(kind)


def test_only_the_platform_whose_own_trainer_does_not_clip_is_flagged(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Injected in a patched copy and run on synthetic_tiny, one unclipped platform passed the
    self-test, which ran through a trainer of its own making: every platform's record was the
    same (also shared between platforms of one σ), and nothing was flagged."""
    monkeypatch.setattr(step_check, "_SELF_TESTS", {})
    flags = []
    for name, kind in (("p0", LocalTrainer), ("p1", UnclippedTrainer), ("p2", LocalTrainer)):
        evidence = step_evidence(SIGMA, CONFIG, _platform(kind))
        assert evidence["self_test"]["passed"] == (kind is LocalTrainer)
        ledger = PrivacyLedger.open(tmp_path / name, name, 1e-5, 50.0, dataset_size=1000)
        ledger.charge(1, Mechanism(SIGMA, 0.1, 5, CLIP), "run", evidence)
        flags += evidence_flags(PrivacyLedger.load(ledger.path))[0]
    assert [(f["code"], f["platform"]) for f in flags] == [("self-test-failed", "p1")]
    assert "clipped contribution" in flags[0]["message"]
    assert step_check._SELF_TESTS == {}  # a platform's own record is never another's
