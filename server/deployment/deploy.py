"""``fedfuse deploy``: one SuperNode per platform, a SuperLink with TLS and node authentication.

Each subcommand prints the exact command (with the environment FedFuse adds) before it runs
it, so an operator can learn, copy or script them; ``--dry-run`` only prints. The daemons
(``superlink``, ``supernode``) replace this process (``exec``), so signals and exit codes are
the daemon's own. They run through FedFuse's launchers around Flower's: the SuperLink with one
listener per API (Control and Runtime on loopback unless asked), the SuperNode running only
the app bundles its platform pinned. Command lines live in :mod:`.commands`.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from common.errors import FedFuseError
from server.deployment.commands import (
    APP_DIR,
    CONNECTION,
    CONTROL_PORT,
    FLEET_PORT,
    LOOPBACK,
    RUNTIME_PORT,
    SUPERNODE_RUNTIME_PORT,
    FlowerCommand,
    SuperNodeSettings,
    app_hash,
    drop_partial_apps,
    flower_env,
    register_command,
    submit_command,
    superlink_command,
    supernode_command,
    tracked_app,
    write_connection,
)
from server.deployment.deploy_keys import check_name
from server.deployment.supernode_main import app_digest

log = logging.getLogger(__name__)

FLOWER_CALL_TIMEOUT = 120.0  # one flwr CLI call; its own retries end after about 30 s


def _announce(command: FlowerCommand) -> None:
    print(f"$ {command.show()}", flush=True)


def _exec(command: FlowerCommand, dry_run: bool) -> None:
    """Replace this process with the daemon (or only print it)."""
    _announce(command)
    if not dry_run:
        sys.stdout.flush()
        os.execvpe(command.argv[0], command.argv, command.environment())


def _call(
    command: FlowerCommand, capture: bool = False, timeout: float | None = FLOWER_CALL_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run a flwr CLI call; a SuperLink that never answers ends in one line, not a hang."""
    _announce(command)
    try:
        return subprocess.run(
            command.argv,
            env=command.environment(),
            capture_output=capture,
            text=True,
            check=False,
            timeout=timeout,
            umask=0o077,  # what the flwr CLI writes in its home stays the operator's
        )
    except subprocess.TimeoutExpired:
        raise FedFuseError(
            f"`{command.argv[0]} {command.argv[1]}` got no answer within {timeout:.0f} s: "
            "check that the SuperLink runs and --superlink names its Control API"
        ) from None


def _flwr_home(args: argparse.Namespace) -> Path:
    return Path(args.home).resolve() / "flwr-home"


def _passphrase(args: argparse.Namespace) -> bytes | None:
    if not args.ca_passphrase_file:
        return None
    path = Path(args.ca_passphrase_file)
    try:
        passphrase = path.read_bytes().rstrip(b"\r\n")
    except OSError as err:
        raise FedFuseError(f"{path}: cannot read the CA passphrase ({err.strerror})") from None
    if not passphrase:
        raise FedFuseError(f"{path}: the CA passphrase file is empty")
    return passphrase


def _ca_dir(args: argparse.Namespace, certs: Path) -> Path:
    return Path(args.ca_dir) if args.ca_dir else certs.with_name(f"{certs.name}-ca")


def _certs(args: argparse.Namespace) -> None:
    from server.deployment.deploy_keys import write_certificates

    certs = Path(args.out)
    if args.days >= args.ca_days:
        raise FedFuseError(f"--days {args.days}: the CA (--ca-days {args.ca_days}) must outlive it")
    ca_dir = _ca_dir(args, certs)
    passphrase = _passphrase(args)
    files = write_certificates(
        certs, ca_dir, args.host, args.days, args.ca_days, passphrase, args.force
    )
    print(f"CA certificate (give to every platform and to flwr): {files.ca_cert}")
    print(f"SuperLink certificate for {', '.join(args.host)}: {files.server_cert}")
    print(f"SuperLink key (0600, stays on the SuperLink host): {files.server_key}")
    print(f"CA key (0600; keep {files.ca_key.parent} offline, it signs renewals): {files.ca_key}")


def _renew(args: argparse.Namespace) -> None:
    from server.deployment.deploy_keys import renew_server_certificate

    certs = Path(args.certs)
    files = renew_server_certificate(
        certs, _ca_dir(args, certs), args.host, args.days, _passphrase(args)
    )
    print(f"new SuperLink certificate and key: {files.server_cert}, {files.server_key}")
    print("ca.crt is unchanged: restart the SuperLink only; the platforms change nothing")


