"""Deployment with real processes on 127.0.0.1: a TLS SuperLink that admits only registered
SuperNodes, one SuperNode per platform, ``flwr run`` — all started through ``fedfuse deploy``.

The integration scenario: two rounds over TLS; an unregistered SuperNode is refused; one
platform's SuperNode is stopped while it trains in round 1, the round goes on without it (the
failure is in metrics.jsonl and in the server log), and it rejoins for round 2. Every process
is stopped by the fixtures' finalizers, whatever happens.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

from client.ledger import LEDGER_FILE
from common.errors import FedFuseError
from common.processes import stop_processes
from server.deployment.commands import drop_partial_apps, node_config, superlink_command
from server.deployment.deploy_keys import write_certificates, write_node_keys

PLATFORMS = ("p0", "p1", "p2")
VICTIM = "p2"  # stopped during round 1, restarted for round 2
NODE_UNAVAILABLE = 5  # flwr ErrorCode: the SuperLink answers for a node that went away
FEDFUSE = [sys.executable, "-m", "server.cli", "deploy"]


# ---- key material and command lines (fast) ----------------------------------------------


def test_certificates_chain_to_the_ca_and_keys_are_private(tmp_path: Path) -> None:
    files = write_certificates(
        tmp_path / "certs", tmp_path / "ca", ["127.0.0.1", "link.example.org"]
    )
    ca = x509.load_pem_x509_certificate(files.ca_cert.read_bytes())
    server = x509.load_pem_x509_certificate(files.server_cert.read_bytes())
    server.verify_directly_issued_by(ca)
    names = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert [str(ip) for ip in names.get_values_for_type(x509.IPAddress)] == ["127.0.0.1"]
    assert names.get_values_for_type(x509.DNSName) == ["link.example.org", "localhost"]
    for key in (files.ca_key, files.server_key):
        assert key.stat().st_mode & 0o777 == 0o600
    assert files.server_cert.stat().st_mode & 0o777 == 0o644
    with pytest.raises(FedFuseError, match="exists"):
        write_certificates(tmp_path / "certs", tmp_path / "ca", ["127.0.0.1"])
    assert not list(tmp_path.glob("*/.*"))  # no temporary file left behind


def test_node_keys_are_what_flower_loads(tmp_path: Path) -> None:
    keys = write_node_keys(tmp_path / "keys", "drama_romance")
    private = load_ssh_private_key(keys.private_key.read_bytes(), None)
    public = load_ssh_public_key(keys.public_key.read_bytes())
    assert isinstance(private, ec.EllipticCurvePrivateKey) and private.curve.name == "secp384r1"
    assert private.public_key().public_numbers() == public.public_numbers()  # type: ignore[union-attr]
    assert keys.private_key.stat().st_mode & 0o777 == 0o600
    assert keys.private_key.parent.stat().st_mode & 0o777 == 0o700  # was 0755
    with pytest.raises(FedFuseError, match="exists"):
        write_node_keys(tmp_path / "keys", "drama_romance")
    with pytest.raises(FedFuseError, match="platform name"):
        write_node_keys(tmp_path, "../escape")


def test_commands_use_absolute_paths_and_refuse_unsafe_values(tmp_path: Path) -> None:
    write_certificates(tmp_path / "certs", tmp_path / "ca", ["127.0.0.1"])
    command = superlink_command(
        tmp_path / "certs", tmp_path / "state", "127.0.0.1:9093", "127.0.0.1:9095", 9091
    )
    assert "--enable-supernode-auth" in command.argv
    assert "--disable-runtime-dependency-installation" in command.argv
    assert command.env["FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION"] == "1"
    assert "--insecure" not in command.argv
    paths = [arg for arg in command.argv if "/" in arg]
    assert paths and all(Path(p).is_absolute() for p in paths)
    config = node_config("p0", tmp_path / "d", tmp_path / "s", ["dp.target_epsilon=2.0"])
    assert config == f'platform="p0" data-dir="{tmp_path}/d" state-dir="{tmp_path}/s" ' + (
        "dp.target_epsilon=2.0"
    )
    for bad in ("federation.rounds=9", "dp.no_such_key=1", "dp.target_epsilon=four"):
        with pytest.raises(FedFuseError, match="dp.KEY=VALUE|TOML"):
            node_config("p0", tmp_path, tmp_path, [bad])
    with pytest.raises(FedFuseError, match="quotes"):
        node_config("p0", tmp_path / 'a"b', tmp_path, [])


def test_a_partly_installed_app_is_removed_before_a_supernode_starts(tmp_path: Path) -> None:
    """A SuperNode stopped while its ClientApp unpacked the app left a folder without
    pyproject.toml; Flower never reinstalled it and every later round failed to load."""
    apps = tmp_path / "flwr-home" / "apps"
    (apps / "fedfuse.fedfuse.0.1.0.partial" / "server").mkdir(parents=True)
    (apps / "fedfuse.fedfuse.0.1.0.whole").mkdir(parents=True)
    (apps / "fedfuse.fedfuse.0.1.0.whole" / "pyproject.toml").write_text("[project]\n")
    assert drop_partial_apps(tmp_path / "flwr-home") == [apps / "fedfuse.fedfuse.0.1.0.partial"]
    assert [p.name for p in apps.iterdir()] == ["fedfuse.fedfuse.0.1.0.whole"]
    assert drop_partial_apps(tmp_path / "missing") == []


# ---- the deployed federation (real processes) -------------------------------------------


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@dataclass
class Processes:
    """Every process this module starts, and how to stop them all (children included)."""

    logs: Path
    # in our processes' command lines (a folder ends with "/", an address with " ")
    markers: list[str] = field(default_factory=list)
    started: dict[str, subprocess.Popen] = field(default_factory=dict)

    def start(self, name: str, args: list[str]) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("w", encoding="utf-8")
        process = subprocess.Popen(
            args, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
        )
        log.close()
        self.started[name] = process
        return process

    def log(self, name: str) -> str:
        return (self.logs / f"{name}.log").read_text(encoding="utf-8", errors="replace")

    def ours(self) -> list[psutil.Process]:
        """Started here, their descendants (Flower detaches some), and any process whose
        command line names this test's folder or ports (orphans of a stopped SuperNode)."""
        found: dict[int, psutil.Process] = {}
        for process in self.started.values():
            try:
                root = psutil.Process(process.pid)
                found |= {p.pid: p for p in [root, *root.children(recursive=True)]}
            except psutil.NoSuchProcess:
                pass
        for process in psutil.process_iter(["cmdline"]):
            cmdline = " ".join(process.info["cmdline"] or []) + " "
            if any(marker in cmdline for marker in self.markers):
                found[process.pid] = process
        found.pop(os.getpid(), None)
        return list(found.values())

    def stop_all(self) -> None:
        stop_processes(self.ours)
        for process in self.started.values():
            process.wait(timeout=10)
        assert not self.ours(), "processes survived the cleanup"

    def wait_for(self, condition: Callable[[], bool], timeout: float, what: str) -> None:
        deadline = time.monotonic() + timeout
        while not condition():
            if time.monotonic() > deadline:
                tails = {name: self.log(name)[-1500:] for name in self.started}
                raise AssertionError(f"timed out waiting for {what}; logs: {tails}")
            time.sleep(0.2)


