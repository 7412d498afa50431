"""Server aggregation: the exact weighted rule, learning-rate schedule, round offset, records."""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from pathlib import Path

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Error,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from common.config import FederationConfig, RunConfig, TrainConfig
from server.federation.run_record import RunRecord
from server.federation.server_app import learning_rate_schedule
from server.federation.server_optimizer import ServerOptimizer
from server.federation.strategy import FedFuseStrategy, LockstepStrategy, RoundFailed


def _metadata(node: int, message_type: str = "train") -> Metadata:
    """Metadata of a reply from ``node`` (what the runtime would attach)."""
    return Metadata(
        run_id=1,
        message_id=f"r{node}",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="m",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type=message_type,
    )


def _reply(node: int, platform: str, arrays: dict[str, np.ndarray], examples: int) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "metrics": MetricRecord({"num-examples": examples, "epsilon": 1.5}),
            "platform": ConfigRecord({"name": platform}),
        }
    )
    return Message(content=content, metadata=_metadata(node))


def _error_reply(node: int) -> Message:
    reason = "privacy budget exhausted for platform 'x'"
    return Message(Error(code=4001, reason=reason), metadata=_metadata(node))


def test_aggregation_is_the_example_weighted_mean_per_tensor(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    names = [
        "encoder.layer.0.lora_A.default.weight",
        "encoder.layer.0.lora_B.default.weight",
        "head.weight",
    ]
    uploads = {
        p: {n: rng.normal(size=(3, 2)).astype(np.float32) for n in names} for p in ("a", "b", "c")
    }
    examples = {"a": 100, "b": 300, "c": 600}
    record = RunRecord(tmp_path)
    strategy = FedFuseStrategy(record, lambda r: 0.1, round_offset=4)
    replies = [_reply(k + 1, p, uploads[p], examples[p]) for k, p in enumerate(uploads)] + [
        _error_reply(9)
    ]
    arrays, _ = strategy.aggregate_train(1, replies)
    total = sum(examples.values())
    for name in names:  # computed independently of Flower
        expected = sum(examples[p] * uploads[p][name].astype(np.float64) for p in uploads) / total
        np.testing.assert_allclose(arrays[name].numpy(), expected, rtol=1e-6)
    events = record.events()
    assert [(e["platform"], e["round"], e["status"]) for e in events[:3]] == [
        ("a", 5, "ok"),
        ("b", 5, "ok"),
        ("c", 5, "ok"),
    ]
    assert (
        events[3]["status"] == "error"
        and events[3]["code"] == 4001
        and "budget" in events[3]["reason"]
    )


def test_a_server_learning_rate_steps_along_the_averaged_update(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    start = {"head.weight": rng.normal(size=(3, 2)).astype(np.float32)}
    uploads = {p: {"head.weight": rng.normal(size=(3, 2)).astype(np.float32)} for p in "ab"}
    replies = [_reply(k + 1, p, uploads[p], 100) for k, p in enumerate(uploads)]
    average = (uploads["a"]["head.weight"] + uploads["b"]["head.weight"]) / 2
    for eta in (1.0, 2.5):
        strategy = FedFuseStrategy(
            RunRecord(tmp_path / str(eta)), lambda r: 0.1, server_learning_rate=eta
        )
        strategy.sent = ArrayRecord({k: Array(v) for k, v in start.items()})  # the round's global
        arrays, _ = strategy.aggregate_train(1, replies)
        stepped = start["head.weight"] + eta * (average - start["head.weight"])
        np.testing.assert_allclose(arrays["head.weight"].numpy(), stepped, rtol=1e-5)
        assert arrays["head.weight"].numpy().dtype == np.float32


def test_learning_rate_decays_over_the_planned_rounds() -> None:
    config = RunConfig(train=TrainConfig(learning_rate=1e-3), federation=FederationConfig(rounds=5))
    rate = learning_rate_schedule(config)
    assert rate(1) == pytest.approx(1e-3)
    assert rate(5) == pytest.approx(1e-4)
    assert rate(1) > rate(2) > rate(3) > rate(4) > rate(5)


def test_a_round_without_any_successful_platform_stops_the_run(tmp_path: Path) -> None:
    record = RunRecord(tmp_path)
    strategy = FedFuseStrategy(record, lambda r: 0.1, round_offset=2)
    with pytest.raises(RoundFailed, match=r"round 3: no platform trained \(2 replies") as caught:
        strategy.aggregate_train(1, [_error_reply(1), _error_reply(2)])
    assert "privacy budget exhausted" in str(caught.value)
    assert record.events()[-1] == {"event": "round-failed", "round": 3, "reason": str(caught.value)}


class _Grid:
    """A grid whose platforms come online one call at a time, up to ``most``."""

    def __init__(self, online: int, most: int) -> None:
        self.online, self.most = online, most

    def get_node_ids(self) -> list[int]:
        nodes = list(range(1, self.online + 1))
        self.online = min(self.online + 1, self.most)
        return nodes


def test_a_round_waits_a_bounded_time_for_its_platforms(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Flower's sampling would wait for min_nodes for ever: a round waits node_wait seconds,
    then stops the run there with one line (a platform that comes back in time is waited for).
    """
    for field, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, field, value)  # what the ServerApp runtime sets
    record = RunRecord(tmp_path)
    strategy = FedFuseStrategy(
        record, lambda r: 0.1, round_offset=2, node_wait=0.5, min_available_nodes=3
    )
    started = time.monotonic()
    with pytest.raises(RoundFailed, match=r"round 3: 1 of the 3 platforms .* after 0.5 s"):
        strategy.configure_train(1, ArrayRecord(), ConfigRecord(), _Grid(1, 1))
    assert time.monotonic() - started < 5
    assert record.events()[-1]["event"] == "round-failed"
    # two more come online while it waits: the round goes ahead with all three
    patient = FedFuseStrategy(record, lambda r: 0.1, node_wait=30, min_available_nodes=3)
    sent = list(patient.configure_train(1, ArrayRecord(), ConfigRecord(), _Grid(1, 3)))
    assert sorted(m.metadata.dst_node_id for m in sent) == [1, 2, 3]
    assert FederationConfig().node_wait == 600


def _adamw_by_hand(
    gradients: list[np.ndarray], rates: list[float], eps: float, betas=(0.9, 0.999)
) -> np.ndarray:
    """The total AdamW displacement (no weight decay) after these gradients, one step each
    at its rate."""
    m = v = np.zeros_like(gradients[0], dtype=np.float64)
    moved = np.zeros_like(m)
    for step, (g, rate) in enumerate(zip(gradients, rates, strict=True), start=1):
        m = betas[0] * m + (1 - betas[0]) * g
        v = betas[1] * v + (1 - betas[1]) * g**2
        m_hat, v_hat = m / (1 - betas[0] ** step), v / (1 - betas[1] ** step)
        moved -= rate * m_hat / (np.sqrt(v_hat) + eps)
    return moved


def test_the_lockstep_server_applies_adamw_to_the_mean_gradient() -> None:
    """Two steps: the unweighted mean of the platforms' gradients through AdamW, the user map
    with its own rate and ε; a tensor no platform sent this round stays, state and all."""
    train = TrainConfig(learning_rate=1e-3, head_learning_rate=0.05, map_adam_epsilon=1e-3)
    lora, user = "encoder.layer.0.lora_A.default.weight", "head.user_down.weight"
    start = {lora: np.zeros((2, 3), np.float32), user: np.ones((2, 2), np.float32)}
    server = ServerOptimizer(train, start)
    rng = np.random.default_rng(0)
    first = [{n: rng.normal(size=a.shape).astype(np.float32) * 1e-3 for n, a in start.items()}]
    first.append({n: rng.normal(size=a.shape).astype(np.float32) * 1e-3 for n, a in start.items()})
    second = [{user: rng.normal(size=(2, 2)).astype(np.float32) * 1e-3}]  # a head-only step
    server.step(first, 1e-3)
    arrays = server.step(second, 5e-4)
    mean = {n: (first[0][n] + first[1][n]) / 2 for n in start}
    moved = _adamw_by_hand([mean[lora]], [1e-3], 1e-8)
    np.testing.assert_allclose(arrays[lora], start[lora] + moved, rtol=1e-4)
    # the map: the head's rate, scaled by the schedule like the adapters' (0.05, then 0.025)
    moved = _adamw_by_hand([mean[user], second[0][user]], [0.05, 0.025], 1e-3)
    np.testing.assert_allclose(arrays[user], start[user] + moved, rtol=1e-4)
    assert server.moments[f"moment::{lora}::step"] == 1
    assert server.moments[f"moment::{user}::step"] == 2
    with pytest.raises(ValueError, match="does not hold"):
        server.step([{"head.other": np.zeros(1, np.float32)}], 1e-3)


def test_the_lockstep_strategy_averages_the_gradients_that_came(tmp_path: Path) -> None:
    """Replies without tensors (a platform not due) and errors are left out of the mean; the
    server's rate is the schedule's for the absolute round."""
    train = TrainConfig(learning_rate=1e-3)
    name = "encoder.layer.0.lora_B.default.weight"
    start = {name: np.zeros((2, 2), np.float32)}
    strategy = LockstepStrategy(
        ServerOptimizer(train, start), RunRecord(tmp_path), lambda r: 1e-3 * r, round_offset=1
    )
    g = {"a": np.full((2, 2), 2.0, np.float32), "b": np.full((2, 2), -1.0, np.float32)}
    replies = [
        _reply(1, "a", {name: g["a"]}, 10),
        _reply(2, "b", {name: g["b"]}, 1000),
        _reply(3, "c", {}, 50),
        _error_reply(4),
    ]
    arrays, metrics = strategy.aggregate_train(1, replies)
    reference = ServerOptimizer(train, start)
    expected = reference.step([{name: (g["a"] + g["b"]) / 2}], 2e-3)
    np.testing.assert_allclose(arrays[name].numpy(), expected[name])
    assert metrics["platforms-stepped"] == 2


class _SlowGrid:
    """Two platforms: node 1 answers after 5 s, node 2 after 70 s (a long noise calibration)."""

    pull_interval = 1.0

    def __init__(self, clock: list[float]) -> None:
        self.clock = clock

    def push_messages(self, messages: Iterable[Message]) -> list[str]:
        return [f"m{m.metadata.dst_node_id}" for m in messages]

    def pull_messages(self, message_ids: Iterable[str]) -> list[Message]:
        due = {"m1": 5.0, "m2": 70.0}
        replies = []
        for message_id in message_ids:
            if self.clock[0] >= due[message_id]:
                node = int(message_id[1:])
                reply = _reply(node, f"p{node}", {}, 1)
                reply.metadata.__dict__["_reply_to_message_id"] = message_id
                replies.append(reply)
        return replies


def test_a_round_that_waits_says_so_every_30_s_naming_who_answered(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Flower's send_and_receive waits in silence: a first round behind a long noise
    calibration looked stuck. The rule is kept (every reply, in the order pulled); the lines
    count rounds as the console does (3 rounds done before this run)."""
    from server.federation import waiting_grid

    for field, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, field, value)  # what the ServerApp runtime sets
    clock = [0.0]
    monkeypatch.setattr(waiting_grid.time, "monotonic", lambda: clock[0])
    monkeypatch.setattr(waiting_grid.time, "sleep", lambda s: clock.__setitem__(0, clock[0] + s))
    grid = waiting_grid.WaitingGrid(_SlowGrid(clock), round_offset=3)  # type: ignore[arg-type]
    messages = [
        Message(RecordDict(), dst_node_id=node, message_type="train", group_id="1")
        for node in (1, 2)
    ]
    with caplog.at_level(logging.INFO, logger="server.federation.waiting_grid"):
        replies = list(grid.send_and_receive(messages))
    assert [r.metadata.reply_to_message_id for r in replies] == ["m1", "m2"]
    assert [r.getMessage() for r in caplog.records] == [
        f"round 4 train: 1 of 2 platforms answered after {t} s (p1); waiting for the others"
        for t in (30, 60)
    ]
    assert clock[0] == 70.0
    caplog.clear()
    clock[0] = 0.0  # a timeout ends the wait as Flower's does, with the replies so far
    assert len(list(grid.send_and_receive(messages, timeout=20))) == 1
    assert caplog.records == []