def _keys(args: argparse.Namespace) -> None:
    from server.deployment.deploy_keys import write_node_keys

    keys = write_node_keys(Path(args.out), args.platform, args.force)
    print(f"private key (0600, never leaves the platform): {keys.private_key}")
    print(f"public key (send to the federation operator): {keys.public_key}")
    print("the federation operator registers it with:")
    print(
        f"  fedfuse deploy register --public-key {keys.public_key.name} --name {args.platform}"
        " --ca ca.crt"
    )


def _app_hash(args: argparse.Namespace) -> None:
    print(app_hash(Path(args.app)))


def _superlink(args: argparse.Namespace) -> None:
    from server.deployment.superlink_main import parse_address, private_tree

    parse_address(args.fleet_address, "--fleet-address")
    parse_address(args.control_address, "--control-address")
    home = Path(args.home)
    command = superlink_command(
        Path(args.certs),
        home / "superlink",
        args.fleet_address,
        args.control_address,
        args.runtime_port,
    )
    if not args.dry_run:
        private_tree(home)  # state.db, logs, installed apps: owner-only
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


def _supernode(args: argparse.Namespace) -> None:
    trusted = args.trust_app or [app_hash(Path(args.app))]
    node = SuperNodeSettings(
        platform=args.platform,
        data_dir=Path(args.data_dir),
        state_dir=Path(args.state_dir),
        key=Path(args.key),
        superlink=args.superlink,
        ca=Path(args.ca),
        runtime_port=args.runtime_port,
        trusted_apps=trusted,
        max_wait=args.max_wait,
        overrides=args.set,
    )
    command = supernode_command(node)
    if not args.dry_run:
        Path(args.state_dir).mkdir(mode=0o700, parents=True, exist_ok=True)
        for folder in drop_partial_apps(Path(args.state_dir) / "flwr-home"):
            log.info("removed a partly installed app (an interrupted start): %s", folder)
    _exec(command, args.dry_run)


def _online_nodes(env: dict[str, str]) -> int:
    command = FlowerCommand(["flwr", "supernode", "ls", CONNECTION, "--format", "json"], env)
    listed = _call(command, capture=True)
    try:
        reply = json.loads(listed.stdout)
        if not reply["success"]:
            raise FedFuseError(f"flwr supernode ls: {' '.join(reply['error-message'].split())}")
        return sum(node["status"] == "online" for node in reply["nodes"])
    except (json.JSONDecodeError, KeyError, TypeError):
        output = f"{listed.stdout}{listed.stderr}".strip()
        raise FedFuseError(f"flwr supernode ls failed: {output}") from None


def wait_for_nodes(env: dict[str, str], needed: int, timeout: float, poll: float = 3.0) -> int:
    """Until ``needed`` SuperNodes are online, or a one-line error after ``timeout`` seconds:
    Flower's ServerApp would wait for them without end and without a word."""
    deadline = time.monotonic() + timeout
    while (online := _online_nodes(env)) < needed:
        if time.monotonic() >= deadline:
            raise FedFuseError(
                f"{online} of the {needed} SuperNodes the run needs (federation.min_nodes) are "
                f"online after {timeout:.0f} s: start the platforms' `deploy supernode`, or "
                "lower federation.min_nodes; nothing was submitted"
            )
        print(f"waiting for SuperNodes: {online} of {needed} online", flush=True)
        time.sleep(poll)
    return online


def _run(args: argparse.Namespace) -> None:
    """Wait for the nodes, submit, stream the run's log, then fail unless Flower reports it
    completed (``flwr run --stream`` exits 0 even when the ServerApp failed)."""
    from common.config import load_config

    home = _flwr_home(args)
    run_dir = Path(args.runs) / check_name(args.name, "run name")
    if args.dry_run:
        _announce(submit_command(home, Path(args.app), Path(args.config), run_dir))
        return
    needed = load_config(Path(args.config)).federation.min_nodes
    write_connection(home, args.superlink, Path(args.ca))
    env = flower_env(home)
    wait_for_nodes(env, needed, args.wait_nodes)
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
    _call(FlowerCommand(["flwr", "log", str(run_id), CONNECTION, "--stream"], env), timeout=None)
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


def _add_superlink_options(parser: argparse.ArgumentParser, port: int, api: str) -> None:
    parser.add_argument(
        "--superlink",
        default=f"{LOOPBACK}:{port}",
        help=f"the SuperLink's {api} API as HOST:PORT (a host named in its certificate)",
    )
    parser.add_argument("--ca", required=True, help="the federation's CA certificate (PEM)")
    parser.add_argument("--dry-run", action="store_true", help="print the command only")


def _add_home(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--home",
        default="deploy",
        help="the federation operator's folder (SuperLink state, flwr CLI settings; 0700)",
    )


def _add_ca_options(parser: argparse.ArgumentParser, days: int) -> None:
    parser.add_argument("--ca-dir", help="the CA's own folder (default: CERTS-ca beside it)")
    parser.add_argument(
        "--ca-passphrase-file", help="a file holding the passphrase that encrypts the CA key"
    )
    parser.add_argument("--days", type=int, default=days, help="server certificate validity")


