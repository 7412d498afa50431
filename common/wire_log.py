"""What crossed the wire: one JSON line per Flower message, on the server and on each platform.

A record names the message (round, node id, platform, direction, train/evaluate), every tensor
it carried — name, shape, dtype, byte count and the SHA-256 of its serialised bytes, never the
values — and the keys (not the values) of its scalar metric and config records. The server
writes ``RUN_DIR/wire_log.jsonl`` and each platform ``<state dir>/wire_log.jsonl``; ``fedfuse
audit`` checks that both sides saw the same bytes and that only shared adapter tensors moved.

The hash covers ``Array.data``, the exact bytes Flower serialises and transports, so the two
sides of one message hash the same input whatever process or machine wrote the record.

Several processes append to one file (Ray actors serving the same platform over a run): each
batch of lines is one ``write`` on an ``O_APPEND`` descriptor under an exclusive ``flock``, so
lines never interleave or tear.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord

from common.errors import FedFuseError

WIRE_LOG_FILE = "wire_log.jsonl"
FORMAT = "fedfuse-wire-log/1"
SENT, RECEIVED = "sent", "received"
# Flower's SecAgg+ (server/federation/secure_aggregation.py): the record its stages travel in,
# the stage a reply answers (told by its keys), and the legacy records whose tensors are
# indexed "0", "1", … in the shared tensors' sorted order.
SECAGG_RECORD = "secaggplus_configs"
SECAGG_REPLY_STAGES = {
    "pk1": "setup",
    "ctxts": "share_keys",
    "masked_params": "collect_masked_vectors",
    "shares": "unmask",
}
LEGACY_TENSOR_RECORDS = ("fitins.parameters", "fitres.parameters")


def tensor_entries(record: ArrayRecord) -> list[dict[str, Any]]:
    """Name, shape, dtype, bytes and SHA-256 of each serialised tensor, in record order."""
    return [
        {
            "name": name,
            "shape": list(array.shape),
            "dtype": str(array.dtype),
            "bytes": len(array.data),
            "sha256": hashlib.sha256(array.data).hexdigest(),
        }
        for name, array in record.items()
    ]


def secagg_stage(message: Message) -> str | None:
    """The SecAgg+ stage a message belongs to (None for a plain message)."""
    if message.has_error() or SECAGG_RECORD not in message.content.config_records:
        return None
    record = message.content.config_records[SECAGG_RECORD]
    if "stage" in record:
        return str(record["stage"])
    return next((stage for key, stage in SECAGG_REPLY_STAGES.items() if key in record), None)


def _blobs(record: ConfigRecord) -> list[dict[str, Any]]:
    """Byte count and SHA-256 of each bytes value (SecAgg+'s keys, shares, masked vectors)."""
    blobs = []
    for key, value in record.items():
        for index, item in enumerate(value if isinstance(value, list) else [value]):
            if isinstance(item, bytes):
                digest = hashlib.sha256(item).hexdigest()
                blobs.append({"key": key, "index": index, "bytes": len(item), "sha256": digest})
    return blobs


def message_record(
    side: str,
    direction: str,
    message: Message,
    server_round: int,
    platform: str | None,
    names: Sequence[str] = (),
) -> dict[str, Any]:
    """The log line for one message; ``platform`` is None where the sender cannot know it yet.

    The node is the platform's end of the message: the destination of what the server sends,
    the source of what it receives, and the client's own node id on the platform side. A
    SecAgg+ message's type names its stage (``train:setup``, …; the masked-vector stage stays
    ``train``), its bytes values (``secagg``) are hashed like tensors, and the tensors of a
    legacy record, indexed "0", "1", …, take their names from ``names``.
    """
    metadata = message.metadata
    towards_platform = (side == "server") == (direction == SENT)
    node = metadata.dst_node_id if towards_platform else metadata.src_node_id
    kind = str(metadata.message_type)
    stage = secagg_stage(message)
    if stage not in (None, "collect_masked_vectors"):
        kind = f"{kind}:{stage}"
    entry: dict[str, Any] = {
        "kind": "message",
        "side": side,
        "direction": direction,
        "type": kind,
        "round": server_round,
        "node": int(node),
        "platform": platform,
    }
    if message.has_error():
        return entry | {"error": int(message.error.code), "tensors": [], "keys": {}}
    content = message.content
    tensors = [
        t | {"record": key}
        for key, rec in content.array_records.items()
        for t in tensor_entries(rec)
    ]
    for tensor in tensors:
        index = tensor["name"]
        if (
            tensor["record"] in LEGACY_TENSOR_RECORDS
            and index.isdigit()
            and int(index) < len(names)
        ):
            tensor["name"] = names[int(index)]
    keys = {
        key: {"kind": "metrics" if isinstance(rec, MetricRecord) else "config", "keys": sorted(rec)}
        for key, rec in [*content.metric_records.items(), *content.config_records.items()]
        if isinstance(rec, MetricRecord | ConfigRecord)
    }
    entry |= {"error": None, "tensors": tensors, "keys": keys}
    if stage is not None:
        entry["secagg"] = _blobs(content.config_records[SECAGG_RECORD])
    return entry


def append_records(path: Path | str, records: list[dict[str, Any]]) -> None:
    """Append lines as one locked ``O_APPEND`` write: concurrent writers never interleave."""
    if not records:
        return
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    data = "".join(json.dumps(r, sort_keys=True, allow_nan=False) + "\n" for r in records)
    descriptor = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX)
        os.write(descriptor, data.encode("utf-8"))
        os.fsync(descriptor)
    finally:
        os.close(descriptor)  # closing releases the lock


