"""End to end: ``scripts/flwr_run.py`` runs FedFuse through ``flwr run`` on its own SuperLink
and leaves no process behind, whether the run finishes or is cut off."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import psutil
import pytest

from server.federation.run_record import RunRecord

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "flwr_run.py"
pytestmark = pytest.mark.ray  # flwr run starts a SuperLink and its Ray simulation runtime


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _processes_of(flwr_home: Path) -> list[str]:
    """Processes (SuperLink, SuperExec, flwr-simulation, Ray) started with this FLWR_HOME."""
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        try:
            if proc.environ().get("FLWR_HOME") == str(flwr_home):
                found.append(f"{proc.pid} {' '.join(proc.info['cmdline'] or [])}")
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
    return found


@pytest.fixture
def tiny_overrides(tiny_bert_dir: Path, synthetic_dir: Path) -> list[str]:
    """The repo's tiny synthetic configuration, pointed at the test's data and model."""
    return [
        'config-file="simulations/synthetic_tiny.toml"',
        f'data.path="{synthetic_dir}"',
        f'model.backbone="{tiny_bert_dir}"',
        "federation.min_nodes=2",
        "train.eval_max_cases=5",
    ]


def _flwr_run(tmp_path: Path, *args: str) -> subprocess.CompletedProcess:
    flwr_home = tmp_path / "flwr-home"
    command = [sys.executable, str(SCRIPT), "--runs", str(tmp_path / "runs")]
    command += ["--flwr-home", str(flwr_home), "--port", str(_free_port()), *args]
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, check=False)
    assert _processes_of(flwr_home) == []
    return result


def test_flwr_run_trains_checkpoints_and_stops_the_superlink(
    tmp_path: Path, tiny_overrides: list[str]
) -> None:
    result = _flwr_run(tmp_path, "--name", "demo", *tiny_overrides, "federation.rounds=1")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    run = tmp_path / "runs" / "demo"
    assert f"finished: {run}" in result.stdout
    assert not (tmp_path / "runs" / "demo.incomplete").exists()
    record = RunRecord(run)
    assert record.last_round() == 1 and (record.adapter_dir(1) / "adapter_config.json").is_file()
    ok = {(e["event"], e["platform"]) for e in record.events() if e["status"] == "ok"}
    assert ok == {(kind, p) for kind in ("train", "evaluate") for p in ("p0", "p1")}
    config = record.read_config()
    assert config["federation"]["rounds"] == 1  # the section.key override reached the apps
    assert config["dp"]["state_dir"] == str(run / "platform_state")
    ledger = json.loads((run / "platform_state" / "p0" / "privacy_ledger.json").read_text())
    # the DP popularity prior's release (before round 1, recorded as round 0), then round 1
    assert [e["server_round"] for e in ledger["entries"]] == [0, 1]
    assert (run / "summary.md").is_file()


def test_a_run_cut_off_by_its_timeout_fails_and_stops_everything(
    tmp_path: Path, tiny_overrides: list[str]
) -> None:
    # Ray start-up alone takes longer than 3 s, so the run is always cut off mid-way.
    result = _flwr_run(tmp_path, "--timeout", "3", *tiny_overrides)
    assert result.returncode == 1
    assert "flwr_run: error:" in result.stderr and "timed out" in result.stderr


def test_run_dir_and_unknown_flower_keys_are_refused(
    tmp_path: Path, tiny_overrides: list[str]
) -> None:
    result = _flwr_run(tmp_path, 'run-dir="/elsewhere"')
    assert result.returncode == 1 and "run-dir is set by this script" in result.stderr
    result = _flwr_run(tmp_path, *tiny_overrides, "no-such-key=1")
    assert result.returncode == 1
    assert "Invalid run configuration" in result.stdout + result.stderr


def test_the_app_bundle_ships_only_the_apps_code_and_configuration(tmp_path: Path) -> None:
    """The FAB used to carry every file git does not ignore, scratch folders included."""
    import io
    import shutil
    import zipfile

    from flwr.cli.build import build_fab_from_disk

    app = tmp_path / "app"
    for name in ("common", "client", "server", "simulations", "tests", "scripts", "docs"):
        shutil.copytree(REPO / name, app / name, ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", ".gitignore", "README.md"):
        shutil.copy(REPO / name, app / name)
    (app / "scratch").mkdir()
    (app / "scratch" / "notes.py").write_text("secret = 'an untracked experiment'\n")
    (app / "export.jsonl").write_text('{"user_id": "u1"}\n')  # a stray data export
    names = zipfile.ZipFile(io.BytesIO(build_fab_from_disk(app))).namelist()
    assert {name.split("/")[0] for name in names} == {
        "common",
        "client",
        "server",
        "simulations",
        "pyproject.toml",
        ".info",
    }
    assert "client/client_app.py" in names and "simulations/ml100k_default.toml" in names


def test_a_resume_without_a_charged_platforms_ledger_is_refused_before_flower_starts(
    tmp_path: Path, finished_run: Path
) -> None:
    """The deployment path checks the ledgers as ``fedfuse simulate --resume`` does: a copy of
    a run whose platform lost its ledger is refused, never trained on a fresh one."""
    import shutil

    copy = tmp_path / "copy.incomplete"
    shutil.copytree(finished_run, copy)
    ledgers = sorted(copy.glob("platform_state/*/privacy_ledger.json"))
    assert ledgers, "the tiny run keeps its platform state inside the run folder"
    ledgers[0].unlink()
    result = _flwr_run(tmp_path, "--resume", str(copy))
    assert result.returncode == 1
    assert f"platform {ledgers[0].parent.name!r} has no privacy ledger" in result.stderr
    assert "Starting SuperLink" not in result.stdout + result.stderr
