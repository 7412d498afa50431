"""The command lines ``fedfuse deploy`` runs: Flower's CLI and FedFuse's two daemon launchers.

Every path handed to Flower is made absolute, because the ServerApp and ClientApps resolve
relative paths against the daemon's working directory, not the operator's. Runtime dependency
installation (``uv sync`` per run) is switched off everywhere: the machines are offline and
the apps must use the installed FedFuse environment.
"""

from __future__ import annotations

import hashlib
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
from server.deployment.deploy_keys import check_name

CONNECTION = "fedfuse"
FLEET_PORT = 9093  # the only port platforms dial
CONTROL_PORT = 9095  # the operator's flwr CLI
RUNTIME_PORT = 9091  # the SuperLink's ServerApp (Runtime) API, loopback only
SUPERNODE_RUNTIME_PORT = 9094
LOOPBACK = "127.0.0.1"
APP_DIR = Path(__file__).resolve().parents[2]  # the repository root (server/deployment/..)


@dataclass(frozen=True)
class FlowerCommand:
    """A command line plus the environment variables FedFuse sets for it."""

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


def existing(path: Path, what: str) -> Path:
    if not path.exists():
        raise FedFuseError(f"{path}: {what} not found")
    return path.resolve()


def toml_string(value: str, what: str) -> str:
    """A TOML string for Flower's ``key=value`` parser, which cannot read escaped quotes."""
    if any(char in value for char in "\"'\n\\"):
        raise FedFuseError(f"{what} {value!r}: quotes, backslashes and newlines are not allowed")
    return f'"{value}"'


def superlink_command(
    certs: Path, state: Path, fleet: str, control: str, runtime_port: int
) -> FlowerCommand:
    """The SuperLink through FedFuse's launcher (:mod:`server.deployment.superlink_main`):
    Flower's own arguments, plus one listener per API so that each can be bound apart."""
    certs = existing(certs, "certificate folder")
    if (certs / "ca.key").exists():
        raise FedFuseError(
            f"{certs / 'ca.key'}: the CA key must not sit beside the server key; move it to "
            "the offline CA folder (fedfuse deploy certs --ca-dir)"
        )
    state = state.resolve()
    argv = [
        sys.executable,
        "-m",
        "server.deployment.superlink_main",
        "--fleet-address",
        fleet,
        "--control-address",
        control,
        "--ssl-ca-certfile",
        str(existing(certs / "ca.crt", "CA certificate")),
        "--ssl-certfile",
        str(existing(certs / "server.crt", "server certificate")),
        "--ssl-keyfile",
        str(existing(certs / "server.key", "server key")),
        "--enable-supernode-auth",
        "--disable-runtime-dependency-installation",
        "--host",
        LOOPBACK,
        "--port",
        str(runtime_port),
        "--database",
        str(state / "state.db"),
        "--log-file",
        str(state / "superlink.log"),
    ]
    return FlowerCommand(argv, flower_env(state / "flwr-home"))


