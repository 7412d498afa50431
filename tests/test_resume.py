"""Resuming: a run that crashed, was moved, or failed a round finishes where it stopped,
without training or charging a round twice; one process per run folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest
from safetensors.torch import load_file

from client.ledger import LEDGER_FILE, PrivacyLedger
from common.config import load_config
from server.cli import main
from server.federation.run_record import RunRecord
from server.federation.server_optimizer import MOMENTS_FILE
from server.simulation.simulation import prepare_run, simulate
from tests.crash import crash_before_checkpoint


@pytest.fixture
def config_file(tmp_path: Path, write_run_config) -> Path:
    return write_run_config(
        tmp_path / "run.toml", train={"eval_max_cases": 5}, dp={"epsilon_budget": 8.0}
    )


@pytest.mark.ray
def test_an_interrupted_run_resumes_from_its_last_checkpoint_wherever_it_was_moved(
    interrupted_run: Path, tmp_path: Path
) -> None:
    """Resumed in another folder, the run finishes from its round-1 checkpoint on the ledgers
    it carries (relative to its folder), and never lowers what they spent."""
    moved = Path(shutil.copytree(interrupted_run, tmp_path / "elsewhere" / "cut.incomplete"))
    assert RunRecord(moved).last_round() == 1
    before = {p: _ledger(moved, p).spent() for p in ("p0", "p1")}
    run = simulate(RunRecord(moved))
    assert run == tmp_path / "elsewhere" / "cut" and RunRecord(run).last_round() == 2
    trains = [e for e in RunRecord(run).events() if e["event"] == "train"]
    assert sorted({e["round"] for e in trains}) == [1, 2]
    # the platforms had trained round 2 before the server crashed: on resume they answer it
    # with the same stored update, neither retrained nor charged twice (issue 11)
    assert sorted(e.get("replayed", 0) for e in trains if e["round"] == 2) == [0, 0, 1, 1]
    for platform, spent in before.items():
        ledger = _ledger(run, platform)
        # (the prior, released once, is not released again on resume)
        assert [e["server_round"] for e in ledger.entries] == [0, 1, 2]
        assert np.isfinite(ledger.entries[-1]["epsilon_prv"])
        assert ledger.spent() >= spent > 0


def _ledger(run: Path, platform: str) -> PrivacyLedger:
    return PrivacyLedger.load(run / "platform_state" / platform / LEDGER_FILE)


@pytest.mark.ray
def test_a_round_no_platform_trained_fails_the_run_and_stays_resumable(
    tmp_path: Path, write_run_config, capsys: pytest.CaptureFixture[str]
) -> None:
    """All replies errors (budgets below one round at a fixed σ) used to finish the run, exit 0."""

    config = write_run_config(
        tmp_path / "run.toml",
        dp={"noise_multiplier": 0.5, "epsilon_budget": 0.05},
        prior={"enabled": False},
    )
    runs = tmp_path / "runs"
    code = main(["simulate", "--config", str(config), "--runs", str(runs), "--name", "starved"])
    assert code == 2
    error = [line for line in capsys.readouterr().err.splitlines() if "fedfuse: error" in line]
    assert len(error) == 1
    assert "round 1: no platform trained" in error[0] and "budget exhausted" in error[0]
    assert "--resume" in error[0]
    assert not (runs / "starved").exists()  # never marked finished
    record = RunRecord(runs / "starved.incomplete")
    assert record.last_round() == 0  # the old adapters were not checkpointed as round 1
    assert [e["event"] for e in record.events()][-1] == "round-failed"


def test_a_run_folder_is_owned_by_one_process(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Two `--resume` of one run started at once both trained round 2 (issue 11)."""

    record = prepare_run(load_config(config_file), tmp_path / "runs", "busy")
    with record.owned():  # another fedfuse process holds the run
        code = main(["simulate", "--resume", str(record.root)])
    assert code == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert error == [
        f"fedfuse: error: {record.root}: the run is in use by another fedfuse "
        "process; wait for it to end (one process per run folder)"
    ]
    assert record.last_round() == 0 and not record.events()


@pytest.mark.ray
def test_an_interrupted_lockstep_run_resumes_exactly(
    tmp_path: Path, write_run_config, monkeypatch
) -> None:
    """Without DP, on full batches (deterministic): a run that crashed before its round-3
    checkpoint and was resumed ends exactly where the uninterrupted run does — the server's
    optimiser state comes back from round 2's checkpoint, each platform's from its state
    folder, and round 3's gradients are replayed, not recomputed."""
    config = load_config(
        write_run_config(
            tmp_path / "run.toml",
            train={"local_steps": 4, "eval_max_cases": 5, "optimizer": "sgd", "momentum": 0.9},
            dp={"enabled": False, "expected_batch_size": 10_000},
            federation={"rounds": 4, "min_nodes": 2, "schedule": "lockstep"},
        )
    )
    straight = simulate(prepare_run(config, tmp_path / "runs", "straight"))
    record = prepare_run(config, tmp_path / "runs", "resumed")
    crash_before_checkpoint(record, 3, monkeypatch)
    resumed = simulate(RunRecord(record.root))
    replayed = [e for e in RunRecord(resumed).events() if e.get("replayed")]
    assert sorted(e["round"] for e in replayed) == [3, 3]
    for file in ("adapter_model.safetensors", MOMENTS_FILE):
        expected = load_file(straight / "adapters" / "round_004" / file)
        got = load_file(resumed / "adapters" / "round_004" / file)
        assert set(got) == set(expected) and expected
        for name, value in expected.items():
            np.testing.assert_allclose(got[name], value, rtol=1e-5, atol=1e-7, err_msg=name)
