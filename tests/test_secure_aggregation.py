"""Secure aggregation (issue 37): Flower's SecAgg+ sums the lockstep schedule's noised gradients.

The ServerApp's federation loop and the real ClientApp (with its SecAgg+ mod) run in this
process, joined by a grid that delivers each message by calling the app (no Ray): every stage
of the protocol, the masking and the unmasking are Flower's own.
"""

from __future__ import annotations

import copy
import json
import math
import uuid
from collections.abc import Iterable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest
from flwr.app import Context, Error, Message, RecordDict
from flwr.common import bytes_to_ndarray, ndarrays_to_parameters
from flwr.common.secure_aggregation.quantization import dequantize, quantize
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity
from safetensors.numpy import load_file as load_numpy
from scipy.stats import chisquare

from client import client_app
from client.ledger import LEDGER_FILE
from client.platform_client import LastReply
from common.config import load_config
from common.errors import ConfigError
from common.platform_writer import write_dataset
from common.synthetic import SyntheticConfig, generate
from common.wire_log import WIRE_LOG_FILE, read_records
from server.federation.run_record import RunRecord
from server.federation.secure_aggregation import (
    MODULUS,
    noise_ceiling,
    quantisation,
    value_bound,
)
from server.federation.server_app import run_federation
from server.federation.strategy import RoundFailed


class InProcessGrid(Grid):
    """Delivers each message to the ClientApp of its node, in this process. ``drop`` maps a
    node to the SecAgg+ stage from which on it no longer answers (the SuperLink's error)."""

    def __init__(self, run_config: dict[str, Any], nodes: int, drop: dict[int, str] | None = None):
        self.contexts = {
            node: Context(node, node, {"partition-id": node - 1}, RecordDict(), run_config)
            for node in range(1, nodes + 1)
        }
        self.drop = drop or {}
        self.gone: set[int] = set()
        self.replies: dict[str, Message] = {}

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Delivers at once; the replies wait for :meth:`pull_messages`."""
        replies = self._deliver(messages)
        self.replies = {r.metadata.reply_to_message_id: r for r in replies}
        return list(self.replies)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def _deliver(self, messages: Iterable[Message]) -> list[Message]:
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid.uuid4())
            node = message.metadata.dst_node_id
            configs = message.content.config_records.get("secaggplus_configs") or {}
            if node in self.drop and self.drop[node] == configs.get("stage"):
                self.gone.add(node)
            if node in self.gone:
                replies.append(Message(Error(code=1, reason="node lost"), reply_to=message))
                continue
            # each node gets its own copy, as off the wire (Flower shares one record among nodes)
            delivered = Message(
                content=copy.deepcopy(message.content), metadata=copy.deepcopy(message.metadata)
            )
            replies.append(client_app.app(delivered, self.contexts[node]))
        return replies

    def set_run(self, run: Any) -> None:  # pragma: no cover - not used in process
        raise NotImplementedError

    @property
    def run(self) -> Any:  # pragma: no cover
        raise NotImplementedError

    def create_message(self, *args: Any, **kwargs: Any) -> Message:  # pragma: no cover
        raise NotImplementedError


@pytest.fixture(scope="module")
def three_platforms(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("secagg") / "data"
    return write_dataset(out, generate(SyntheticConfig(platforms=3, users=12, items=30, seed=5)))


def _run(
    tmp_path: Path,
    write_run_config,
    data: Path,
    drop: dict[int, str] | None = None,
    secure: bool = True,
    **sections: dict[str, object],
) -> tuple[Path, Any]:
    path = write_run_config(
        tmp_path / "run.toml",
        data={"path": str(data)},
        train={"local_steps": 2, "eval_max_cases": 5},
        dp={"state_dir": str(tmp_path / "state")},
        federation={
            "rounds": 2,
            "min_nodes": 3,
            "schedule": "lockstep",
            "secure_aggregation": secure,
            "fraction_evaluate": 0.0,
        },
        **sections,
    )
    client_app._clients.clear()
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, 1, 0  # as Flower's runtime
    config = load_config(path)
    grid = InProcessGrid({"config-file": str(path)}, 3, drop)
    record = RunRecord(tmp_path / "run")
    run_federation(grid, config, record)
    return record.root, config


def _released(state: Path, platform: str) -> dict[str, np.ndarray]:
    """The noised gradient a platform released last (its stored reply)."""
    return load_numpy(state / platform / LastReply.FILE)


@pytest.fixture(scope="module")
def secure_run(tmp_path_factory: pytest.TempPathFactory, write_run_config, three_platforms):
    """One secure lockstep run of 3 platforms, 2 rounds, DP on; what the server's mean was
    each round and what each platform's masked upload held, captured on the way."""
    import client.secure_aggregation as client_side
    from server.federation import secure_aggregation as server_side

    means: list[dict[str, np.ndarray]] = []
    uploads: list[np.ndarray] = []
    real_means, real_mod = server_side.lockstep_means, client_side.secaggplus_mod

    def mean(secure: Any, names: Any) -> dict[str, np.ndarray]:
        means.append(real_means(secure, names))
        return means[-1]

    def mod(msg: Message, context: Context, call_next: Any) -> Message:
        reply = real_mod(msg, context, call_next)
        configs = reply.content.config_records["secaggplus_configs"]
        if "masked_params" in configs:  # the first array is Flower's weight factor
            arrays = [bytes_to_ndarray(b) for b in configs["masked_params"]][1:]
            uploads.append(np.concatenate([a.ravel() for a in arrays]))
        return reply

    tmp_path = tmp_path_factory.mktemp("secure-run")
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(server_side, "lockstep_means", mean)
        patch.setattr(client_side, "secaggplus_mod", mod)
        run, config = _run(tmp_path, write_run_config, three_platforms)
    return SimpleNamespace(
        run=run, config=config, state=tmp_path / "state", means=means, uploads=uploads
    )