def node_config(platform: str, data_dir: Path, state_dir: Path, overrides: list[str]) -> str:
    """The SuperNode's node config: who it is, where its private files are, its DP settings."""
    pairs = [
        f"platform={toml_string(check_name(platform), 'platform')}",
        f"data-dir={toml_string(str(data_dir), 'data dir')}",
        f"state-dir={toml_string(str(state_dir), 'state dir')}",
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


@dataclass(frozen=True)
class SuperNodeSettings:
    """What one platform's SuperNode needs: its identity, folders, key and trusted apps."""

    platform: str
    data_dir: Path
    state_dir: Path
    key: Path
    superlink: str
    ca: Path
    runtime_port: int
    trusted_apps: list[str]
    max_wait: float = 600.0  # seconds without the SuperLink before the SuperNode gives up
    overrides: list[str] = field(default_factory=list)


def supernode_command(node: SuperNodeSettings) -> FlowerCommand:
    """One platform's SuperNode through FedFuse's launcher
    (:mod:`server.deployment.supernode_main`), which runs only the pinned app bundles; its
    Flower home (installed apps) lives in its state folder."""
    data_dir = existing(node.data_dir, "platform data folder")
    state_dir = node.state_dir.resolve()
    pins = [arg for digest in node.trusted_apps for arg in ("--trust-app", digest)]
    argv = [
        sys.executable,
        "-m",
        "server.deployment.supernode_main",
        *pins,
        "--superlink",
        node.superlink,
        "--root-certificates",
        str(existing(node.ca, "CA certificate")),
        "--auth-supernode-private-key",
        str(existing(node.key, "SuperNode private key")),
        "--node-config",
        node_config(node.platform, data_dir, state_dir, node.overrides),
        "--port",
        str(node.runtime_port),
        "--max-wait-time",
        str(node.max_wait),
    ]
    return FlowerCommand(argv, flower_env(state_dir / "flwr-home"))


def write_connection(flwr_home: Path, superlink: str, ca: Path) -> Path:
    """``$FLWR_HOME/config.toml`` naming this federation's SuperLink for the ``flwr`` CLI.

    A dedicated FLWR_HOME: the operator's own ``~/.flwr`` is never touched.
    """
    ca_path = toml_string(str(existing(ca, "CA certificate")), "CA path")
    flwr_home.mkdir(mode=0o700, parents=True, exist_ok=True)
    flwr_home.chmod(0o700)
    path = flwr_home.resolve() / "config.toml"
    atomic_write(
        path,
        f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
        f"address = {toml_string(superlink, 'SuperLink address')}\n"
        f"root-certificates = {ca_path}\n",
    )
    return path


def register_command(flwr_home: Path, public_key: Path, name: str | None) -> FlowerCommand:
    argv = ["flwr", "supernode", "register", str(existing(public_key, "public key")), CONNECTION]
    if name:
        argv += ["--name", name]
    return FlowerCommand(argv, flower_env(flwr_home))


def submit_command(flwr_home: Path, app: Path, config_file: Path, run_dir: Path) -> FlowerCommand:
    """``flwr run``: builds the FAB from ``app`` and starts the run.

    The configuration file is read by the ServerApp and by every ClientApp. A file inside the
    app travels in the FAB, so it is passed relative to the app and every machine reads its
    own copy; any other file is passed as an absolute path that must exist on every machine.
    """
    app_dir = existing(app / "pyproject.toml", "Flower app").parent
    config = existing(config_file, "run configuration")
    shipped = config.is_relative_to(app_dir) and config.suffix == ".toml"
    location = config.relative_to(app_dir) if shipped else config
    run_config = (
        f"config-file={toml_string(str(location), 'path')} "
        f"run-dir={toml_string(str(run_dir.resolve()), 'run folder')}"
    )
    argv = ["flwr", "run", str(app_dir), CONNECTION, "--run-config", run_config]
    return FlowerCommand([*argv, "--format", "json"], flower_env(flwr_home))


def tracked_app(app: Path, into: Path) -> Path:
    """A copy of the Flower app at ``into`` holding only the files git tracks that its
    ``fab-include`` selects, and its ``pyproject.toml``: ``flwr run`` bundles every file the
    patterns match, so untracked scratch files beside the code would ship to every machine."""
    from flwr.cli.build import get_filtered_fab_paths

    app_dir = existing(app / "pyproject.toml", "Flower app").parent
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
    tracked: dict[str, bytes | Path] = {
        name: app_dir / name
        for name in os.fsdecode(listed.stdout).split("\0")
        if name and (app_dir / name).is_file()
    }
    config = tomllib.loads((app_dir / "pyproject.toml").read_text(encoding="utf-8"))
    for name in [*get_filtered_fab_paths(tracked, config), "pyproject.toml"]:
        (into / name).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(app_dir / name, into / name)
    return into


def app_hash(app: Path) -> str:
    """SHA-256 of the app bundle (FAB) that ``deploy run`` submits from ``app``: Flower builds
    it deterministically (sorted files, fixed dates), so a platform holding the same code
    computes the same hash and can pin it."""
    from flwr.cli.build import build_fab_from_disk

    with tempfile.TemporaryDirectory(prefix="fedfuse-app-") as staged:
        fab = build_fab_from_disk(tracked_app(app, Path(staged)))
    return hashlib.sha256(fab).hexdigest()


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
