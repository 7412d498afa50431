"""``fedfuse deploy``: one SuperNode per platform, a SuperLink with TLS and node authentication.

Each subcommand prints the exact Flower command (with the environment FedFuse adds) before it
runs it, so an operator can learn, copy or script them; ``--dry-run`` only prints. The
long-running daemons (``superlink``, ``supernode``) replace this process (``exec``), so signals
and exit codes are Flower's own. Every path handed to Flower is made absolute, because the
ServerApp and ClientApps resolve relative paths against the daemon's working directory, not
the operator's.

Runtime dependency installation (``uv sync`` per run) is switched off everywhere: the
machines are offline and the apps must use the installed FedFuse environment.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import shlex
import shutil
import subprocess
import sys
import tempfile
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from common.atomic import atomic_write
from common.config import DPConfig
from common.errors import FedFuseError

log = logging.getLogger(__name__)

CONNECTION = "fedfuse"
DEFAULT_PORT = 9093
SUPERNODE_RUNTIME_PORT = 9094
APP_DIR = Path(__file__).resolve().parents[2]  # the repository root (server/deployment/..)


@dataclass(frozen=True)
class FlowerCommand:
    """A Flower command line plus the environment variables FedFuse sets for it."""

    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)

    def show(self) -> str:
        assignments = [f"{key}={shlex.quote(value)}" for key, value in self.env.items()]
        return " ".join([*assignments, shlex.join(self.argv)])

    def environment(self) -> dict[str, str]:
        """The calling environment plus ours; this interpreter's bin folder first on PATH,
        because the SuperLink and SuperNode start ``flower-superexec`` by name."""
        env = dict(os.environ) | self.env
        env["PATH"] = os.pathsep.join([str(Path(sys.executable).parent), env.get("PATH", "")])
        return env


def flower_env(flwr_home: Path) -> dict[str, str]:
    """Offline settings shared by every Flower process of a deployment."""
    return {
        "FLWR_HOME": str(flwr_home.resolve()),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "FLWR_TELEMETRY_ENABLED": "0",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
    }


def _existing(path: Path, what: str) -> Path:
    if not path.exists():
        raise FedFuseError(f"{path}: {what} not found")
    return path.resolve()


def _toml_string(value: str, what: str) -> str:
    """A TOML string for Flower's ``key=value`` parser, which cannot read escaped quotes."""
    if any(char in value for char in "\"'\n\\"):
        raise FedFuseError(f"{what} {value!r}: quotes, backslashes and newlines are not allowed")
    return f'"{value}"'


def superlink_command(certs: Path, state: Path, host: str, port: int) -> FlowerCommand:
    """The SuperLink: TLS on its one port (Fleet, Control and Runtime APIs), registered
    SuperNodes only, persistent state (registrations and runs survive a restart)."""
    certs = _existing(certs, "certificate folder")
    state = state.resolve()
    argv = [
        "flower-superlink",
        "--ssl-ca-certfile",
        str(_existing(certs / "ca.crt", "CA certificate")),
        "--ssl-certfile",
        str(_existing(certs / "server.crt", "server certificate")),
        "--ssl-keyfile",
        str(_existing(certs / "server.key", "server key")),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host",
        host,
        "--port",
        str(port),
        "--database",
        str(state / "state.db"),
        "--log-file",
        str(state / "superlink.log"),
    ]
    return FlowerCommand(argv, flower_env(state / "flwr-home"))


def node_config(platform: str, data_dir: Path, state_dir: Path, overrides: list[str]) -> str:
    """The SuperNode's node config: who it is, where its private files are, its DP settings."""
    from server.deployment.deploy_keys import check_name

    pairs = [
        f"platform={_toml_string(check_name(platform), 'platform')}",
        f"data-dir={_toml_string(str(data_dir), 'data dir')}",
        f"state-dir={_toml_string(str(state_dir), 'state dir')}",
    ]
    for override in overrides:
        key, sep, value = override.partition("=")
        section, _, name = key.partition(".")
        if not sep or section != "dp" or name not in DPConfig.model_fields:
            raise FedFuseError(f"--set {override!r}: expected dp.KEY=VALUE (a [dp] setting)")
        try:
            tomllib.loads(f"v = {value.strip()}")
        except tomllib.TOMLDecodeError:
            raise FedFuseError(f"--set {override!r}: the value is not a TOML value") from None
        pairs.append(f"{key}={value.strip()}")
    return " ".join(pairs)


