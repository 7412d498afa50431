"""White-box audit of the DP step: the bound's pieces, the canaries' exact contribution, the
correct step not flagged, the four injected bugs flagged, and ``fedfuse audit`` (on by default)."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import opacus.optimizers.optimizer as opacus_optimizer
import pytest
import torch
from dp_accounting.pld import privacy_loss_distribution
from opacus.optimizers import DPOptimizer

from client.step_bound import (
    clopper_pearson_upper,
    gdp_epsilon,
    mu_lower_bound,
    theoretical_epsilon,
)
from client.step_check import run_canaries
from common.config import RunConfig
from server.audit.audit import AUDIT_HTML, AUDIT_JSON
from server.audit.gradient_audit import audit_dp_step
from server.cli import main

SIGMA, CLIP, DELTA = 1.0, 1.0, 1e-5  # the step's theoretical ε: 4.387
TRIALS = 4_000  # 8 steps of 500 canaries: a fraction of a second


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    """As in a Ray actor: two threads thrash on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# --- the bound -----------------------------------------------------------------------------


def test_clopper_pearson_upper_bounds() -> None:
    """No failure in n trials: the bound solves (1 − p)^n = level; all failures: 1."""
    assert clopper_pearson_upper(0, 100, 0.025) == pytest.approx(1 - 0.025 ** (1 / 100))
    assert clopper_pearson_upper(7, 7, 0.025) == clopper_pearson_upper(0, 0, 0.025) == 1.0
    assert clopper_pearson_upper(300, 1000, 0.025) == pytest.approx(0.3294, abs=1e-4)


def test_gdp_epsilon_is_the_gaussian_mechanisms_by_two_accountants() -> None:
    """μ-GDP with μ = 1/σ is the Gaussian mechanism: its exact ε matches FedFuse's accountant
    (PRV, an upper bound within 0.5 %) and dp_accounting's PLD."""
    for sigma in (0.35, 0.6, 1.0, 2.0, 3.75):
        exact = gdp_epsilon(1 / sigma, DELTA)
        assert exact <= theoretical_epsilon(sigma, CLIP, DELTA) <= exact * 1.01
        pld = privacy_loss_distribution.from_gaussian_mechanism(sigma)
        assert exact == pytest.approx(pld.get_epsilon_for_delta(DELTA), rel=0.01)
    assert gdp_epsilon(0.0, DELTA) == 0.0 and gdp_epsilon(1e-6, DELTA) == 0.0
    assert theoretical_epsilon(0.0, CLIP, DELTA) == math.inf


def test_mu_lower_bound() -> None:
    assert mu_lower_bound(500, 1000, 500, 1000, 0.95) == 0.0  # chance level
    assert mu_lower_bound(600, 1000, 600, 1000, 0.95) == 0.0  # worse than chance
    perfect = 2 * 2.7  # Φ⁻¹(1 − 3.7/1000) ≈ 2.68 on each side
    assert mu_lower_bound(0, 1000, 0, 1000, 0.95) == pytest.approx(perfect, abs=0.05)
    # more trials at the same error rates certify more
    assert mu_lower_bound(300, 1000, 300, 1000, 0.95) < mu_lower_bound(
        3000, 10_000, 3000, 10_000, 0.95
    )


# --- the canaries in the real DP step ------------------------------------------------------


# the default run's kind of scales, and the user map's thousands of coordinates
SCALES = {"head.mix.": 0.1, "head.private_items.": 3.0, "head.user_": 3.0}


def _config(unit: str, scales: bool = False) -> RunConfig:
    if not scales:
        return RunConfig.model_validate({"dp": {"unit": unit, "gradient_scales": {}}})
    return RunConfig.model_validate(
        {"model": {"private_factors": 4}, "dp": {"unit": unit, "gradient_scales": SCALES}}
    )