def test_the_secure_mean_is_the_plain_mean_within_the_stated_bound(secure_run) -> None:
    """With DP on, every platform's noised gradient of the last round (stored on its side) is
    averaged in the clear here and compared with what the server got from SecAgg+: within
    Δ = 2R/Q on every coordinate."""
    assert RunRecord(secure_run.run).last_round() == 2
    released = [_released(secure_run.state, p) for p in ("p0", "p1", "p2")]
    names = sorted(released[0])
    step = quantisation(value_bound(secure_run.config, names), 3).step
    assert 0 < step < 1e-6
    for name in names:
        plain = np.mean([r[name] for r in released], axis=0, dtype=np.float64)
        assert np.abs(secure_run.means[-1][name] - plain).max() <= step + 1e-7 * np.abs(plain).max()
    events = [e for e in RunRecord(secure_run.run).events() if e.get("event") == "train"]
    assert [e["status"] for e in events] == ["ok"] * 6
    assert all(e["secagg-clipped"] == 0 for e in events)


def test_the_server_receives_only_masked_vectors(secure_run) -> None:
    """The server's wire log holds no tensor from a platform, only SecAgg+'s blobs (keys,
    shares, masked vectors), and each platform logged the same bytes as sent."""
    server = read_records(secure_run.run / WIRE_LOG_FILE)
    received = [r for r in server if r["kind"] == "message" and r["direction"] == "received"]
    assert {r["type"] for r in received} == {
        "train:setup",
        "train:share_keys",
        "train",
        "train:unmask",
    }
    assert all(not r["tensors"] for r in received)
    masked = [r for r in received if r["type"] == "train"]
    assert len(masked) == 6 and all(
        b["key"] == "masked_params" for r in masked for b in r["secagg"]
    )
    for platform in ("p0", "p1", "p2"):
        client = read_records(secure_run.state / platform / WIRE_LOG_FILE)
        sent = [r for r in client if r["direction"] == "sent" and r["type"] == "train"]
        assert [r["secagg"] for r in sent] == [
            r["secagg"] for r in masked if r["node"] == sent[0]["node"]
        ]


def test_a_masked_vector_alone_is_uniform(secure_run) -> None:
    """What one platform uploads, read back from its bytes: the residues of its masked vector
    spread uniformly over [0, M), whatever its gradient (chi-square, 16 bins, p > 0.001)."""
    assert len(secure_run.uploads) == 6
    for values in secure_run.uploads:
        counts, _ = np.histogram(values, bins=16, range=(0, MODULUS))
        assert chisquare(counts).pvalue > 1e-3
        assert np.unique(values).size > 0.99 * values.size  # no plain zeros or repeats