def add_deploy_parser(commands: argparse._SubParsersAction) -> None:
    """``fedfuse deploy ...`` subcommands (registered by server/cli.py)."""
    deploy = commands.add_parser(
        "deploy", help="deploy the federation: TLS SuperLink, one SuperNode per platform"
    ).add_subparsers(dest="action", required=True)

    certs = deploy.add_parser("certs", help="a CA (own folder) and the SuperLink's certificate")
    certs.add_argument("--out", required=True, help="SuperLink folder: ca.crt, server.crt/.key")
    certs.add_argument(
        "--host",
        action="append",
        required=True,
        help="DNS name or IP the SuperNodes dial (repeatable; all go into the certificate)",
    )
    _add_ca_options(certs, 365)
    certs.add_argument("--ca-days", type=int, default=3650, help="CA validity (> --days)")
    certs.add_argument("--force", action="store_true", help="replace existing keys")
    certs.set_defaults(run=_certs)

    renew = deploy.add_parser("renew", help="a new SuperLink certificate from the same CA")
    renew.add_argument("--certs", required=True, help="the SuperLink folder of `deploy certs`")
    renew.add_argument("--host", action="append", help="names (default: the current ones)")
    _add_ca_options(renew, 365)
    renew.set_defaults(run=_renew)

    keys = deploy.add_parser("keys", help="a platform's SuperNode authentication key pair")
    keys.add_argument("--platform", required=True, help="platform name (file names)")
    keys.add_argument("--out", required=True, help="folder for PLATFORM.key and PLATFORM.pub")
    keys.add_argument("--force", action="store_true", help="replace an existing key")
    keys.set_defaults(run=_keys)

    app = deploy.add_parser("app-hash", help="SHA-256 of the app bundle `deploy run` submits")
    app.add_argument("--app", default=str(APP_DIR), help="the FedFuse app folder (pyproject)")
    app.set_defaults(run=_app_hash)

    superlink = deploy.add_parser("superlink", help="start the SuperLink (runs in foreground)")
    superlink.add_argument("--certs", required=True, help="folder written by `deploy certs`")
    superlink.add_argument(
        "--fleet-address",
        default=f"{LOOPBACK}:{FLEET_PORT}",
        help="IP:PORT the platforms' SuperNodes dial; e.g. 0.0.0.0:9093 to open it to them",
    )
    superlink.add_argument(
        "--control-address",
        default=f"{LOOPBACK}:{CONTROL_PORT}",
        help="IP:PORT of the Control API (unauthenticated: keep it on loopback or an "
        "operator-only interface)",
    )
    superlink.add_argument(
        "--runtime-port",
        type=int,
        default=RUNTIME_PORT,
        help="loopback port of the ServerApp (Runtime) API",
    )
    superlink.add_argument("--dry-run", action="store_true", help="print the command only")
    _add_home(superlink)
    superlink.set_defaults(run=_superlink)

    register = deploy.add_parser("register", help="allow a platform's public key to connect")
    register.add_argument("--public-key", required=True, help="PLATFORM.pub from `deploy keys`")
    register.add_argument("--name", help="a readable name for the SuperNode (e.g. the platform)")
    _add_superlink_options(register, CONTROL_PORT, "Control")
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
    supernode.add_argument(
        "--trust-app",
        type=app_digest,
        action="append",
        metavar="SHA256",
        help="an app bundle this platform runs (repeatable; default: the bundle of --app)",
    )
    supernode.add_argument(
        "--app", default=str(APP_DIR), help="the FedFuse folder whose bundle is trusted"
    )
    supernode.add_argument(
        "--max-wait",
        type=float,
        default=600.0,
        metavar="SECONDS",
        help="give up after this long without reaching the SuperLink (Flower's exit code)",
    )
    _add_superlink_options(supernode, FLEET_PORT, "Fleet")
    supernode.set_defaults(run=_supernode)

    run = deploy.add_parser("run", help="start a run on the deployed federation and follow it")
    run.add_argument("--config", required=True, help="run configuration TOML")
    run.add_argument("--name", required=True, help="run folder name")
    run.add_argument("--runs", default="runs", help="folder of run folders (on the SuperLink)")
    run.add_argument("--app", default=str(APP_DIR), help="the FedFuse app folder (pyproject)")
    run.add_argument(
        "--wait-nodes",
        type=float,
        default=300.0,
        metavar="SECONDS",
        help="how long to wait for federation.min_nodes SuperNodes before submitting",
    )
    _add_superlink_options(run, CONTROL_PORT, "Control")
    _add_home(run)
    run.set_defaults(run=_run)