@dataclass(frozen=True)
class Federation:
    root: Path
    address: str  # the Fleet API, which SuperNodes dial
    control: str  # the Control API, for the operator's flwr CLI
    ca: Path
    config: Path
    data: Path
    processes: Processes

    def supernode(self, platform: str, port: int, key: str | None = None) -> list[str]:
        return [
            *FEDFUSE,
            "supernode",
            "--platform",
            platform,
            "--data-dir",
            str(self.data / (platform if platform in PLATFORMS else PLATFORMS[0])),
            "--state-dir",
            str(self.root / "platforms" / platform),
            "--key",
            str(self.root / "keys" / f"{key or platform}.key"),
            "--superlink",
            self.address,
            "--ca",
            str(self.ca),
            "--runtime-port",
            str(port),
        ]


def _healthy(address: str, ca: Path) -> bool:
    context = ssl.create_default_context(cafile=str(ca))
    try:
        with urllib.request.urlopen(f"https://{address}/health", context=context, timeout=1):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def federation(tmp_path_factory: pytest.TempPathFactory, write_run_config) -> Iterator[Federation]:
    """A running SuperLink (TLS, node auth) with the platforms' public keys registered."""
    from common.platform_writer import write_dataset
    from common.synthetic import SyntheticConfig, generate

    root = tmp_path_factory.mktemp("deployment")
    data = write_dataset(
        root / "data", generate(SyntheticConfig(platforms=3, users=12, items=30, seed=3))
    )
    config = write_run_config(
        root / "run.toml",
        data={"path": None},  # each SuperNode names its own data folder
        dp={"epsilon_budget": 8.0},
        federation={"min_nodes": 3, "fraction_evaluate": 0.0},
    )
    tls = write_certificates(root / "certs", root / "ca", ["127.0.0.1", "localhost"])
    for name in (*PLATFORMS, "intruder"):
        write_node_keys(root / "keys", name)
    port = _free_port()
    address = f"127.0.0.1:{port}"
    control = f"127.0.0.1:{_free_port()}"
    logs = root / "logs"
    logs.mkdir()
    processes = Processes(logs, markers=[f"{root}/", f"{address} "])
    home = ["--home", str(root / "operator")]
    try:
        processes.start(
            "superlink",
            [*FEDFUSE, "superlink", "--certs", str(root / "certs"), "--fleet-address", address]
            + ["--control-address", control, "--runtime-port", str(_free_port()), *home],
        )
        processes.wait_for(lambda: _healthy(address, tls.ca_cert), 60, "the SuperLink")
        register = [
            processes.start(
                f"register-{name}",
                [*FEDFUSE, "register", "--public-key", str(root / "keys" / f"{name}.pub")]
                + ["--name", name, "--superlink", control, "--ca", str(tls.ca_cert), *home],
            )
            for name in PLATFORMS
        ]
        assert [p.wait(timeout=60) for p in register] == [0] * len(PLATFORMS)
        yield Federation(root, address, control, tls.ca_cert, config, data, processes)
    finally:
        processes.stop_all()