def supernode_command(
    platform: str,
    data_dir: Path,
    state_dir: Path,
    key: Path,
    superlink: str,
    ca: Path,
    runtime_port: int,
    overrides: list[str],
) -> FlowerCommand:
    """One platform's SuperNode; its Flower home (installed apps) lives in its state folder."""
    data_dir = _existing(data_dir, "platform data folder")
    state_dir = state_dir.resolve()
    argv = [
        "flower-supernode",
        "--superlink",
        superlink,
        "--root-certificates",
        str(_existing(ca, "CA certificate")),
        "--auth-supernode-private-key",
        str(_existing(key, "SuperNode private key")),
        "--node-config",
        node_config(platform, data_dir, state_dir, overrides),
        "--port",
        str(runtime_port),
    ]
    return FlowerCommand(argv, flower_env(state_dir / "flwr-home"))


def write_connection(flwr_home: Path, superlink: str, ca: Path) -> Path:
    """``$FLWR_HOME/config.toml`` naming this federation's SuperLink for the ``flwr`` CLI.

    A dedicated FLWR_HOME: the operator's own ``~/.flwr`` is never touched.
    """
    ca_path = _toml_string(str(_existing(ca, "CA certificate")), "CA path")
    path = flwr_home.resolve() / "config.toml"
    atomic_write(
        path,
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f"address = {_toml_string(superlink, 'SuperLink address')}\n"
        f"root-certificates = {ca_path}\n",
    )
    return path


def register_command(flwr_home: Path, public_key: Path, name: str | None) -> FlowerCommand:
    argv = ["flwr", "supernode", "register", str(_existing(public_key, "public key")), CONNECTION]
    if name:
        argv += ["--name", name]
    return FlowerCommand(argv, flower_env(flwr_home))


def submit_command(flwr_home: Path, app: Path, config_file: Path, run_dir: Path) -> FlowerCommand:
    """``flwr run``: builds the FAB from ``app`` and starts the run.

    The configuration file is read by the ServerApp and by every ClientApp. A file inside the
    app travels in the FAB, so it is passed relative to the app and every machine reads its
    own copy; any other file is passed as an absolute path that must exist on every machine.
    """
    app_dir = _existing(app / "pyproject.toml", "Flower app").parent
    config = _existing(config_file, "run configuration")
    shipped = config.is_relative_to(app_dir) and config.suffix == ".toml"
    location = config.relative_to(app_dir) if shipped else config
    run_config = (
        f"config-file={_toml_string(str(location), 'path')} "
        f"run-dir={_toml_string(str(run_dir.resolve()), 'run folder')}"
    )
    argv = [
        "flwr",
        "run",
        str(app_dir),
        CONNECTION,
        "--run-config",
        run_config,
        "--format",
        "json",
    ]
    return FlowerCommand(argv, flower_env(flwr_home))