@pytest.mark.parametrize("platforms", [2, 5, 100, 65_535])
def test_quantisation_never_overflows_at_the_extremes(platforms: int) -> None:
    """Every platform at +R, beyond +R (clipped), at −R, or at 0: Flower's quantised sum of n
    stays below M (no wrap-around) and dequantises to the mean within Δ."""
    ranges = quantisation(3.5, platforms)
    assert platforms * ranges.levels < MODULUS and ranges.levels % 2 == 0
    for value in (3.5, 1e9, -3.5, -1e9, 0.0, 1.234):
        vectors = [np.full(4, value)] * platforms
        quantised = [quantize([v], ranges.clip_range, ranges.levels)[0] for v in vectors]
        total = np.sum(np.stack(quantised).astype(np.int64), axis=0)
        assert total.max() < MODULUS and total.min() >= 0
        # Flower's unmasking: dequantise the sum, remove n − 1 offsets, divide by n
        mean = dequantize([total], ranges.clip_range, ranges.levels)[0] - (platforms - 1) * 3.5
        mean /= platforms
        assert np.abs(mean - np.clip(value, -3.5, 3.5)).max() <= ranges.step


def test_too_many_platforms_for_the_field_are_refused() -> None:
    with pytest.raises(ConfigError, match="quantisation levels"):
        quantisation(1.0, 2**17)


def test_secure_aggregation_without_dp_is_refused_when_the_settings_are_read() -> None:
    """Its range comes from the clip norm: without DP the run is refused before anything starts
    (one line naming both keys); compare's non-private cells run without it."""
    from server.simulation.compare import at_level

    secure = ["federation.secure_aggregation=true", "federation.min_nodes=2"]
    with pytest.raises(ConfigError, match="secure_aggregation needs dp.enabled = true"):
        load_config(None, [*secure, "dp.enabled=false"])
    config = load_config(None, secure)
    assert config.federation.secure_aggregation and config.federation.schedule == "lockstep"
    nonprivate = at_level(config, math.inf)
    assert not nonprivate.dp.enabled and not nonprivate.federation.secure_aggregation
    assert at_level(config, 4.0).federation.secure_aggregation


def test_the_range_covers_the_largest_noise_a_platform_can_calibrate(write_run_config, tmp_path):
    """σ̄ is σ at q = 1 over every round: no platform's calibrated σ (q < 1) is larger."""
    from client.noise_calibration import calibrate_noise

    config = load_config(write_run_config(tmp_path / "run.toml"))
    ceiling = noise_ceiling(config)
    for q in (0.05, 0.5, 1.0):
        assert calibrate_noise(config.dp, q, config.federation.rounds) <= ceiling * 1.01


@pytest.mark.parametrize("stage", ["collect_masked_vectors", "unmask"])
def test_a_platform_lost_mid_round_is_unmasked_around(
    tmp_path: Path, write_run_config, three_platforms: Path, stage: str
) -> None:
    """Platform p2 (node 3) is lost from round 1's masked-vector stage (it never trains) or
    from its unmasking stage (it trained and its masked vector is in the sum): SecAgg+
    rebuilds what it needs from the other two (threshold 2 of 3) and round 1 completes; in
    round 2 p2 is lost from key setup on, and the session goes on without it."""
    run, _ = _run(tmp_path, write_run_config, three_platforms, drop={3: stage})
    assert RunRecord(run).last_round() == 2
    events = [e for e in RunRecord(run).events() if e.get("event") == "train"]
    ok = sorted((e["round"], e["platform"]) for e in events if e["status"] == "ok")
    summed = [("p0", "p1", "p2") if stage == "unmask" else ("p0", "p1"), ("p0", "p1")]
    assert ok == [(r + 1, p) for r, names in enumerate(summed) for p in names]
    ledger = json.loads((tmp_path / "state" / "p2" / LEDGER_FILE).read_text())
    charged = [e["server_round"] for e in ledger["entries"] if e["kind"] == "dp-sgd"]
    assert charged == ([1] if stage == "unmask" else [])  # lost before training: not charged


