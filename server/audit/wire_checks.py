"""``fedfuse audit``'s checks of the wire logs: server and platforms logged the same messages
and bytes, only shared adapter tensors moved, every upload was charged, and no reply claimed
a finite ε at σ = 0."""

from __future__ import annotations

import math
from collections import Counter, defaultdict
from typing import Any

from common.sharing import shares
from common.wire_log import RECEIVED, SENT
from server.audit.findings import flag
from server.federation.run_record import METRICS_FILE


def _is_adapter_tensor(name: str) -> bool:
    return ".lora_A." in name or ".lora_B." in name or name.startswith("head.")


def _signature(record: dict[str, Any]) -> tuple[Any, ...]:
    tensors = tuple(
        (t["name"], tuple(t["shape"]), t["dtype"], t["bytes"], t["sha256"])
        for t in record["tensors"]
    )
    return (record["error"], tensors)


def _key(record: dict[str, Any]) -> tuple[int, int, str, str]:
    """(node, round, type, "down"/"up"): the same message as seen from either side."""
    towards_platform = (record["side"] == "server") == (record["direction"] == SENT)
    return (record["node"], record["round"], record["type"], "down" if towards_platform else "up")


def _describe(key: tuple[int, int, str, str], platform: str | None) -> str:
    node, server_round, kind, way = key
    arrow = "server → platform" if way == "down" else "platform → server"
    return f"round {server_round} {kind} {arrow}, node {node} ({platform or 'unknown platform'})"


def compare_logs(
    server: list[dict[str, Any]],
    platforms: dict[str, list[dict[str, Any]]],
    simulation: bool,
) -> tuple[dict[int, str], list[dict[str, Any]], list[str]]:
    """Node → platform map, disagreement flags, and notes on nodes nobody handed over.

    The node id is the one identity both sides see; a server record sent before the node's
    first reply has no platform name, so the name comes from the node's own log or replies.
    """
    flags, notes = [], []
    nodes: dict[int, str] = {}
    for name, records in platforms.items():
        for record in records:
            if record["platform"] != name:
                flags.append(
                    flag("wire-disagreement", name, f"platform log names {record['platform']!r}")
                )
            nodes.setdefault(record["node"], name)
    for record in server:
        claimed = record["platform"]
        if claimed and nodes.setdefault(record["node"], claimed) != claimed:
            flags.append(
                flag(
                    "wire-disagreement",
                    claimed,
                    f"server log maps node {record['node']} to {claimed!r}, "
                    f"its platform log is {nodes[record['node']]!r}'s",
                )
            )
    server_side = Counter((_key(r), _signature(r)) for r in server)
    client_side = Counter((_key(r), _signature(r)) for rs in platforms.values() for r in rs)
    audited = set(platforms)
    unaudited: Counter[int] = Counter()
    for (key, _), count in (server_side - client_side).items():
        platform = nodes.get(key[0])
        if platform in audited or simulation:
            flags.append(
                flag(
                    "wire-disagreement",
                    platform,
                    f"{_describe(key, platform)}: in the server log ({count}×) but not in the "
                    "platform's log with the same tensors (hash/shape mismatch or missing)",
                )
            )
        else:
            unaudited[key[0]] += count
    for (key, _), count in (client_side - server_side).items():
        platform = nodes.get(key[0])
        flags.append(
            flag(
                "wire-disagreement",
                platform,
                f"{_describe(key, platform)}: in the platform's log ({count}×) but not in the "
                "server log with the same tensors (hash/shape mismatch or missing)",
            )
        )
    for node, count in sorted(unaudited.items()):
        notes.append(
            f"node {node} ({nodes.get(node, 'unknown platform')}): {count} server messages "
            "not compared (no state folder handed over for it)"
        )
    return nodes, flags, notes


def foreign_tensors(
    records: list[dict[str, Any]], shared: set[str], strategy: str, where: str
) -> list[dict[str, Any]]:
    """Every tensor on the wire must be a shared LoRA/head tensor of this strategy."""
    flags = []
    seen: set[str] = set()
    for record in records:
        for tensor in record["tensors"]:
            name = tensor["name"]
            allowed = name in shared and _is_adapter_tensor(name) and shares(name, strategy)
            if not allowed and name not in seen:
                seen.add(name)
                flags.append(
                    flag(
                        "foreign-tensor",
                        record["platform"],
                        f"{where}: round {record['round']} {record['type']} "
                        f"{record['direction']}: tensor {name!r} is not a shared adapter tensor",
                    )
                )
    return flags


def bytes_per_round(server: list[dict[str, Any]], full_model: int) -> list[dict[str, Any]]:
    """Serialised tensor bytes the server sent and received per round, against the model."""
    rounds: dict[int, dict[str, int]] = defaultdict(
        lambda: {"train_sent": 0, "train_received": 0, "evaluate_sent": 0, "largest_upload": 0}
    )
    for record in server:
        size = sum(t["bytes"] for t in record["tensors"])
        row = rounds[record["round"]]
        if record["direction"] == SENT:
            row[f"{record['type']}_sent"] = row.get(f"{record['type']}_sent", 0) + size
        elif record["direction"] == RECEIVED and record["type"] == "train":
            row["train_received"] += size
            row["largest_upload"] = max(row["largest_upload"], size)
    return [
        {"round": r, **row, "upload_share_of_full_model": row["largest_upload"] / full_model}
        for r, row in sorted(rounds.items())
    ]


def unrecorded_uploads(
    summary: dict[str, Any], server: list[dict[str, Any]], nodes: dict[int, str]
) -> list[dict[str, Any]]:
    """Train uploads the server received from a platform that its ledger does not account for.

    The hash chain cannot show a ledger cut short after its last entry; the server's wire log
    can: every successful upload that carries tensors must have a ledger entry for its round.
    """
    platform = summary["platform"]
    uploads = Counter(
        r["round"]
        for r in server
        if r["direction"] == RECEIVED
        and r["type"] == "train"
        and r["error"] is None
        and r["tensors"]  # a lockstep platform not due that round sends none
        and nodes.get(r["node"]) == platform
    )
    recorded = Counter(r["round"] for r in summary["rounds"])
    return [
        flag(
            "ledger-incomplete",
            platform,
            f"{summary['ledger']}: {count} upload(s) of round {server_round} in the server's "
            "wire log have no ledger entry (ledger cut short?)",
        )
        for server_round, count in sorted((uploads - recorded).items())
    ]


# --- replies that report σ = 0 -----------------------------------------------------------------


def zero_noise_replies(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Train replies that claim a finite ε but report σ = 0 (metrics.jsonl, server side)."""
    return [
        flag(
            "zero-noise",
            event.get("platform"),
            f"{METRICS_FILE}: round {event.get('round')} reply reports noise-multiplier 0 "
            f"with ε = {event['epsilon']}",
        )
        for event in events
        if event.get("event") == "train"
        and event.get("status") == "ok"
        and event.get("noise-multiplier") is not None
        and event["noise-multiplier"] <= 0
        and math.isfinite(float(event.get("epsilon", math.inf)))
    ]
