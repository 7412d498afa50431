"""Wire logs: what each record holds (hashes, shapes, keys — no values), who writes them, and
that concurrent writers never tear a line."""

from __future__ import annotations

import hashlib
import json
import multiprocessing
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.supercore.task_identity import TaskIdentity

from client import client_app
from client.platform_client import PlatformIdentity
from common.adapters import trainable_arrays
from common.config import LoraSettings, ModelConfig, RunConfig
from common.errors import FedFuseError
from common.sharing import shared_names, shared_scorer
from common.wire_log import (
    RECEIVED,
    SENT,
    WIRE_LOG_FILE,
    append_records,
    message_record,
    read_records,
)
from server.federation.run_record import RunRecord
from server.federation.strategy import FedFuseStrategy

NAMES = ["enc.layer.0.q.lora_A.default.weight", "head.weight"]


def _arrays(seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {name: rng.normal(size=(2, 3)).astype(np.float32) for name in NAMES}


def _metadata(src: int, dst: int, kind: str = "train") -> Metadata:
    return Metadata(
        run_id=1,
        message_id=f"m{src}-{dst}",
        src_node_id=src,
        dst_node_id=dst,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=60.0,
        message_type=kind,
    )


def _reply(node: int, platform: str) -> Message:
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in _arrays(node).items()}),
            "metrics": MetricRecord({"num-examples": 10 * node, "epsilon": 1.234567}),
            "platform": ConfigRecord({"name": platform}),
        }
    )
    return Message(content=content, metadata=_metadata(node, 0))


def test_a_record_holds_hashes_shapes_and_keys_never_values() -> None:
    reply = _reply(5, "shop")
    record = message_record("server", RECEIVED, reply, 3, "shop")
    assert {k: record[k] for k in ("side", "direction", "type", "round", "node", "platform")} == {
        "side": "server",
        "direction": RECEIVED,
        "type": "train",
        "round": 3,
        "node": 5,
        "platform": "shop",
    }
    arrays = reply.content["arrays"]
    assert [t["name"] for t in record["tensors"]] == NAMES
    for tensor in record["tensors"]:
        array = arrays[tensor["name"]]
        assert tensor["sha256"] == hashlib.sha256(array.data).hexdigest()
        assert tensor["bytes"] == len(array.data) and tensor["shape"] == [2, 3]
        assert tensor["dtype"] == "float32" and set(tensor) == {
            "name",
            "shape",
            "dtype",
            "bytes",
            "sha256",
            "record",
        }
    assert record["keys"]["metrics"] == {"kind": "metrics", "keys": ["epsilon", "num-examples"]}
    assert record["keys"]["platform"] == {"kind": "config", "keys": ["name"]}
    assert "1.234567" not in json.dumps(record) and "50" not in json.dumps(record["keys"])


class _Grid:
    """The two calls FedAvg's sampling makes on a Grid."""

    def __init__(self, nodes: list[int]) -> None:
        self.nodes = nodes

    def get_node_ids(self) -> list[int]:
        return self.nodes


