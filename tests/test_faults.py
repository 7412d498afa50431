"""Faults that used to crash, hang or write outside their folder (issue 35): each now ends in
one line, a documented exit code and nothing half-written. The hangs are run as subprocesses
under a bounded timeout."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.cli import main
from server.federation.run_record import RunRecord
from tests.cli_process import ROOT, cli_env, start_cli

TINY_TOML = ROOT / "simulations" / "synthetic_tiny.toml"


def _one_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith("fedfuse: error: ")
    return lines[0]


@pytest.fixture
def one_interaction_data(tmp_path: Path) -> Path:
    """Every user has one interaction: no user can be held out for evaluation."""
    from common.platform_writer import write_dataset
    from common.synthetic import SyntheticConfig, generate

    tables = generate(
        SyntheticConfig(platforms=2, users=10, items=20, interactions_per_user=1, overlap=0)
    )
    return write_dataset(tmp_path / "one", tables)


def test_data_without_evaluation_cases_is_refused_by_check_and_simulate_alike(
    tmp_path: Path, write_run_config, one_interaction_data: Path, capsys
) -> None:
    """`data check` accepted such data, and simulate crashed after Ray start-up with a
    ZeroDivisionError in Flower's metric aggregation."""
    config = write_run_config(tmp_path / "run.toml", data={"path": str(one_interaction_data)})
    assert main(["data", "check", str(one_interaction_data), "--config", str(config)]) == 2
    checked = _one_line(capsys)
    assert "no platform has a valid ranking case" in checked
    runs = tmp_path / "runs"
    assert main(["simulate", "--config", str(config), "--runs", str(runs)]) == 2
    assert _one_line(capsys) == checked
    assert not runs.exists()


def test_without_a_configuration_data_check_warns_of_what_its_summary_split_cannot_evaluate(
    tmp_path: Path, capsys
) -> None:
    """Plain `data check DIR` accepted data no run could evaluate without a word. Every
    timestamp tied: no time cut, so the summary's split is leave-last, and one liked item per
    person leaves nobody a validation case. The files are valid (exit 0); the warning says
    what a run would refuse, and with a run configuration it is the refusal."""
    for platform in ("p0", "p1"):
        folder = tmp_path / "data" / platform
        folder.mkdir(parents=True)
        (folder / "items.tsv").write_text("item_id\ttitle\ni1\tA\ni2\tB\ni3\tC\n")
        rows = "".join(f"u{k}\ti{k}\t5\t100\n" for k in (1, 2, 3))
        (folder / "interactions.tsv").write_text(f"user_id\titem_id\trating\ttimestamp\n{rows}")
    assert main(["data", "check", str(tmp_path / "data")]) == 0
    [warning] = capsys.readouterr().err.splitlines()
    assert warning.startswith("warning: ") and "no platform has a valid ranking case" in warning
    assert main(["data", "check", str(tmp_path / "data"), "--set", "task.split='leave_last'"]) == 2
    assert "no platform has a valid ranking case" in _one_line(capsys)


@pytest.mark.parametrize(
    ("option", "message"),
    [
        (["--cpus-per-client", "1000"], "at most this machine's"),
        (["--cpus-per-client", "0"], "above 0"),
        (["--cpus-per-client", "-1"], "above 0"),
        (["--gpus-per-client", "-0.5"], "give 0 (CPU)"),
        (["--gpus-per-client", "1"], "CUDA GPU(s)"),
        (["--set", "train.device='cuda'"], "train.device = cuda"),
        (["--set", "federation.min_nodes=3"], "federation.min_nodes = 3 but"),
        (["--name", "../escape"], "plain folder name"),
        (["--name", "/tmp/absolute-run"], "plain folder name"),
        (["--name", ".."], "plain folder name"),
    ],
)
def test_a_run_ray_could_never_finish_is_refused_before_it_starts(
    tmp_path: Path, write_run_config, capsys, option: list[str], message: str
) -> None:
    """These hung forever (resources, node count), crashed after Ray start-up leaving
    NAME.incomplete/ (cuda), or created the run folder outside --runs (names)."""
    if "CUDA" in message or "cuda" in message:
        import torch

        if torch.cuda.is_available():
            pytest.skip("this machine has a GPU")
    config = write_run_config(tmp_path / "run.toml")
    runs = tmp_path / "sub" / "runs"
    started = time.monotonic()
    code = main(["simulate", "--config", str(config), "--runs", str(runs), *option])
    assert code == 2 and message in _one_line(capsys)
    assert time.monotonic() - started < 30  # no Ray start-up
    assert list(tmp_path.iterdir()) == [config]  # nothing written, inside --runs or out
    assert not Path("/tmp/absolute-run").exists()


