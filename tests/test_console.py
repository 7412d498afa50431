"""The console of the commands shows FedFuse's own lines only: no library warning on stderr."""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from server.cli import main


@contextmanager
def console_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """The warnings a console would print, recorded: Python's own default filters in place of
    pytest's, and the registries of warnings already shown cleared (by changing the filters)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        for category in (PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", category)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
        yield caught


def shown(caught: list[warnings.WarningMessage]) -> list[str]:
    return [f"{w.category.__name__}: {w.message} ({w.filename})" for w in caught]


def test_recommend_and_audit_show_no_library_warning(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    user = _first_user(run)
    with console_warnings() as caught:
        assert main(["recommend", str(run), "--platform", "p0", "--user", user]) == 0
        assert main(["audit", str(run)]) == 0
    assert shown(caught) == []
    assert capsys.readouterr().err == ""


def _first_user(run: Path) -> str:
    from common.config import load_config
    from common.platform_data import federation_platforms, read_platform
    from server.federation.run_record import CONFIG_FILE

    config = load_config(run / CONFIG_FILE)
    (name, folder), *_ = federation_platforms(config.data)
    assert name == "p0"
    return str(read_platform(folder, name).users[0])


# README's first command at test scale: the recipe's file, with the backbone, data, time cuts
# and length of a tiny run laid over it (everything else, the global time split, the lockstep
# schedule and the closing in-house / federated / blend table included, is the recipe's).
REPORTS = ("summary.md", "joining.md")
TINY_SCALE = [
    "model.max_length=32",
    "task.history_len=5",
    "dp.expected_batch_size=32",
    "train.eval_max_cases=5",
    "federation.rounds=2",
    "federation.min_nodes=2",
    "baselines.sasrec_max_epochs=4",
    "baselines.sasrec_eval_every=2",
]


@pytest.mark.ray
def test_readmes_first_command_shows_only_fedfuse_lines(
    tmp_path: Path, tiny_bert_dir: Path, synthetic_dir: Path
) -> None:
    """`fedfuse simulate --config simulations/ml100k_default.toml` as a user starts it (a child
    process): nothing on stderr, every stdout line FedFuse's own and printed once; Flower's
    log is in the run folder, each line once."""
    from common.platform_data import read_dataset
    from common.task import time_cuts
    from tests.cli_process import ROOT, run_cli

    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    command = ".venv/bin/fedfuse simulate --config simulations/ml100k_default.toml"
    assert command in readme
    valid_from, test_from = time_cuts(read_dataset(synthetic_dir))
    overrides = [
        f"data.path='{synthetic_dir}'",
        f"model.backbone='{tiny_bert_dir}'",
        f"task.valid_from={valid_from}",
        f"task.test_from={test_from}",
        *TINY_SCALE,
    ]
    done = run_cli(
        *command.split()[1:],
        *[arg for setting in overrides for arg in ("--set", setting)],
        *["--runs", str(tmp_path / "runs"), "--name", "readme"],
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stderr == ""  # Flower, Ray and library warnings went to the run's log file
    run = tmp_path / "runs" / "readme"
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert lines[-1] == f"finished: {run}"
    # the rest is event lines and the run's own reports (its summary table, joining.md)
    reports = {x for name in REPORTS for x in (run / name).read_text(encoding="utf-8").splitlines()}
    foreign = [x for x in lines[:-1] if not x.startswith("[fedfuse] ") and x not in reports]
    assert foreign == []
    events = [x for x in lines if x.startswith("[fedfuse] ")]
    assert [x for x in set(events) if events.count(x) > 1] == []  # each event printed once
    for server_round in (1, 2):
        assert any(f"round {server_round}/2 train: 2/2 platforms, ε ≤ " in x for x in events)
        assert any(f"round {server_round}/2 evaluate: 2/2 platforms, mean " in x for x in events)
    assert any(x.startswith("## Does joining pay?") for x in lines)
    log = (run / "simulation.log").read_text(encoding="utf-8")
    assert log.count("[ROUND 2/2]") == 1  # once, not twice