def test_the_server_logs_every_message_and_names_platforms_once_they_replied(
    tmp_path: Path, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for field, value in (("_run_id", 1), ("_node_id", 0), ("_task_id", 1)):
        monkeypatch.setattr(TaskIdentity, field, value)  # what the ServerApp runtime sets
    # no private item factors: on the tiny BERT their table would outweigh the backbone
    model_config = ModelConfig(backbone=str(tiny_bert_dir), private_factors=0)
    config = RunConfig(model=model_config, lora=LoraSettings(rank=2))
    record = RunRecord(tmp_path)
    record.write_config(config.model_dump(mode="json"))
    strategy = FedFuseStrategy(record, lambda r: 0.1, round_offset=2, min_available_nodes=2)
    scorer, _ = shared_scorer(config.model, config.lora, "fedavg")
    arrays = trainable_arrays(scorer)
    initial = ArrayRecord({k: Array(arrays[k]) for k in shared_names(arrays, "fedavg")})
    sent = strategy.configure_train(1, initial, ConfigRecord(), _Grid([11, 12]))
    strategy.aggregate_train(1, [_reply(11, "a"), _reply(12, "b")])
    strategy.configure_evaluate(1, initial, ConfigRecord(), _Grid([11, 12]))

    model, *messages = read_records(tmp_path / WIRE_LOG_FILE)
    assert model["kind"] == "model" and model["shared_tensors"] == list(initial)
    assert model["full_model_bytes"] == 4 * sum(p.numel() for p in scorer.parameters())
    assert model["backbone_bytes"] > 10 * model["adapter_bytes"] > 0
    rows = [(m["direction"], m["type"], m["round"], m["node"], m["platform"]) for m in messages]
    assert len(rows) == 6 and set(rows) == {  # FedAvg samples nodes in random order
        (SENT, "train", 3, 11, None),  # before its first reply a node is only an id
        (SENT, "train", 3, 12, None),
        (RECEIVED, "train", 3, 11, "a"),
        (RECEIVED, "train", 3, 12, "b"),
        (SENT, "evaluate", 3, 11, "a"),
        (SENT, "evaluate", 3, 12, "b"),
    }
    first = list(sent)[0].content["arrays"]
    assert [t["sha256"] for t in messages[0]["tensors"]] == [
        hashlib.sha256(a.data).hexdigest() for a in first.values()
    ]
    assert messages[0]["keys"]["config"]["keys"] == ["learning-rate", "server-round"]


def test_the_client_logs_what_it_received_and_its_error_reply(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    identity = PlatformIdentity("shop", tmp_path / "data", tmp_path / "state")
    monkeypatch.setattr(
        client_app, "platform_client", lambda c: SimpleNamespace(identity=identity, shared=[])
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in _arrays(1).items()}),
            "config": ConfigRecord({"server-round": 4, "learning-rate": 0.1}),
        }
    )
    message = Message(content=content, metadata=_metadata(0, 7))
    context = Context(run_id=1, node_id=7, node_config={}, state=RecordDict(), run_config={})

    def refuse(msg: Message, _: Context) -> Message:
        return Message(Error(code=client_app.BUDGET_EXHAUSTED, reason="budget"), reply_to=msg)

    reply = client_app.wire_logged(message, context, refuse)
    assert reply.error.code == client_app.BUDGET_EXHAUSTED
    received, sent = read_records(identity.state_dir / WIRE_LOG_FILE)
    assert (received["direction"], received["node"], received["round"]) == (RECEIVED, 7, 4)
    assert received["platform"] == "shop" and len(received["tensors"]) == 2
    assert (sent["direction"], sent["node"], sent["error"], sent["tensors"]) == (
        SENT,
        7,
        client_app.BUDGET_EXHAUSTED,
        [],
    )


def _writer(path: str, worker: int) -> None:
    long_names = [{"name": f"w{worker}-" + "x" * 5000, "sha256": str(i)} for i in range(4)]
    for batch in range(40):
        append_records(path, [{"worker": worker, "batch": batch, "tensors": long_names}] * 2)


def test_concurrent_writers_never_interleave_lines(tmp_path: Path) -> None:
    path = tmp_path / WIRE_LOG_FILE
    context = multiprocessing.get_context("fork")
    workers = [context.Process(target=_writer, args=(str(path), w)) for w in range(4)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=60)
        assert worker.exitcode == 0
    lines = [json.loads(line) for line in path.read_text().splitlines()]  # none torn
    assert len(lines) == 4 * 40 * 2
    for worker in range(4):
        batches = [line["batch"] for line in lines if line["worker"] == worker]
        assert batches == sorted(batches) and len(batches) == 80


def test_a_torn_line_is_an_error_naming_file_and_row(tmp_path: Path) -> None:
    path = tmp_path / WIRE_LOG_FILE
    record = message_record("server", RECEIVED, _reply(1, "a"), 1, "a")
    path.write_text(json.dumps(record) + "\n" + json.dumps(record)[:-5] + "\n")
    with pytest.raises(FedFuseError, match=rf"{WIRE_LOG_FILE}, row 2: invalid JSON"):
        read_records(path)
    path.write_text(json.dumps({"kind": "message", "side": "server"}) + "\n")
    with pytest.raises(FedFuseError, match="row 1: not a FedFuse wire log record"):
        read_records(path)
    with pytest.raises(FedFuseError, match="no wire log"):
        read_records(tmp_path / "absent.jsonl")
