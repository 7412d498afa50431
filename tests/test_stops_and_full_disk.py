"""Issue 35's last faults, in real processes: ``fedfuse serve`` stopped by Ctrl-C or SIGTERM,
and the disk filling inside the Ray actors that train the platforms during ``simulate``.

Both run as subprocesses under bounded timeouts: a signal handler and a Ray actor only behave
as they do in a user's terminal in a process of their own."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from pathlib import Path

import httpx
import pytest

from client.ledger import DP_SGD, LEDGER_FILE, PrivacyLedger
from server.cli import main
from server.federation.run_record import RunRecord
from tests.cli_process import run_cli, start_cli


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _up(url: str, process: subprocess.Popen[str], seconds: float) -> None:
    """Wait until the service answers /health (bounded; fails if the process ends first)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if process.poll() is not None:
            pytest.fail(f"serve ended before it answered: rc {process.returncode}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    pytest.fail(f"serve did not answer /health within {seconds} s")


@pytest.mark.slow
@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_serve_stops_on_ctrl_c_and_sigterm_with_one_line(
    finished_run: Path, tmp_path: Path, sig: int, code: int
) -> None:
    """Signal handling for ``serve`` was untested (issue 35): it must stop within seconds,
    end with one ``fedfuse: stopped by ...`` line and no traceback, and exit 128 + signal."""
    port = _free_port()
    token = str(tmp_path / "serve.token")
    process = start_cli(
        "serve", str(finished_run), "--platform", "p0", "--port", str(port), "--token-file", token
    )
    try:
        _up(f"http://127.0.0.1:{port}", process, 180)
        process.send_signal(sig)
        stopped = time.monotonic()
        _, err = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert time.monotonic() - stopped < 15
    assert process.returncode == code, err
    assert "Traceback" not in err, err
    ours = [line for line in err.splitlines() if line.startswith("fedfuse:")]
    assert ours == [f"fedfuse: stopped by {signal.Signals(sig).name}"], err
    assert err.strip().splitlines()[-1] == ours[0], err


# Loaded by every Python process of the run (the driver and Ray's workers, which inherit
# PYTHONPATH): once a platform's last reply exists, replacing it fails as a full disk does.
FULL_DISK = """
import errno, os
_replace = os.replace
def replace(src, dst, *args, **kwargs):
    if os.path.basename(os.fsdecode(dst)) == "last_reply.safetensors" and os.path.exists(dst):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), os.fsdecode(src))
    return _replace(src, dst, *args, **kwargs)
os.replace = replace
"""


@pytest.mark.ray
def test_a_full_disk_inside_the_platform_actors_ends_in_one_line_with_valid_ledgers(
    tmp_path: Path, write_run_config
) -> None:
    """The disk filling during ``simulate`` showed Ray tracebacks on the console and no final
    line (issue 35). In round 2 every platform, inside its Ray actor, has charged its ledger
    and trained, then cannot store its reply: one line naming the error, exit 2, and
    ledgers that still verify and hold the charged round. The resume that line advises then
    finished nothing: every platform refused round 2 as already spent."""
    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(FULL_DISK, encoding="utf-8")
    # the budget leaves room for one round more than the planned ε (the lost round's retry)
    config = write_run_config(tmp_path / "run.toml", dp={"epsilon_budget": 8.0})
    runs = tmp_path / "runs"
    command = ["simulate", "--config", str(config)]
    command += ["--runs", str(runs), "--name", "full", "--no-side-by-side"]
    path = os.pathsep.join([str(inject), *filter(None, [os.environ.get("PYTHONPATH")])])
    done = run_cli(*command, timeout=540, PYTHONPATH=path)
    assert done.returncode == 2, done.stderr[-3000:]
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr[-3000:]
    assert lines[0].startswith("fedfuse: error: round 2: ")
    assert "No space left on device" in lines[0] and "last_reply.safetensors" in lines[0]
    run = runs / "full.incomplete"
    assert RunRecord(run).last_round() == 1
    states = sorted((run / "platform_state").iterdir())
    assert len(states) == 2
    for state in states:
        ledger = PrivacyLedger.load(state / LEDGER_FILE)  # verifies the hash chain
        rounds = [e["server_round"] for e in ledger.entries if e.get("kind") == DP_SGD]
        assert rounds == [1, 2]  # round 2 stays charged: trained, its reply lost

    # space again: the resume the error line advises finishes the run. Round 2's replies were
    # never stored, so never sent: each platform trains it again as a second, charged attempt
    # (at a budget equal to the planned ε the retry is refused as over budget, in one line).
    resumed = run_cli("simulate", "--resume", str(run), "--no-side-by-side", timeout=540)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    finished = runs / "full"
    assert RunRecord(finished).last_round() == 2
    for state in sorted((finished / "platform_state").iterdir()):
        ledger = PrivacyLedger.load(state / LEDGER_FILE)
        charged = [(e["server_round"], e.get("attempt")) for e in ledger.entries]
        assert [c for c in charged if c[0] > 0] == [(1, None), (2, None), (2, 2)]
    assert main(["audit", str(finished), "--no-white-box"]) == 0


def test_a_platform_whose_disk_refuses_its_wire_log_answers_with_a_one_line_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a full disk the wire log's append is the first write of a round: it raised inside
    the ClientApp's mod, so the server's message was Ray's multi-line traceback. Now the
    platform answers with an error reply of one line, and nothing is trained."""
    import errno
    from types import SimpleNamespace

    from flwr.app import ConfigRecord, Message, RecordDict

    from client import client_app
    from tests.test_strategy import _metadata

    platform = SimpleNamespace(identity=SimpleNamespace(state_dir=tmp_path, name="p0"), shared={})
    monkeypatch.setattr(client_app, "platform_client", lambda context: platform)

    def full(path: Path, records: list[object]) -> None:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr(client_app, "append_records", full)
    content = RecordDict({"config": ConfigRecord({"server-round": 2})})
    message = Message(content=content, metadata=_metadata(0, "train"))

    def trained(msg: Message, context: object) -> Message:
        raise AssertionError("a round whose message could not be logged was trained")

    reply = client_app.wire_logged(message, None, trained)  # type: ignore[arg-type]
    assert reply.has_error() and reply.error.code == client_app.INVALID_INPUT
    assert reply.error.reason.splitlines() == [
        f"[Errno 28] No space left on device: '{tmp_path / 'wire_log.jsonl'}'"
    ]