@pytest.mark.tls
def test_an_unregistered_supernode_is_refused(federation: Federation) -> None:
    # The intruder has a valid key pair and trusts the CA, but its key was never registered.
    intruder = federation.processes.start(
        "intruder",
        federation.supernode("intruder", _free_port(), key="intruder"),
    )
    assert intruder.wait(timeout=60) != 0
    assert "Failed to activate SuperNode" in federation.processes.log("intruder")


@pytest.mark.tls
def test_two_rounds_over_tls_survive_a_supernode_stopped_mid_round(
    federation: Federation,
) -> None:
    processes = federation.processes
    ports = {name: _free_port() for name in PLATFORMS}
    processes.markers += [f"127.0.0.1:{port} " for port in ports.values()]
    nodes = {
        name: processes.start(name, federation.supernode(name, ports[name])) for name in PLATFORMS
    }
    runs = federation.root / "runs"
    started = time.monotonic()
    run = processes.start(
        "run",
        [*FEDFUSE, "run", "--config", str(federation.config), "--name", "r1"]
        + ["--runs", str(runs), "--superlink", federation.control, "--ca", str(federation.ca)]
        + ["--home", str(federation.root / "operator")],
    )

    # The victim has received its round-1 train message and started its ClientApp: stop its
    # process group (SuperNode, SuperExec, ClientApp), as `kill` or a service manager would.
    processes.wait_for(
        lambda: "Start `flwr-clientapp` process" in processes.log(VICTIM), 180, "round 1"
    )
    os.killpg(nodes[VICTIM].pid, signal.SIGTERM)
    assert nodes[VICTIM].wait(timeout=30) == 0  # a graceful stop tells the SuperLink

    metrics = runs / "r1" / "metrics.jsonl"

    def events() -> list[dict]:
        if not metrics.exists():
            return []
        return [json.loads(line) for line in metrics.read_text().splitlines()]

    processes.wait_for(
        lambda: any(e["status"] == "error" for e in events()), 180, "round 1's failure"
    )
    # It rejoins with the same key; round 2 waits for it (federation.min_nodes = 3).
    processes.start(f"{VICTIM}-rejoined", federation.supernode(VICTIM, ports[VICTIM]))
    assert run.wait(timeout=300) == 0, processes.log("run")[-3000:]
    print(f"\ndeployed 2-round run: {time.monotonic() - started:.1f} s")

    round1 = [e for e in events() if e["round"] == 1]
    assert sorted(e["platform"] for e in round1 if e["status"] == "ok") == ["p0", "p1"]
    [failure] = [e for e in round1 if e["status"] == "error"]
    assert failure["code"] == NODE_UNAVAILABLE and "Node Unavailable" in failure["reason"]
    round2 = [e for e in events() if e["round"] == 2]
    assert sorted(e["platform"] for e in round2 if e["status"] == "ok") == list(PLATFORMS)
    assert all(e["event"] == "train" for e in events())  # fraction_evaluate = 0

    wire = [json.loads(line) for line in (runs / "r1" / "wire_log.jsonl").read_text().splitlines()]
    sent = {r["node"] for r in wire if r.get("direction") == "sent" and r.get("round") == 1}
    answered = {e["node"] for e in round1 if e["status"] == "ok"}
    assert failure["node"] in sent - answered  # the lost node, not the SuperLink reporting it

    server_log = processes.log("run")
    # each Flower line once (opacus' root handler printed them twice: issue 35)
    assert server_log.count("Received 2 results and 1 failures") == 1
    assert "finished:completed" in server_log
    run_dir = runs / "r1"
    assert (run_dir / "adapters" / "round_002" / "adapter_config.json").is_file()
    assert not (run_dir / "platform_state").exists()  # ledgers stay with the platforms
    for name in PLATFORMS:
        ledger = json.loads((federation.root / "platforms" / name / LEDGER_FILE).read_text())
        assert ledger["entries"][-1]["server_round"] == 2
        assert ledger["entries"][-1]["epsilon_prv"] <= 8.0
