"""Budgets follow the data, not the folder: copied and moved run folders, runs in turn."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from client.ledger import LEDGER_FILE, BudgetExhausted, Mechanism, PrivacyLedger
from client.platform_client import PlatformClient, identify
from common.adapters import trainable_arrays
from common.config import load_config
from server.cli import main
from server.federation.run_record import RunRecord


def _ledger(state: Path) -> PrivacyLedger:
    return PrivacyLedger.load(state / LEDGER_FILE)


def _resume_refused(run: Path, capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main(["simulate", "--resume", str(run)]) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1
    return lines[0]


def test_a_copy_without_a_platforms_ledger_is_refused_not_given_a_fresh_one(
    interrupted_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The copy's config named the original's state folder by absolute path: once that was
    gone, the resumed copy created fresh ledgers and trained every platform again."""
    copy = Path(shutil.copytree(interrupted_run, tmp_path / "copy.incomplete"))
    state = copy / "platform_state" / "p0"
    (state / LEDGER_FILE).unlink()
    line = _resume_refused(copy, capsys)
    assert "'p0' has no privacy ledger" in line and "round(s) 1, 2" in line
    assert not (state / LEDGER_FILE).exists()  # nothing trained, no fresh ledger
    # another platform's ledger in its place is no better
    shutil.copy(copy / "platform_state" / "p1" / LEDGER_FILE, state / LEDGER_FILE)
    assert "is not the ledger this run charged" in _resume_refused(copy, capsys)


def test_a_copy_never_uses_its_originals_state_and_a_fork_is_refused(
    interrupted_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Resumed, a copy reads the ledgers it carries (relative to its folder); a ledger holding
    rounds of this run past the copy's last checkpoint means another copy went on."""
    copy = Path(shutil.copytree(interrupted_run, tmp_path / "copy.incomplete"))
    assert json.loads((copy / "run.json").read_text())["platform_state"] == "platform_state"
    ledger = _ledger(copy / "platform_state" / "p0")
    run = RunRecord(copy).run_id()
    ledger.charge(3, Mechanism(50.0, 0.01, 1, 1.0), run)  # as if the run went on elsewhere
    line = _resume_refused(copy, capsys)
    assert "holds round(s) 3 of this run" in line and "another copy" in line
    assert load_config(copy / "config.json").dp.state_dir == str(
        (copy / "platform_state").resolve()
    )


def _client(config_file: Path) -> PlatformClient:
    config = load_config(config_file)
    return PlatformClient(identify({"partition-id": 0}, config), config)


def test_runs_in_turn_on_one_state_folder_spend_one_budget_then_the_next_is_refused(
    tmp_path: Path, write_run_config
) -> None:
    """Run B was refused in round 1 ('already spent round 1') with budget left, and would
    have been answered with run A's stored reply."""
    state = tmp_path / "shared"
    config_file = write_run_config(
        tmp_path / "run.toml",
        dp={"state_dir": str(state), "epsilon_budget": 7.0, "target_epsilon": 4.0},
        prior={"enabled": False},
    )
    spent = []
    for run in ("a", "b", "c"):
        client = _client(config_file)
        start = trainable_arrays(client.scorer, client.shared)
        try:
            for server_round in (1, 2):
                shared, metrics = client.train_round(server_round, start, 0.01, run)
                assert shared and "replayed" not in metrics  # never another run's reply
        except BudgetExhausted as refused:
            assert run == "c" and "budget exhausted" in str(refused)
            break
        spent.append(client.ledger.spent())
    assert len(spent) == 2 and spent[0] < spent[1] <= 7.0
    ledger = _ledger(state / "p0")
    assert [(e["run"], e["server_round"]) for e in ledger.entries] == [
        ("a", 1),
        ("a", 2),
        ("b", 1),
        ("b", 2),
    ]


def test_the_summary_shows_the_ledgers_epsilon_with_a_round_charged_but_never_answered(
    tmp_path: Path,
) -> None:
    """summary.md showed ε 1.814 from the last reply while the ledger held 1.998."""
    from server.federation.report import SUMMARY_FILE, write_report

    state = tmp_path / "state"
    ledger = PrivacyLedger.open(state / "p0", "p0", 1e-5, 10.0, dataset_size=1000)
    answered = ledger.charge(1, Mechanism(1.0, 0.1, 10, 1.0), "r")
    ledger.charge(2, Mechanism(1.0, 0.1, 10, 1.0), "r")  # killed before it answered
    record = RunRecord(tmp_path / "run")
    record.root.mkdir()
    record.write_config({"dp": {"state_dir": str(state)}})
    reply = {"event": "train", "status": "ok", "platform": "p0", "round": 1}
    record.append([reply | {"epsilon": answered["epsilon_prv"], "noise-multiplier": 1.0}])
    table = write_report(record)
    assert f"{ledger.spent():.3f} |" in table and f"{answered['epsilon_prv']:.3f}" not in table
    assert f"{ledger.spent():.3f}" in (record.root / SUMMARY_FILE).read_text()