@pytest.mark.parametrize(
    ("unit", "scales"), [("example", False), ("user", False), ("example", True)]
)
def test_without_noise_each_canary_coordinate_is_its_clipped_contribution(
    unit: str, scales: bool
) -> None:
    """σ = 0: a canary of norm 1000 C adds exactly C to its coordinate (clipping binds), an
    absent one nothing, and the real rows (examples, or users of two units) add nothing
    there. With ``dp.gradient_scales`` the canaries go in after the scaling and are read
    before it is undone: the audit sees the Gaussian mechanism itself."""
    probe = run_canaries(0.0, 0.5, _config(unit, scales=scales), trials=1_000)
    assert probe.observed.shape == (2, 500) and 400 < probe.included.sum() < 600
    np.testing.assert_allclose(probe.observed, 0.5 * probe.included, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("unit", ["example", "user"])
def test_the_correct_step_is_not_flagged(unit: str) -> None:
    result = audit_dp_step(SIGMA, CLIP, DELTA, config=_config(unit), trials=TRIALS)
    assert not result.flagged and result.trials == TRIALS
    assert result.epsilon_theoretical == pytest.approx(4.387, abs=1e-3)
    # measured: μ ≥ 0.89–0.92 against 1/σ = 1 (ε ≥ 3.84–3.98 of 4.39)
    assert 0.8 < result.mu_lower_bound < 1 / SIGMA


# --- four bugs in the DP step that leave the ledger self-consistent ------------------------


def _noise_times(factor: float) -> Callable[..., Any]:
    """Opacus' noise drawn at ``factor`` × σC while its accountant still records σ."""
    generate = opacus_optimizer._generate_noise
    return lambda std, reference, **rest: generate(std * factor, reference, **rest)


def _clipping_at(norm: float) -> Callable[[DPOptimizer], None]:
    """Clipping reads ``norm`` while the noise stays σ × the recorded C."""
    clip = DPOptimizer.clip_and_accumulate

    def clip_and_accumulate(self: DPOptimizer) -> None:
        recorded, self.max_grad_norm = self.max_grad_norm, norm
        try:
            clip(self)
        finally:
            self.max_grad_norm = recorded

    return clip_and_accumulate


def _clip_norm_set_to(norm: float) -> Callable[[DPOptimizer], None]:
    """The optimiser runs at C = ``norm`` (clipping and noise σ·norm) while the ledger
    records the configured C."""
    clip = DPOptimizer.clip_and_accumulate

    def clip_and_accumulate(self: DPOptimizer) -> None:
        self.max_grad_norm = norm
        clip(self)

    return clip_and_accumulate


BUGS: dict[str, tuple[object, str, Callable[..., Any]]] = {
    "noise-multiplier-0": (opacus_optimizer, "_generate_noise", _noise_times(0.0)),
    "clipping-off": (DPOptimizer, "clip_and_accumulate", _clipping_at(math.inf)),
    "clip-norm-1e6": (DPOptimizer, "clip_and_accumulate", _clipping_at(1e6)),
    "noise-halved": (opacus_optimizer, "_generate_noise", _noise_times(0.5)),
}


# μ ≥ measured with TRIALS at σ = 1 (1/σ = 1; no error at all certifies 2 Φ⁻¹(1 − 3.7/2000)):
# noise 0: 5.81; clipping off and clip norm 10⁶: 3.38 (no canary missed); noise halved: 1.81.
@pytest.mark.parametrize("unit", ["example", "user"])
@pytest.mark.parametrize("bug", list(BUGS))
def test_each_injected_bug_is_flagged(bug: str, unit: str, monkeypatch: pytest.MonkeyPatch) -> None:
    owner, name, replacement = BUGS[bug]
    monkeypatch.setattr(owner, name, replacement)
    result = audit_dp_step(SIGMA, CLIP, DELTA, config=_config(unit), trials=TRIALS)
    assert result.flagged and result.epsilon_lower_bound > result.epsilon_theoretical
    assert result.mu_lower_bound > 1.5 / SIGMA


# a step that leaks no more than recorded, yet is not the recorded mechanism: noisier, clipped
# harder, or run at C = 10⁶ with noise σ·10⁶ (the ledger records C = 1). The ε bound alone
# cannot see these; the measured noise spread and clipped canary mean do.
OTHER_THAN_RECORDED: dict[str, tuple[object, str, Callable[..., Any]]] = {
    "noise-doubled": (opacus_optimizer, "_generate_noise", _noise_times(2.0)),
    "clipped-at-half": (DPOptimizer, "clip_and_accumulate", _clipping_at(0.5 * CLIP)),
    "optimizer-at-c-1e6": (DPOptimizer, "clip_and_accumulate", _clip_norm_set_to(1e6)),
}


@pytest.mark.parametrize("bug", list(OTHER_THAN_RECORDED))
def test_a_step_noisier_or_clipped_harder_than_recorded_is_flagged(
    bug: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    owner, name, replacement = OTHER_THAN_RECORDED[bug]
    monkeypatch.setattr(owner, name, replacement)
    result = audit_dp_step(SIGMA, CLIP, DELTA, config=_config("example"), trials=4_000)
    assert result.flagged and result.epsilon_lower_bound <= result.epsilon_theoretical
    expected = "noise" if bug != "clipped-at-half" else "clipped contribution"
    assert any(problem.startswith(expected) or expected in problem for problem in result.problems)


# --- fedfuse audit: the white-box part ------------------------------------------------


def test_fedfuse_audit_white_box(
    finished_run: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    assert main(["audit", str(run), "--no-white-box"]) == 0
    assert json.loads((run / AUDIT_JSON).read_text())["white_box"] is None
    assert "White-box" not in capsys.readouterr().out

    assert main(["audit", str(run)]) == 0  # on by default
    printed = capsys.readouterr().out
    report = json.loads((run / AUDIT_JSON).read_text())
    rows = report["white_box"]["rows"]
    assert [row["platform"] for row in rows] == ["p0", "p1"] and report["flags"] == []
    for row, platform in zip(rows, report["platforms"], strict=True):
        assert row["epsilon_ledger"] == platform["epsilon_spent_prv"]
        assert row["noise_multiplier"] == platform["rounds"][-1]["noise_multiplier"]
        assert row["trials"] == report["white_box"]["trials"] == 20_000
        assert 0 < row["epsilon_lower_bound"] <= row["epsilon_theoretical"]
    assert "White-box audit of the DP step" in printed and "| p1 |" in printed
    assert "White-box audit of the DP step" in (run / AUDIT_HTML).read_text()

    # the same run audited where the DP step draws half the noise it records
    monkeypatch.setattr(opacus_optimizer, "_generate_noise", _noise_times(0.5))
    with pytest.raises(SystemExit) as stopped:
        main(["audit", str(run)])
    assert stopped.value.code == 1
    report = json.loads((run / AUDIT_JSON).read_text())
    assert [(f["code"], f["platform"]) for f in report["flags"]] == [
        ("white-box-exceeds-theory", "p0"),
        ("white-box-exceeds-theory", "p1"),
    ]
    assert '<li class="flag">[white-box-exceeds-theory]' in (run / AUDIT_HTML).read_text()

    config = json.loads((run / "config.json").read_text())
    config["model"]["scorer"] = "no-such-scorer"
    (run / "config.json").write_text(json.dumps(config))
    capsys.readouterr()
    assert main(["audit", str(run)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("fedfuse: error: ") and "config.json" in error
    assert error.count("\n") == 1
