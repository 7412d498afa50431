"""A federation only its operator controls (issue 34) and a `deploy run` that never hangs and
stops on a signal (issue 35), with a real SuperLink on 127.0.0.1 started by `fedfuse deploy`.

The outsider holds only the public ``ca.crt`` and reaches only what a deployment exposes, the
Fleet port; the Control and Runtime APIs listen on loopback by default. Every process started
here is stopped by the fixture's finalizer.
"""

from __future__ import annotations

import datetime
import hashlib
import http.client
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization

from common.errors import FedFuseError
from common.processes import stop_processes
from server.deployment.commands import APP_DIR, superlink_command, tracked_app
from server.deployment.deploy_keys import (
    renew_server_certificate,
    write_certificates,
    write_node_keys,
)
from server.deployment.superlink_main import private_tree

FEDFUSE = [sys.executable, "-m", "server.cli", "deploy"]


# ---- keys, files and command lines (fast) -----------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def _mode(path: Path) -> int:
    return path.stat().st_mode & 0o777


def test_the_ca_key_lives_apart_encrypted_and_outlives_the_server_certificate(
    tmp_path: Path,
) -> None:
    """The CA key was written unencrypted beside server.key, with the leaf's validity."""
    files = write_certificates(
        tmp_path / "certs", tmp_path / "ca", ["link.example.org"], 30, 3650, b"secret"
    )
    assert files.ca_key.parent == tmp_path / "ca"
    assert sorted(p.name for p in (tmp_path / "certs").iterdir()) == [
        "ca.crt",
        "server.crt",
        "server.key",
    ]
    assert _mode(tmp_path / "certs") == _mode(tmp_path / "ca") == 0o700
    assert _mode(files.ca_key) == _mode(files.server_key) == 0o600
    with pytest.raises(TypeError, match="encrypted"):
        serialization.load_pem_private_key(files.ca_key.read_bytes(), None)
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    assert ca.not_valid_after_utc - server.not_valid_after_utc > datetime.timedelta(days=3000)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert "localhost" in names.get_values_for_type(x509.DNSName)  # the loopback Control API
    with pytest.raises(FedFuseError, match="outlive the CA"):
        write_certificates(tmp_path / "c2", tmp_path / "ca2", ["h"], 400, 365)


def test_renewal_replaces_only_the_server_certificate(tmp_path: Path) -> None:
    """A renewal meant a new CA (one validity for both) and a new ca.crt on every platform."""
    certs, ca_dir = tmp_path / "certs", tmp_path / "ca"
    files = write_certificates(certs, ca_dir, ["link.example.org", "203.0.113.7"], 30, 3650, b"pw")
    ca_before, key_before = files.ca_cert.read_bytes(), files.server_key.read_bytes()
    renew_server_certificate(certs, ca_dir, None, 60, b"pw")
    assert files.ca_cert.read_bytes() == ca_before
    assert files.server_key.read_bytes() != key_before
    ca = x509.load_pem_x509_certificate(ca_before)
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert names.get_values_for_type(x509.DNSName) == ["link.example.org", "localhost"]
    remaining = server.not_valid_after_utc - datetime.datetime.now(datetime.UTC)
    assert datetime.timedelta(days=59) < remaining <= datetime.timedelta(days=60)
    with pytest.raises(FedFuseError, match="cannot read the CA key"):
        renew_server_certificate(certs, ca_dir, None, 60, b"wrong")
    with pytest.raises(FedFuseError, match="outlive the CA"):
        renew_server_certificate(certs, ca_dir, None, 4000, b"pw")