@pytest.mark.parametrize("runs", ["{file}", "{file}/runs", "/proc/fedfuse-runs"])
def test_a_runs_folder_that_cannot_be_written_is_one_line(
    tmp_path: Path, write_run_config, capsys, runs: str
) -> None:
    """A file or /proc as --runs gave a traceback, rc 1."""
    config = write_run_config(tmp_path / "run.toml")
    file = tmp_path / "a-file"
    file.write_text("x")
    folder = runs.format(file=file)
    assert main(["simulate", "--config", str(config), "--runs", folder]) == 2
    line = _one_line(capsys)
    assert folder in line and "cannot create the run folder" in line
    assert file.read_text() == "x"


def test_compare_out_that_cannot_be_written_is_one_line(tmp_path: Path, capsys) -> None:
    file = tmp_path / "a-file"
    file.write_text("x")
    code = main(["compare", "--out", str(file / "cmp"), "--epsilon", "8:popularity"])
    assert code == 2 and str(file) in _one_line(capsys)


def test_resume_takes_the_settings_that_may_change_and_refuses_the_others(
    tmp_path: Path, write_run_config, capsys
) -> None:
    """--set and --config were silently ignored on --resume."""
    from common.config import load_config
    from server.simulation.simulation import prepare_run, resume_settings

    config = load_config(write_run_config(tmp_path / "run.toml"))
    record = prepare_run(config, tmp_path / "runs", "r")
    before = (record.root / "config.json").read_text()
    for change in (["--set", "federation.rounds=9"], ["--set", "dp.target_epsilon=1.0"]):
        assert main(["simulate", "--resume", str(record.root), *change]) == 2
        line = _one_line(capsys)
        assert "cannot change on a resume" in line and change[1].split("=")[0] in line
    other = write_run_config(tmp_path / "other.toml", train={"learning_rate": 0.5})
    assert main(["simulate", "--resume", str(record.root), "--config", str(other)]) == 2
    assert "train.learning_rate cannot change" in _one_line(capsys)
    assert (record.root / "config.json").read_text() == before  # refused: nothing changed
    with record.owned():  # a process running the run: its settings are not changed under it
        assert main(["simulate", "--resume", str(record.root), "--set", "train.device='cpu'"]) == 2
    assert "in use by another fedfuse process" in _one_line(capsys)
    assert (record.root / "config.json").read_text() == before

    moved = tmp_path / "moved-data"
    (tmp_path / "moved-data").symlink_to(config.data.path)
    new = load_config(record.root / "config.json", [f"data.path='{moved}'", "train.device='cpu'"])
    resume_settings(record, new)
    resumed = load_config(record.root / "config.json")
    assert resumed.data.path == str(moved) and resumed.train.device == "cpu"
    assert resumed.dp.state_dir == str(record.root.resolve() / "platform_state")


def test_recommend_and_serve_refuse_an_unfinished_run(tmp_path: Path, capsys) -> None:
    """`recommend` served an .incomplete run without a word (README: from a finished run)."""
    run = tmp_path / "r.incomplete"
    run.mkdir()
    for command in (["recommend", str(run), "--platform", "p0", "--user", "u0"],):
        assert main(command) == 2
        assert "the run is not finished" in _one_line(capsys)
    assert main(["serve", str(run), "--platform", "p0", "--port", "0"]) == 2
    assert "--resume" in _one_line(capsys)


def test_the_exit_codes_are_in_help_and_in_the_docs() -> None:
    from server.cli import EXIT_CODES, build_parser

    text = build_parser().format_help()
    assert EXIT_CODES in text
    docs = (ROOT / "docs" / "exit-codes.md").read_text(encoding="utf-8")
    for line in EXIT_CODES.splitlines()[1:]:
        code = line.split()[0]
        if code.isdigit():
            assert f"| {code} |" in docs, code


@pytest.mark.parametrize(
    "args",
    [
        ["config", "show"],
        ["--help"],
        ["data", "prepare", "--dataset", "synthetic", "--out", "{tmp}/data"],
    ],
)
def test_a_closed_pipe_ends_quietly(tmp_path: Path, args: list[str]) -> None:
    """`fedfuse config show | head -1` and `data prepare … | head` printed BrokenPipeError
    tracebacks: here the reader is gone before the first byte, so every write fails."""
    read, write = os.pipe()
    os.close(read)
    try:
        command = [sys.executable, "-m", "server.cli", *(a.format(tmp=tmp_path) for a in args)]
        done = subprocess.run(
            command, stdout=write, stderr=subprocess.PIPE, cwd=ROOT, env=cli_env(), timeout=120
        )
    finally:
        os.close(write)
    quiet = 0 if args == ["--help"] else 141  # argparse itself ignores a closed pipe
    assert done.returncode == quiet and done.stderr == b"", done.stderr.decode()