def tracked_app(app: Path, into: Path) -> Path:
    """A copy of the Flower app at ``into`` holding only the files git tracks that its
    ``fab-include`` selects, and its ``pyproject.toml``: ``flwr run`` bundles every file the
    patterns match, so untracked scratch files beside the code would ship to every machine."""
    from flwr.cli.build import get_filtered_fab_paths

    app_dir = _existing(app / "pyproject.toml", "Flower app").parent
    try:
        listed = subprocess.run(
            ["git", "-C", str(app_dir), "ls-files", "-z", "--cached"],
            capture_output=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        raise FedFuseError(
            f"{app_dir}: not a git work tree (the app bundle holds only the files git tracks)"
        ) from None
    tracked = {
        name: app_dir / name
        for name in os.fsdecode(listed.stdout).split("\0")
        if name and (app_dir / name).is_file()
    }
    config = tomllib.loads((app_dir / "pyproject.toml").read_text(encoding="utf-8"))
    for name in [*get_filtered_fab_paths(tracked, config), "pyproject.toml"]:
        (into / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(app_dir / name, into / name)
    return into


def _announce(command: FlowerCommand) -> None:
    print(f"$ {command.show()}", flush=True)


def _exec(command: FlowerCommand, dry_run: bool) -> None:
    """Replace this process with the daemon (or only print it)."""
    _announce(command)
    if not dry_run:
        sys.stdout.flush()
        os.execvpe(command.argv[0], command.argv, command.environment())


def _call(command: FlowerCommand, capture: bool = False) -> subprocess.CompletedProcess[str]:
    _announce(command)
    return subprocess.run(
        command.argv, env=command.environment(), capture_output=capture, text=True, check=False
    )


def _flwr_home(args: argparse.Namespace) -> Path:
    return Path(args.home).resolve() / "flwr-home"


def _certs(args: argparse.Namespace) -> None:
    from server.deployment.deploy_keys import write_certificates

    files = write_certificates(Path(args.out), args.host, args.days, args.force)
    print(f"CA certificate (give to every platform and to flwr): {files.ca_cert}")
    print(f"SuperLink certificate for {', '.join(args.host)}: {files.server_cert}")
    print(f"private keys (0600, keep on the SuperLink host): {files.ca_key}, {files.server_key}")


def _keys(args: argparse.Namespace) -> None:
    from server.deployment.deploy_keys import write_node_keys

    keys = write_node_keys(Path(args.out), args.platform, args.force)
    print(f"private key (0600, never leaves the platform): {keys.private_key}")
    print(f"public key (send to the federation operator): {keys.public_key}")
    print("the federation operator registers it with:")
    print(
        f"  fedfuse deploy register --public-key {keys.public_key.name} --name {args.platform}"
        " --superlink HOST:PORT --ca ca.crt"
    )


def _superlink(args: argparse.Namespace) -> None:
    command = superlink_command(
        Path(args.certs), Path(args.home) / "superlink", args.host, args.port
    )
    if not args.dry_run:
        (Path(args.home) / "superlink").mkdir(parents=True, exist_ok=True)
    _exec(command, args.dry_run)


def _register(args: argparse.Namespace) -> None:
    home = _flwr_home(args)
    command = register_command(home, Path(args.public_key), args.name)
    if args.dry_run:
        _announce(command)
        return
    write_connection(home, args.superlink, Path(args.ca))
    if _call(command).returncode != 0:
        raise FedFuseError(f"{args.public_key}: registration failed (see the message above)")


def drop_partial_apps(flwr_home: Path) -> list[Path]:
    """Remove installed app folders that lack their ``pyproject.toml``: a SuperNode stopped
    while its ClientApp was unpacking the app leaves one, and Flower, finding the folder, never
    installs it again, so the platform's every later round fails to load its ClientApp."""
    apps = flwr_home / "apps"
    partial = [
        p for p in sorted(apps.glob("*")) if p.is_dir() and not (p / "pyproject.toml").is_file()
    ]
    for folder in partial:
        shutil.rmtree(folder)
    return partial


def _supernode(args: argparse.Namespace) -> None:
    command = supernode_command(
        args.platform,
        Path(args.data_dir),
        Path(args.state_dir),
        Path(args.key),
        args.superlink,
        Path(args.ca),
        args.runtime_port,
        args.set,
    )
    if not args.dry_run:
        Path(args.state_dir).mkdir(parents=True, exist_ok=True)
        for folder in drop_partial_apps(Path(args.state_dir) / "flwr-home"):
            log.info("removed a partly installed app (an interrupted start): %s", folder)
    _exec(command, args.dry_run)


def _run(args: argparse.Namespace) -> None:
    """Submit, stream the run's log, then fail unless Flower reports it completed
    (``flwr run --stream`` exits 0 even when the ServerApp failed)."""
    from server.deployment.deploy_keys import check_name

    home = _flwr_home(args)
    run_dir = Path(args.runs) / check_name(args.name, "run name")
    if args.dry_run:
        _announce(submit_command(home, Path(args.app), Path(args.config), run_dir))
        return
    write_connection(home, args.superlink, Path(args.ca))
    with tempfile.TemporaryDirectory(prefix="fedfuse-app-") as staged:
        app = Path(args.app).resolve()
        config = Path(args.config).resolve()
        bundled = tracked_app(app, Path(staged))
        if config.is_relative_to(app) and (bundled / config.relative_to(app)).is_file():
            config = bundled / config.relative_to(app)  # a tracked file: it travels in the FAB
        submitted = _call(submit_command(home, bundled, config, run_dir), capture=True)
    try:
        run_id = int(json.loads(submitted.stdout)["run-id"])
    except (json.JSONDecodeError, KeyError, TypeError, ValueError):
        raise FedFuseError(
            f"flwr run failed: {submitted.stdout}{submitted.stderr}".strip()
        ) from None
    print(f"run {run_id} started; run folder {run_dir.resolve()}", flush=True)
    env = flower_env(home)
    _call(FlowerCommand(["flwr", "log", str(run_id), CONNECTION, "--stream"], env))
    listed = _call(
        FlowerCommand(["flwr", "ls", CONNECTION, "--run-id", str(run_id), "--format", "json"], env),
        capture=True,
    )
    try:
        run = json.loads(listed.stdout)["runs"][0]
    except (json.JSONDecodeError, KeyError, IndexError):
        raise FedFuseError(f"flwr ls failed: {listed.stdout}{listed.stderr}".strip()) from None
    if run["status"] != "finished:completed":
        details = run.get("status-details", "")
        raise FedFuseError(f"run {run_id}: {run['status']} {details}".strip())
    print(f"run {run_id} finished:completed; run folder {run_dir.resolve()}")


def _add_superlink_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--superlink",
        default=f"127.0.0.1:{DEFAULT_PORT}",
        help="SuperLink address HOST:PORT (a host named in its certificate)",
    )
    parser.add_argument("--ca", required=True, help="the federation's CA certificate (PEM)")
    parser.add_argument("--dry-run", action="store_true", help="print the command only")


def _add_home(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--home",
        default="deploy",
        help="the federation operator's folder (SuperLink state, flwr CLI settings)",
    )


def add_deploy_parser(commands: argparse._SubParsersAction) -> None:
    """``fedfuse deploy ...`` subcommands (registered by server/cli.py)."""
    deploy = commands.add_parser(
        "deploy", help="deploy the federation: TLS SuperLink, one SuperNode per platform"
    ).add_subparsers(dest="action", required=True)

    certs = deploy.add_parser("certs", help="CA and SuperLink TLS certificate (PEM)")
    certs.add_argument("--out", required=True, help="folder for ca.crt/.key, server.crt/.key")
    certs.add_argument(
        "--host",
        action="append",
        required=True,
        help="DNS name or IP the SuperNodes dial (repeatable; all go into the certificate)",
    )
    certs.add_argument("--days", type=int, default=365, help="validity in days")
    certs.add_argument("--force", action="store_true", help="replace existing keys")
    certs.set_defaults(run=_certs)

    keys = deploy.add_parser("keys", help="a platform's SuperNode authentication key pair")
    keys.add_argument("--platform", required=True, help="platform name (file names)")
    keys.add_argument("--out", required=True, help="folder for PLATFORM.key and PLATFORM.pub")
    keys.add_argument("--force", action="store_true", help="replace an existing key")
    keys.set_defaults(run=_keys)

    superlink = deploy.add_parser("superlink", help="start the SuperLink (runs in foreground)")
    superlink.add_argument("--certs", required=True, help="folder written by `deploy certs`")
    superlink.add_argument("--host", default="0.0.0.0", help="address to listen on")
    superlink.add_argument("--port", type=int, default=DEFAULT_PORT, help="its one TLS port")
    superlink.add_argument("--dry-run", action="store_true", help="print the command only")
    _add_home(superlink)
    superlink.set_defaults(run=_superlink)

    register = deploy.add_parser("register", help="allow a platform's public key to connect")
    register.add_argument("--public-key", required=True, help="PLATFORM.pub from `deploy keys`")
    register.add_argument("--name", help="a readable name for the SuperNode (e.g. the platform)")
    _add_superlink_options(register)
    _add_home(register)
    register.set_defaults(run=_register)

    supernode = deploy.add_parser("supernode", help="start one platform's SuperNode")
    supernode.add_argument("--platform", required=True, help="platform name")
    supernode.add_argument("--data-dir", required=True, help="the platform's data folder")
    supernode.add_argument(
        "--state-dir", required=True, help="private folder: ε ledger, fedsa tensors, Flower home"
    )
    supernode.add_argument("--key", required=True, help="PLATFORM.key from `deploy keys`")
    supernode.add_argument(
        "--runtime-port",
        type=int,
        default=SUPERNODE_RUNTIME_PORT,
        help="local port of the SuperNode's Runtime API (one per SuperNode on a host)",
    )
    supernode.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="dp.KEY=VALUE",
        help="the platform's own DP setting, wins over the run's (repeatable)",
    )
    _add_superlink_options(supernode)
    supernode.set_defaults(run=_supernode)

    run = deploy.add_parser("run", help="start a run on the deployed federation and follow it")
    run.add_argument("--config", required=True, help="run configuration TOML")
    run.add_argument("--name", required=True, help="run folder name")
    run.add_argument("--runs", default="runs", help="folder of run folders (on the SuperLink)")
    run.add_argument("--app", default=str(APP_DIR), help="the FedFuse app folder (pyproject)")
    _add_superlink_options(run)
    _add_home(run)
    run.set_defaults(run=_run)