def test_too_few_platforms_left_fail_the_round_cleanly(
    tmp_path: Path, write_run_config, three_platforms: Path
) -> None:
    """Two of three platforms lost at key setup: one is left, below the threshold of 2; the
    round fails (a round-failed record, the run stays resumable) and no platform trained."""
    with pytest.raises(RoundFailed, match="secure aggregation halted: 1 of 3 platforms left"):
        _run(tmp_path, write_run_config, three_platforms, drop={2: "setup", 3: "setup"})
    record = RunRecord(tmp_path / "run")
    assert record.last_round() == 0
    assert [e["event"] for e in record.events() if e["event"] == "round-failed"] == ["round-failed"]
    for platform in ("p0", "p1", "p2"):
        ledger = tmp_path / "state" / platform / LEDGER_FILE
        entries = json.loads(ledger.read_text())["entries"] if ledger.exists() else []
        assert [e for e in entries if e["kind"] == "dp-sgd"] == []  # the prior at most


@pytest.mark.ray
def test_a_secure_simulation_completes_and_audits_clean(
    tmp_path: Path, write_run_config, capsys: pytest.CaptureFixture[str]
) -> None:
    """Flower's Simulation Engine (Ray actors), two platforms, secure lockstep: the run ends
    and `fedfuse audit` recomputes every ε and raises no flag on its wire logs."""
    from server.cli import main
    from server.simulation.simulation import prepare_run, simulate

    config = write_run_config(
        tmp_path / "run.toml",
        train={"local_steps": 2, "eval_max_cases": 5},
        federation={"rounds": 2, "schedule": "lockstep", "secure_aggregation": True},
    )
    run = simulate(prepare_run(load_config(config), tmp_path / "runs", "secure"))
    assert RunRecord(run).last_round() == 2
    assert main(["audit", str(run), "--no-white-box"]) == 0
    assert "flags: 0 (audit clean)" in capsys.readouterr().out


def test_the_lockstep_mean_counts_only_the_platforms_that_sent_a_tensor() -> None:
    """Three platforms in the sum: two stepped tensor a, one was not due (zeros, indicators 0),
    nobody stepped b (an adapter on a head-only step). Flower hands back the mean over all
    three; the mean over a's senders comes back, and b is left out (the optimiser keeps it)."""
    from flwr.common import Code, FitRes, Status

    from server.federation.secure_aggregation import SecureRound, lockstep_means

    a = [np.array([1.0, 2.0]), np.array([3.0, 6.0]), np.zeros(2)]
    b = [np.zeros(3)] * 3
    indicators_a, indicators_b = [1.0, 1.0, 0.0], [0.0, 0.0, 0.0]
    over_all = [
        np.mean(a, axis=0),
        np.mean(b, axis=0),
        np.array([np.mean(indicators_a)]),
        np.array([np.mean(indicators_b)]),
    ]
    reply = FitRes(Status(Code.OK, ""), ndarrays_to_parameters([]), 1, {})
    secure = SecureRound(over_all, [(None, reply)] * 3, {}, 3, 2, quantisation(8.0, 3))
    means = lockstep_means(secure, ["a", "b"])
    assert set(means) == {"a"}
    np.testing.assert_allclose(means["a"], [2.0, 4.0])


def test_a_round_that_failed_after_training_is_replayed_not_retrained(
    tmp_path: Path, write_run_config, three_platforms: Path
) -> None:
    """All three platforms train round 1 (charged), then two are lost before unmasking: the
    round fails. Resumed with every platform back, round 1 is answered from their stored
    replies (`replayed`), each ledger still holds one charge for it, and the run completes."""
    with pytest.raises(RoundFailed, match="halted"):
        _run(tmp_path, write_run_config, three_platforms, drop={2: "unmask", 3: "unmask"})
    run, _ = _run(tmp_path, write_run_config, three_platforms)
    assert RunRecord(run).last_round() == 2
    events = [e for e in RunRecord(run).events() if e.get("event") == "train"]
    replayed = sorted(e["platform"] for e in events if e.get("replayed"))
    assert replayed == ["p0", "p1", "p2"]
    for platform in ("p0", "p1", "p2"):
        entries = json.loads((tmp_path / "state" / platform / LEDGER_FILE).read_text())["entries"]
        assert [e["server_round"] for e in entries if e["kind"] == "dp-sgd"] == [1, 2]
