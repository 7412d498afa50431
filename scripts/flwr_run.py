"""Run FedFuse with ``flwr run .`` offline, on a local SuperLink this script owns.

Usage: python scripts/flwr_run.py [--name NAME | --resume RUN_DIR] [--runs runs]
       [--cpus-per-client 1] [--port 39291] [--flwr-home runs/.flwr-home] [--timeout 3600]
       [KEY=VALUE ...]

``KEY=VALUE`` (TOML values) are run-config overrides: ``config-file="simulations/x.toml"`` picks
the configuration, ``section.key=value`` (e.g. ``federation.rounds=1``) overrides it like
``fedfuse simulate --set``, and any other key goes to ``flwr run -c`` (it must exist in
``[tool.flwr.app.config]``). Relative paths (the config file, ``data.path`` inside it) resolve
against the repository root, because that is the SuperLink's working directory and so the apps'.

Why not a bare ``flwr run .``: Flower 1.41 auto-starts a detached SuperLink that outlives the
command and whose cwd/env become the apps' cwd/env, runs ``uv sync`` per run unless the
SuperLink was started with it disabled (fails offline), and exits 0 even when the run failed.
This script therefore

1. writes ``$FLWR_HOME/config.toml`` with one connection to its own SuperLink (FLWR_HOME is a
   git-ignored folder, never ``~/.flwr``);
2. starts ``flower-superlink --simulation`` itself (state in memory, runtime dependency
   installation off, cwd = repo root, this venv first on PATH);
3. creates ``RUNS/NAME.incomplete/`` like ``fedfuse simulate`` (resolved config with each
   platform's ledger inside the run folder) and passes it as absolute ``config-file`` and
   ``run-dir``;
4. runs ``flwr run REPO fedfuse-local --stream`` with one SuperNode per platform;
5. asks the SuperLink for the run's final status, checks every round was checkpointed, writes
   the report and renames the folder to ``RUNS/NAME``; exits 1 if anything failed;
6. always stops the SuperLink and every process under it (SuperExec, flwr-simulation, Ray).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import tomllib
import urllib.request
import uuid
from pathlib import Path

import psutil

from common.atomic import atomic_write
from common.config import load_config
from common.errors import FedFuseError
from common.platform_data import federation_platforms
from common.processes import stop_processes
from server.deployment.deploy import flower_env
from server.federation.run_record import CONFIG_FILE, RunRecord
from server.simulation.simulation import (
    check_ledgers,
    check_startable,
    finish_run,
    locate_state,
    prepare_run,
)

REPO = Path(__file__).resolve().parents[1]
CONNECTION = "fedfuse-local"
TAG_VARIABLE = "FEDFUSE_FLWR_RUN"  # marks every process this invocation starts


def _split_overrides(pairs: list[str]) -> tuple[dict[str, object], list[str]]:
    """Flower run-config keys (values parsed as TOML, like ``flwr run -c``) and the
    ``section.key=value`` overrides of the FedFuse configuration."""
    flower: dict[str, object] = {}
    fedfuse: list[str] = []
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key.strip():
            raise FedFuseError(f"run-config override {pair!r}: expected KEY=VALUE")
        if "." in key:
            fedfuse.append(pair)
            continue
        try:
            flower[key.strip()] = tomllib.loads(f"v = {value}")["v"]
        except tomllib.TOMLDecodeError as err:
            raise FedFuseError(
                f"run-config override {pair!r}: invalid TOML value ({err})"
            ) from None
    return flower, fedfuse


def _default_config_file() -> str:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    return str(pyproject["tool"]["flwr"]["app"]["config"]["config-file"])


def _environment(flwr_home: Path) -> dict[str, str]:
    """The SuperLink's environment; ServerApp and ClientApps inherit it. The offline settings
    are the deployment's (``flower_env``), plus a tag that finds every process of this run."""
    return {
        **os.environ,
        **flower_env(flwr_home),
        TAG_VARIABLE: uuid.uuid4().hex,
        "RAY_DEDUP_LOGS": "0",
        "PATH": os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")]),
    }


def _write_connection(flwr_home: Path, port: int) -> None:
    atomic_write(
        flwr_home / "config.toml",
        f'[superlink]\ndefault = "{CONNECTION}"\n\n'
        f'[superlink.{CONNECTION}]\naddress = "127.0.0.1:{port}"\ninsecure = true\n',
    )


def _healthy(port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=0.5) as reply:
            return reply.status == 200
    except OSError:
        return False