@pytest.mark.parametrize(
    ("command", "sig", "code"),
    # one handler serves both signals and both commands (server/cli.py): each signal and each
    # command is stopped once, which the four pairs did at twice the time (40 s each)
    [("simulate", signal.SIGINT, 130), ("compare", signal.SIGTERM, 143)],
)
def test_ctrl_c_and_sigterm_stop_within_seconds_and_leave_a_resumable_run(
    tmp_path: Path, tiny_bert_dir: Path, synthetic_dir: Path, command: str, sig: int, code: int
) -> None:
    """SIGINT after round 1 printed a traceback and the process was alive 90 s later;
    SIGTERM ended it with rc -6 and no message."""
    settings = [
        "--config",
        str(TINY_TOML),
        "--set",
        f"data.path='{synthetic_dir}'",
        "--set",
        f"model.backbone='{tiny_bert_dir}'",
        "--set",
        "federation.rounds=30",
        "--set",
        "federation.min_nodes=2",
        "--cpus-per-client",
        "1",
    ]
    out = tmp_path / "out"
    if command == "simulate":
        args = ["simulate", *settings, "--runs", str(out), "--name", "stopped"]
    else:
        args = [
            "compare",
            *settings,
            "--epsilon",
            "8:fedavg",
            "--out",
            str(out),
            "--split",
            "valid",
        ]
    process = start_cli(*args)
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 400
        before = []  # the console up to round 1
        for line in process.stdout:
            if line.startswith("[fedfuse] round 1/30 done"):
                break
            before.append(line)
            assert time.monotonic() < deadline, "round 1 never finished"
        else:
            pytest.fail(f"ended before round 1: {process.wait()} {process.stderr.read()}")
        process.send_signal(sig)
        stopped = time.monotonic()
        _, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert time.monotonic() - stopped < 30
    # the wait before round 1 (noise calibration) is announced, not silent
    assert any("calibrated its DP noise" in line for line in before), before
    assert process.returncode == code
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"fedfuse: stopped by {signal.Signals(sig).name}")
    runs = out if command == "simulate" else out / "runs"
    [run] = list(runs.glob("*.incomplete"))
    if command == "simulate":
        assert f"resume with `fedfuse simulate --resume {run}`" in lines[0]
    else:
        assert f"the same command resumes from {out}" in lines[0]
    record = RunRecord(run)
    assert record.last_round() >= 1
    json.loads((run / "config.json").read_text())
    with record.owned():  # the lock went with the process: --resume can take the run
        pass


def test_the_app_bundle_holds_only_tracked_files(tmp_path: Path) -> None:
    """Untracked .py/.toml files under common/, server/, simulations/ shipped in the FAB."""
    from server.deployment.deploy import tracked_app

    app = tmp_path / "app"
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    files = {
        "pyproject.toml": pyproject,
        "common/a.py": "",
        "client/b.py": "",
        "server/app.py": "",
        "simulations/run.toml": "",
        "tests/test_x.py": "",
        "server/scratch.py": "",
        "simulations/scratch.toml": "",
    }
    for name, text in files.items():
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        (app / name).write_text(text)
    git = ["git", "-C", str(app), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    tracked = [name for name in files if "scratch" not in name]
    subprocess.run([*git, "add", *tracked], check=True)
    staged = tracked_app(app, tmp_path / "bundle")
    shipped = sorted(str(p.relative_to(staged)) for p in staged.rglob("*") if p.is_file())
    assert shipped == [
        "client/b.py",
        "common/a.py",
        "pyproject.toml",
        "server/app.py",
        "simulations/run.toml",
    ]


def test_flower_lines_are_printed_once() -> None:
    """`deploy run` printed every Flower line twice: opacus' root handler on import."""
    code = (
        "import logging, opacus.utils.module_utils\n"
        "from flwr.common.logger import log\n"
        "from server.federation.server_app import single_flower_log\n"
        "single_flower_log()\n"
        "log(logging.INFO, 'the-line')\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=120
    )
    assert (done.stdout + done.stderr).count("the-line") == 1, done.stdout + done.stderr


def test_a_round_whose_evaluated_platforms_hold_no_case_aggregates_to_nothing(
    tmp_path: Path,
) -> None:
    """With fraction_evaluate < 1 the platforms asked may all lack a case: Flower's weighted
    mean divided by zero and ended the run with a ZeroDivisionError."""
    from flwr.app import ConfigRecord, Message, MetricRecord, RecordDict

    from server.federation.strategy import FedFuseStrategy
    from tests.test_strategy import _metadata

    def reply(node: int, cases: int) -> Message:
        content = RecordDict(
            {
                "metrics": MetricRecord({"num-examples": cases, "ndcg@10": 0.0}),
                "platform": ConfigRecord({"name": f"p{node}"}),
            }
        )
        return Message(content=content, metadata=_metadata(node, "evaluate"))

    strategy = FedFuseStrategy(RunRecord(tmp_path), lambda r: 0.1)
    assert strategy.aggregate_evaluate(1, [reply(1, 0), reply(2, 0)]) is None
    merged = strategy.aggregate_evaluate(2, [reply(1, 0), reply(2, 4)])
    assert merged is not None and merged["ndcg@10"] == 0.0


def test_a_full_disk_during_a_run_ends_in_one_line_and_stays_resumable(
    tmp_path: Path, write_run_config, capsys, monkeypatch
) -> None:
    """The disk filling mid-run gave tracebacks and no final line."""
    import errno

    from server.federation import server_app

    real = server_app.save_adapter

    def full(scorer, out, extra=None):
        if out.name == "round_002":
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(out / "adapter.bin"))
        return real(scorer, out, extra)

    monkeypatch.setattr(server_app, "save_adapter", full)
    config = write_run_config(tmp_path / "run.toml")
    runs = tmp_path / "runs"
    args = ["simulate", "--config", str(config), "--runs", str(runs), "--name", "full"]
    assert main([*args, "--no-side-by-side"]) == 2
    line = _one_line(capsys)
    assert "No space left on device" in line and "round_002" in line
    assert f"--resume {runs / 'full.incomplete'}" in line
    assert RunRecord(runs / "full.incomplete").last_round() == 1