def test_the_superlink_binds_control_and_runtime_to_loopback_by_default(tmp_path: Path) -> None:
    """`deploy superlink` bound 0.0.0.0 by default, every API on one port."""
    write_certificates(tmp_path / "certs", tmp_path / "ca", ["127.0.0.1"])
    done = subprocess.run(
        [*FEDFUSE, "superlink", "--certs", str(tmp_path / "certs"), "--dry-run"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    argv = done.stdout.split()
    options = dict(zip(argv, argv[1:], strict=False))
    assert options["--fleet-address"] == "127.0.0.1:9093"
    assert options["--control-address"] == "127.0.0.1:9095"
    assert options["--host"] == "127.0.0.1"  # Flower's own listener: the Runtime API
    assert "0.0.0.0" not in done.stdout
    (tmp_path / "certs" / "ca.key").write_bytes((tmp_path / "ca" / "ca.key").read_bytes())
    with pytest.raises(FedFuseError, match="CA key must not sit beside"):
        superlink_command(tmp_path / "certs", tmp_path / "s", "127.0.0.1:1", "127.0.0.1:2", 3)


def test_a_flwr_call_that_never_answers_ends_in_one_line() -> None:
    """A SuperLink that accepts and never answers must not keep `deploy` waiting forever."""
    from server.deployment.commands import FlowerCommand
    from server.deployment.deploy import _call

    started = time.monotonic()
    with pytest.raises(FedFuseError, match="no answer within 1 s: check that the SuperLink"):
        _call(FlowerCommand(["sleep", "30"]), capture=True, timeout=1)
    assert time.monotonic() - started < 10


def test_state_and_logs_left_open_by_an_earlier_start_become_owner_only(tmp_path: Path) -> None:
    """The SuperLink home was 0755 and state.db and the logs 0644."""
    home = tmp_path / "deploy"
    (home / "superlink" / "flwr-home").mkdir(parents=True)
    for name in ("superlink/state.db", "superlink/superlink.log", "flwr-home/config.toml"):
        (home / name).parent.mkdir(parents=True, exist_ok=True)
        (home / name).write_text("x")
        (home / name).chmod(0o644)
    home.chmod(0o755)
    private_tree(home)
    assert {_mode(p) for p in [home, *home.rglob("*")] if p.is_dir()} == {0o700}
    assert {_mode(p) for p in home.rglob("*") if p.is_file()} == {0o600}


def _pull_once(trusted: set[str], fab_content: bytes) -> tuple[object, list]:
    """Flower's own message pull on a SuperNode, wrapped by the pin, for one train message of
    run 42 whose app bundle is ``fab_content``; returns the stored run and the replies."""
    from flwr.app import Message, Metadata, RecordDict
    from flwr.supercore.fab import Fab
    from flwr.supercore.inflatable.inflatable_object import get_object_tree
    from flwr.supercore.object_store import ObjectStoreFactory
    from flwr.supercore.run import Run, RunStatus
    from flwr.supernode import start_client_internal
    from flwr.supernode.nodestate import NodeStateFactory

    from server.deployment.supernode_main import pinned

    objects = ObjectStoreFactory()
    state, store = NodeStateFactory(objectstore_factory=objects).state(), objects.store()
    state.set_node_id(7)
    metadata = Metadata(42, "", 1, 7, "", "1", time.time(), 3600.0, "train")
    message = Message(RecordDict(), metadata=metadata)
    message.metadata.__dict__["_message_id"] = message.object_id
    fab = Fab(hashlib.sha256(fab_content).hexdigest(), fab_content, {})
    running = RunStatus("running", "", "")
    run = Run(42, "a", "1", fab.hash_str, {}, "", "", "", "", running, "", "", None, 0, 0, 0.0)
    pinned(start_client_internal._pull_and_store_message, frozenset(trusted))(
        state=state,
        object_store=store,
        node_config={},
        receive=lambda: (message, get_object_tree(message)),
        get_run=lambda run_id: run,
        get_fab=lambda fab_hash, run_id: fab,
        pull_object=lambda run_id, object_id: b"",
        confirm_message_received=lambda run_id, message_id: None,
        trusted_entities=None,
    )
    return state.get_run(42), state.get_messages_legacy(is_reply=True)


def test_a_supernode_runs_only_the_app_bundle_its_platform_pinned(tmp_path: Path) -> None:
    """No trusted entities were set: every SuperNode installed and ran any app it was sent."""
    from flwr.cli.build import build_fab_from_disk
    from flwr.common.constant import ErrorCode

    ours = build_fab_from_disk(tracked_app(APP_DIR, tmp_path / "app"))
    stored, replies = _pull_once({hashlib.sha256(ours).hexdigest()}, ours)
    assert stored is not None and replies == []  # the pinned bundle goes on to run
    foreign = ours + b"\0"
    stored, [reply] = _pull_once({hashlib.sha256(ours).hexdigest()}, foreign)
    assert stored is None  # never stored, so no ClientApp can load it
    assert reply.error.code == ErrorCode.INVALID_FAB and "not pinned" in reply.error.reason


# ---- a SuperLink on 127.0.0.1, as `fedfuse deploy superlink` starts it --------------------


@dataclass(frozen=True)
class Link:
    root: Path
    ca: Path
    fleet: int
    control: int
    runtime: int
    process: subprocess.Popen
    config: Path

    def deploy(self, *args: str, home: str = "operator") -> list[str]:
        return [*FEDFUSE, *args, "--ca", str(self.ca), "--home", str(self.root / home)]

    def run_command(self) -> list[str]:
        """The operator's `deploy run` on the loopback Control API."""
        control = f"127.0.0.1:{self.control}"
        return self.deploy(
            "run", "--config", str(self.config), "--name", "r", "--superlink", control
        )


def _https(port: int, path: str, ca: Path, **context: object) -> int:
    tls = ssl.create_default_context(cafile=str(ca))
    for name, value in context.items():
        setattr(tls, name, value)
    connection = http.client.HTTPSConnection("127.0.0.1", port, context=tls, timeout=10)
    try:
        connection.request("POST", path, body=b"", headers={"content-type": "application/json"})
        return connection.getresponse().status
    finally:
        connection.close()


def _ours(process: subprocess.Popen) -> list[psutil.Process]:
    try:
        root = psutil.Process(process.pid)
        return [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return []


def _session(process: psutil.Process) -> int | None:
    try:
        return os.getsid(process.pid)
    except (ProcessLookupError, PermissionError):
        return None


@pytest.mark.slow
def test_a_supernode_that_cannot_reach_the_superlink_ends_in_one_line(
    tmp_path: Path, synthetic_dir: Path
) -> None:
    """Flower gives up after --max-wait with a multi-line exit message and exit 1; the
    launcher ends with one line saying what to check, exit 2, and leaves no process behind."""
    files = write_certificates(tmp_path / "certs", tmp_path / "ca", ["127.0.0.1"])
    write_node_keys(tmp_path / "keys", "p0")
    err = (tmp_path / "p0.err").open("w")
    node = subprocess.Popen(
        [*FEDFUSE, "supernode", "--platform", "p0", "--data-dir", str(synthetic_dir / "p0")]
        + ["--state-dir", str(tmp_path / "state"), "--key", str(tmp_path / "keys" / "p0.key")]
        + ["--superlink", f"127.0.0.1:{_free_port()}", "--ca", str(files.ca_cert)]
        + ["--runtime-port", str(_free_port()), "--max-wait", "2"],
        stdout=subprocess.DEVNULL,
        stderr=err,
        start_new_session=True,
    )
    err.close()
    try:
        node.wait(timeout=120)
        left = [p for p in psutil.process_iter() if _session(p) == node.pid]
    finally:
        stop_processes(lambda: [p for p in psutil.process_iter() if _session(p) == node.pid])
    stderr = (tmp_path / "p0.err").read_text()
    assert node.returncode == 2, stderr
    assert not left  # Flower's SuperExec stopped with it
    last = stderr.strip().splitlines()[-1]
    assert last.startswith("fedfuse: error: the SuperNode stopped: Failed to initialize")
    assert "(Flower exit code 305)" in last and "--fleet-address" in last
    assert "Exit Code" not in stderr and "For more information" not in stderr


@pytest.fixture(scope="module")
def link(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Link]:
    root = tmp_path_factory.mktemp("link")
    files = write_certificates(root / "certs", root / "ca", ["127.0.0.1"])
    write_node_keys(root / "keys", "p0")
    fleet, control, runtime = _free_port(), _free_port(), _free_port()
    config = root / "run.toml"
    config.write_text("[federation]\nmin_nodes = 2\n", encoding="utf-8")
    log = (root / "superlink.out").open("w")
    process = subprocess.Popen(
        [*FEDFUSE, "superlink", "--certs", str(root / "certs"), "--home", str(root / "operator")]
        + ["--fleet-address", f"127.0.0.1:{fleet}", "--control-address", f"127.0.0.1:{control}"]
        + ["--runtime-port", str(runtime)],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if _https(fleet, "/health", files.ca_cert) == 405:  # GET-only: it answers
                    break
            except OSError:
                pass
            assert process.poll() is None, (root / "superlink.out").read_text()
            assert time.monotonic() < deadline, (root / "superlink.out").read_text()
            time.sleep(0.3)
        link = Link(root, files.ca_cert, fleet, control, runtime, process, config)
        pub = str(root / "keys" / "p0.pub")
        register = link.deploy(
            "register", "--public-key", pub, "--superlink", f"127.0.0.1:{control}"
        )
        assert subprocess.run(register, capture_output=True, timeout=120).returncode == 0
        yield link
    finally:
        stop_processes(lambda: _ours(process))
        process.wait(timeout=10)


def _operator_lists(link: Link, what: list[str]) -> dict:
    env = dict(os.environ, FLWR_HOME=str(link.root / "operator" / "flwr-home"))
    done = subprocess.run(
        [str(Path(sys.executable).parent / "flwr"), *what, "fedfuse", "--format", "json"],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    return dict(json.loads(done.stdout))


@pytest.mark.tls
def test_an_outsider_with_only_ca_crt_can_neither_register_nor_start_a_run(link: Link) -> None:
    """Flower's Control API shares the Fleet port and authenticates nobody: a caller holding
    only ca.crt registered its own SuperNode key, listed nodes and runs, and could start any
    app. Now the Fleet port answers the Fleet API only, which admits registered keys only."""
    keys = tempfile.mkdtemp(dir=link.root)
    write_node_keys(Path(keys), "outsider")
    fleet = f"127.0.0.1:{link.fleet}"
    register = link.deploy(
        "register", "--public-key", f"{keys}/outsider.pub", "--superlink", fleet, home="outsider"
    )
    refused = subprocess.run(register, capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2 and "Not Found" in refused.stdout + refused.stderr
    for path in (
        "/v1/control/register-node",
        "/v1/control/start-run",
        "/v1/control/list-nodes",
        "/v1/runtime/create-task",
        "/v1/fleet/../control/list-nodes",
        "/docs",
        "/openapi.json",
    ):
        assert _https(link.fleet, path, link.ca) == 404, path
    for port in (link.control, link.runtime):  # Swagger and OpenAPI are off everywhere
        assert _https(port, "/docs", link.ca) == _https(port, "/openapi.json", link.ca) == 404
    # Fleet self-registration is off with node authentication: an unsigned request is refused
    assert _https(link.fleet, "/v1/fleet/register-node", link.ca) >= 400
    run = link.deploy(
        "run", "--config", str(link.config), "--name", "r", "--superlink", fleet, home="outsider"
    )
    run += ["--wait-nodes", "0"]
    started = subprocess.run(run, capture_output=True, text=True, timeout=120)
    assert started.returncode == 2 and "Not Found" in started.stderr
    # the operator, on the loopback Control API, sees only the node it registered, no run
    assert len(_operator_lists(link, ["supernode", "ls"])["nodes"]) == 1
    assert _operator_lists(link, ["ls"])["runs"] == []
    listening = {
        c.laddr.port: c.laddr.ip
        for p in _ours(link.process)
        for c in p.net_connections("tcp")
        if c.status == psutil.CONN_LISTEN
    }
    assert listening[link.control] == listening[link.runtime] == "127.0.0.1"


@pytest.mark.tls
def test_tls_offers_only_aead_suites(link: Link) -> None:
    """TLS 1.2 accepted a CBC suite."""
    assert _https(link.fleet, "/health", link.ca) == 405
    cbc = ssl.create_default_context(cafile=str(link.ca))
    cbc.maximum_version = ssl.TLSVersion.TLSv1_2
    cbc.set_ciphers("ECDHE-ECDSA-AES128-SHA:ECDHE-ECDSA-AES256-SHA384")
    with pytest.raises(ssl.SSLError):
        connection = http.client.HTTPSConnection("127.0.0.1", link.fleet, context=cbc, timeout=10)
        connection.request("GET", "/health")
    gcm = {"maximum_version": ssl.TLSVersion.TLSv1_2}
    assert _https(link.fleet, "/health", link.ca, **gcm) == 405


@pytest.mark.tls
def test_superlink_state_and_logs_are_owner_only(link: Link) -> None:
    """The SuperLink home was 0755, state.db and the logs 0644."""
    home = link.root / "operator"
    assert (home / "superlink" / "state.db").is_file()
    assert {_mode(p) for p in [home, *home.rglob("*")] if p.is_dir()} == {0o700}
    assert {_mode(p) & 0o077 for p in home.rglob("*") if p.is_file()} == {0}


@pytest.mark.tls
def test_deploy_run_waits_for_the_nodes_a_bounded_time(link: Link) -> None:
    """`deploy run` with fewer SuperNodes than federation.min_nodes waited forever."""
    done = subprocess.run(
        [*link.run_command(), "--wait-nodes", "1"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 2, done.stderr
    [line] = done.stderr.strip().splitlines()
    assert "0 of the 2 SuperNodes" in line and "nothing was submitted" in line
    assert _operator_lists(link, ["ls"])["runs"] == []


@pytest.mark.tls
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_deploy_run_stops_on_a_signal_in_one_line(link: Link, signum: int) -> None:
    """Ctrl-C or SIGTERM on `deploy run`: one line, rc 130/143, its flwr calls stopped."""
    process = subprocess.Popen(
        [*link.run_command(), "--wait-nodes", "600"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert process.stdout is not None
        deadline = time.monotonic() + 60
        while "waiting for SuperNodes" not in process.stdout.readline():
            assert time.monotonic() < deadline and process.poll() is None
        assert "supernode ls" in process.stdout.readline()  # the next poll: a flwr call
        while not (children := _ours(process)[1:]):  # signalled while its child runs
            assert time.monotonic() < deadline and process.poll() is None
            time.sleep(0.05)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 128 + signum, stderr
    [line] = stderr.strip().splitlines()
    assert line.startswith(f"fedfuse: stopped by {signal.Signals(signum).name}")
    _, alive = psutil.wait_procs(children, timeout=10)
    assert not alive


@pytest.mark.tls
def test_a_real_supernode_refuses_a_run_of_an_app_it_did_not_pin(
    link: Link, write_run_config, synthetic_dir: Path, tmp_path: Path
) -> None:
    """Whoever started a run, every SuperNode installed and ran its app beside the data. A
    SuperNode that pinned another bundle answers INVALID_FAB and never starts a ClientApp."""
    config = write_run_config(
        tmp_path / "run.toml",
        data={"path": None},
        federation={"min_nodes": 1, "rounds": 1, "fraction_evaluate": 0.0},
    )
    state = tmp_path / "state"
    log = (tmp_path / "p0.log").open("w")
    node = subprocess.Popen(
        [*FEDFUSE, "supernode", "--platform", "p0", "--data-dir", str(synthetic_dir / "p0")]
        + ["--state-dir", str(state), "--key", str(link.root / "keys" / "p0.key")]
        + ["--superlink", f"127.0.0.1:{link.fleet}", "--ca", str(link.ca)]
        + ["--runtime-port", str(_free_port()), "--trust-app", "0" * 64],
        stdout=log,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    log.close()
    control = f"127.0.0.1:{link.control}"
    run = link.deploy("run", "--config", str(config), "--name", "foreign", "--superlink", control)
    submitted = subprocess.Popen([*run, "--runs", str(tmp_path / "runs")], start_new_session=True)
    try:
        deadline = time.monotonic() + 180
        while "not pinned here" not in (tmp_path / "p0.log").read_text():
            assert time.monotonic() < deadline and node.poll() is None, (
                tmp_path / "p0.log"
            ).read_text()[-2000:]
            time.sleep(0.5)
        [foreign] = _operator_lists(link, ["ls"])["runs"]
        env = dict(os.environ, FLWR_HOME=str(link.root / "operator" / "flwr-home"))
        flwr = str(Path(sys.executable).parent / "flwr")
        subprocess.run([flwr, "stop", str(foreign["run-id"]), "fedfuse"], env=env, timeout=120)
    finally:
        for process in (submitted, node):
            stop_processes(lambda process=process: _ours(process))
            process.wait(timeout=10)
    node_log = (tmp_path / "p0.log").read_text()
    assert "Start `flwr-clientapp`" not in node_log  # none of the bundle's code ran
    assert not list((state / "flwr-home" / "apps").glob("*"))  # nor was it installed