def _port_in_use(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        return probe.connect_ex(("127.0.0.1", port)) == 0


def start_superlink(port: int, flwr_home: Path, env: dict[str, str]) -> subprocess.Popen:
    """A simulation SuperLink in its own session (so its whole tree can be stopped)."""
    if _port_in_use(port):
        raise FedFuseError(f"127.0.0.1:{port} is in use (another SuperLink?); pass --port")
    log = flwr_home / f"superlink-{port}.log"
    process = subprocess.Popen(
        [
            "flower-superlink",
            "--insecure",
            "--simulation",
            "--disable-runtime-dependency-installation",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--log-file",
            str(log),
        ],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    deadline = time.monotonic() + 60
    while not _healthy(port):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_superlink(process, env[TAG_VARIABLE])
            raise FedFuseError(f"flower-superlink did not start on port {port}; see {log}")
        time.sleep(0.2)
    return process


def _started_by(tag: str) -> list[psutil.Process]:
    """Processes whose environment carries this invocation's tag: the SuperLink and all it
    started, including Ray workers, which Ray re-parents into a session of their own."""
    found = []
    for proc in psutil.process_iter():
        with contextlib.suppress(psutil.Error):
            if proc.environ().get(TAG_VARIABLE) == tag:
                found.append(proc)
    return found


def stop_superlink(process: subprocess.Popen, tag: str) -> None:
    """Terminate the SuperLink and every process started under it; SIGKILL what is left."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGTERM)
    stop_processes(lambda: _started_by(tag))
    process.wait(timeout=10)


def _run_statuses(env: dict[str, str]) -> list[tuple[str, str]]:
    """(status, details) of every run on our fresh, in-memory SuperLink: exactly this one."""
    listed = subprocess.run(
        ["flwr", "ls", CONNECTION, "--format", "json"],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    try:
        runs = json.loads(listed.stdout)["runs"]
    except (json.JSONDecodeError, KeyError):
        raise FedFuseError(f"flwr ls failed: {listed.stdout}{listed.stderr}".strip()) from None
    return [(run["status"], run.get("status-details", "")) for run in runs]


def run(args: argparse.Namespace) -> Path:
    overrides, config_overrides = _split_overrides(args.overrides)
    if "run-dir" in overrides:
        raise FedFuseError("run-dir is set by this script; use --runs and --name")
    if args.resume and ("config-file" in overrides or config_overrides):
        raise FedFuseError("--resume continues a run as configured: no config overrides")
    config_file = Path(str(overrides.pop("config-file", _default_config_file())))
    resume = Path(args.resume).resolve() if args.resume else None
    os.chdir(REPO)  # relative paths resolve where the apps will run
    if resume:
        record = RunRecord(resume)
        config = locate_state(record)  # the platform state this folder carries, wherever it is
        check_startable(config)
        check_ledgers(record, config)  # never a fresh ledger for a platform the run charged
    else:
        config = load_config(config_file, config_overrides)
        record = prepare_run(config, Path(args.runs).resolve(), args.name)
    platforms = len(federation_platforms(config.data))
    flwr_home = Path(args.flwr_home).resolve()
    env = _environment(flwr_home)
    _write_connection(flwr_home, args.port)
    run_config = {
        "config-file": str((record.root / CONFIG_FILE).resolve()),
        "run-dir": str(record.root.resolve()),
        **overrides,
    }
    command = ["flwr", "run", str(REPO), CONNECTION, "--stream"]
    for key, value in run_config.items():
        command += ["-c", f"{key}={json.dumps(value)}"]
    command += [
        "--federation-config",
        f"num-supernodes={platforms} client-resources-num-cpus={args.cpus_per_client}",
    ]
    print(f"[flwr_run] {platforms} platforms, run folder {record.root}", flush=True)
    superlink = start_superlink(args.port, flwr_home, env)
    try:
        subprocess.run(command, cwd=REPO, env=env, check=True, timeout=args.timeout)
        statuses = _run_statuses(env)
    finally:
        stop_superlink(superlink, env[TAG_VARIABLE])
    done, planned = record.last_round(), config.federation.rounds
    if [status for status, _ in statuses] != ["finished:completed"] or done < planned:
        raise FedFuseError(
            f"{record.root}: run status {statuses}, {done} of {planned} rounds checkpointed"
        )
    return finish_run(record)


def _raise_on_sigterm(signum: int, frame: object) -> None:
    raise KeyboardInterrupt(f"signal {signum}")  # unwinds through the finally: SuperLink stops


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE", help="run-config override")
    parser.add_argument("--name", help="run folder name (default: strategy and time)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run")
    parser.add_argument("--runs", default=str(REPO / "runs"), help="folder of run folders")
    parser.add_argument("--cpus-per-client", type=int, default=1, help="Ray CPUs per actor")
    parser.add_argument("--port", type=int, default=39291, help="the SuperLink's HTTP port")
    parser.add_argument(
        "--flwr-home", default=str(REPO / "runs" / ".flwr-home"), help="FLWR_HOME (git-ignored)"
    )
    parser.add_argument("--timeout", type=float, default=3600, help="seconds before giving up")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    try:
        print(f"finished: {run(args)}")
    except (FedFuseError, subprocess.CalledProcessError, subprocess.TimeoutExpired) as err:
        print(f"flwr_run: error: {err}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