def read_records(path: Path | str) -> list[dict[str, Any]]:
    """Every record of a wire log; a missing file or a bad line is a one-line FedFuseError."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise FedFuseError(f"{path}: no wire log") from None
    except UnicodeDecodeError as err:
        raise FedFuseError(f"{path}: not UTF-8 ({err.reason})") from None
    records = []
    for row, line in enumerate(text.splitlines(), start=1):
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise FedFuseError(f"{path}, row {row}: invalid JSON ({err.msg})") from None
        missing = _missing_fields(record)
        if missing:
            raise FedFuseError(f"{path}, row {row}: not a FedFuse wire log record ({missing})")
        records.append(record)
    return records


MESSAGE_FIELDS = ("side", "direction", "type", "round", "node", "platform", "error", "tensors")
MODEL_FIELDS = ("shared_tensors", "full_model_bytes", "strategy")
TENSOR_FIELDS = ("name", "shape", "dtype", "bytes", "sha256")


def _missing_fields(record: Any) -> str | None:
    """What a parsed line lacks to be a wire log record (None when complete)."""
    if not isinstance(record, dict) or record.get("kind") not in ("message", "model"):
        return "no kind 'message' or 'model'"
    fields = MESSAGE_FIELDS if record["kind"] == "message" else MODEL_FIELDS
    absent = [field for field in fields if field not in record]
    if absent:
        return f"missing {', '.join(absent)}"
    for tensor in record.get("tensors", []):
        if not isinstance(tensor, dict) or any(f not in tensor for f in TENSOR_FIELDS):
            return f"a tensor entry lacks one of {', '.join(TENSOR_FIELDS)}"
    return None


def model_record(scorer: Any, strategy: str) -> dict[str, Any]:
    """The full model's fp32 size beside the tensors a strategy may send, logged once per run.

    ``shared_tensors`` is what the server itself expects on the wire; the audit checks every
    logged tensor name against it.
    """
    from common.adapters import trainable_arrays
    from common.sharing import shared_names

    trainable = trainable_arrays(scorer)
    shared = shared_names(trainable, strategy)
    total = sum(p.numel() for p in scorer.parameters()) * 4
    adapters = sum(a.size for a in trainable.values()) * 4
    return {
        "kind": "model",
        "format": FORMAT,
        "strategy": strategy,
        "shared_tensors": shared,
        "shared_bytes": sum(trainable[n].size for n in shared) * 4,
        "adapter_bytes": adapters,
        "backbone_bytes": total - adapters,
        "full_model_bytes": total,
    }