def test_audit_that_cannot_write_its_report_ends_in_one_line(
    tmp_path: Path, capsys, monkeypatch
) -> None:
    """`audit` on a read-only run folder gave a traceback and rc 1, the code of raised flags."""
    from server.audit import audit

    run = tmp_path / "run"
    (run / "audit.json").mkdir(parents=True)  # what the report would replace is not a file
    monkeypatch.setattr(audit, "audit", lambda *args: {"flags": []})
    assert main(["audit", str(run)]) == 2
    assert _one_line(capsys) == f"fedfuse: error: {run / 'audit.json'}: Is a directory"
    assert [p.name for p in run.iterdir()] == ["audit.json"]  # no temporary file left


def test_a_read_only_file_system_is_one_line_for_simulate_and_audit(
    tmp_path: Path, write_run_config, capsys, monkeypatch
) -> None:
    """`simulate --runs` and `audit` on a read-only mount gave tracebacks. Root ignores
    permission bits, so the mount is simulated: creating anything under ro/ fails with
    EROFS, as the kernel answers on a read-only file system."""
    import errno
    import tempfile

    from server.audit import audit

    ro = tmp_path / "ro"
    (ro / "run").mkdir(parents=True)
    real_mkdir, real_mkstemp = os.mkdir, tempfile.mkstemp

    def refused(path: object) -> OSError:
        return OSError(errno.EROFS, os.strerror(errno.EROFS), os.fspath(path))  # type: ignore[arg-type]

    def mkdir(path, *args, **kwargs):
        if Path(path).is_relative_to(ro):
            raise refused(path)
        return real_mkdir(path, *args, **kwargs)

    def mkstemp(*args, dir=None, **kwargs):
        if dir is not None and Path(dir).is_relative_to(ro):
            raise refused(dir)
        return real_mkstemp(*args, dir=dir, **kwargs)

    monkeypatch.setattr(os, "mkdir", mkdir)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp)
    config = write_run_config(tmp_path / "run.toml")
    assert main(["simulate", "--config", str(config), "--runs", str(ro / "runs")]) == 2
    assert "Read-only file system" in _one_line(capsys)
    monkeypatch.setattr(audit, "audit", lambda *args: {"flags": []})
    assert main(["audit", str(ro / "run")]) == 2  # 2: an error, not 1 (flags raised)
    report = ro / "run" / "audit.json"
    assert _one_line(capsys) == f"fedfuse: error: {report}: Read-only file system"
    assert list(ro.rglob("*")) == [ro / "run"]  # nothing half-written


def test_a_progress_line_to_a_closed_pipe_ends_the_command(monkeypatch) -> None:
    """A logged progress line met the closed pipe inside logging, which printed a
    '--- Logging error ---' traceback and went on; it now reaches main() (exit 141)."""
    import io
    import logging

    from server import cli

    class Closed(io.StringIO):
        def write(self, text: str) -> int:
            raise BrokenPipeError(32, "Broken pipe")

    handler = cli._Console()
    logger = logging.getLogger("server.test-closed-pipe")
    monkeypatch.setattr(logger, "handlers", [handler])
    monkeypatch.setattr(logger, "propagate", False)
    monkeypatch.setattr(sys, "stdout", Closed())
    with pytest.raises(BrokenPipeError):
        logger.warning("a progress line")
