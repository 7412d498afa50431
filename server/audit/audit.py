"""``fedfuse audit``: check a run's privacy claims from its files alone (the orchestration;
the checks are in ``ledger_checks.py``, ``wire_checks.py`` and ``evidence_checks.py``).

Inputs: the run folder (``config.json``, the server's ``wire_log.jsonl``, ``metrics.jsonl``,
optionally ``canary_audit.json``) and each platform's state folder (its ``privacy_ledger.json``
and ``wire_log.jsonl``) — under ``RUN_DIR/platform_state/`` in simulation, or handed over by
the platforms (``--platform-state``) in deployment.

Per platform it reports the DP mechanism as recorded (privacy unit, δ, σ, clip norm, sample
rate, steps), the ε per round and cumulative as recorded (Opacus PRV and RDP) and as
recomputed independently with Google's ``dp_accounting`` (PLD and RDP), the budget left, and
whether the ledger's hash chain holds. On the wire it reports bytes per round against the full
model and checks that only shared adapter tensors moved and that server and platforms logged
the same bytes. Across platforms it reports a person's ε: for a person on any k of the audited
platforms, the worst case over every k-subset (``person_epsilon.py``). Unless told not to
(``fedfuse audit --no-white-box``), it also runs FedFuse's DP step on this machine at each
platform's recorded σ and C with gradient canaries, and bounds that step's ε from below
(``gradient_audit.py``): the one check that is not from the files alone. Anything wrong becomes
a *flag*; a folder that cannot be audited at all (a missing or unreadable file, a foreign file
in a state folder) is a one-line FedFuseError.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from client.ledger import LEDGER_FILE
from common.atomic import atomic_write
from common.errors import FedFuseError
from common.wire_log import WIRE_LOG_FILE, read_records
from server.audit.evidence_checks import (
    CANARY_FILE,
    PRIOR_FILE,
    canary_flags,
    code_flags,
    evidence_flags,
    prior_flags,
    read_canaries,
    white_box,
    white_box_flags,
)
from server.audit.ledger_checks import (
    ABSOLUTE_TOLERANCE,
    PLD_GRID,
    RELATIVE_TOLERANCE,
    audit_ledger,
    load_ledger,
    person_flags,
)
from server.audit.person_epsilon import person_epsilon
from server.audit.wire_checks import (
    bytes_per_round,
    compare_logs,
    foreign_tensors,
    unrecorded_uploads,
    zero_noise_replies,
)
from server.federation.run_record import RunRecord

AUDIT_JSON = "audit.json"
AUDIT_HTML = "audit.html"
PLATFORM_STATE = "platform_state"
PRIVATE_ADAPTER_FILE = "private_adapter.safetensors"  # PrivateTensors.FILE (fedsa), spelled
# out so the audit does not import torch and the model code to read JSON files
LAST_REPLY_FILE = "last_reply.safetensors"  # client/platform_client.LastReply.FILE, likewise
FLOWER_HOME = "flwr-home"  # the folder a SuperNode's Flower creates in its state folder
STATE_FILES = {
    LAST_REPLY_FILE,
    LEDGER_FILE,
    f".{LEDGER_FILE}.lock",
    WIRE_LOG_FILE,
    PRIVATE_ADAPTER_FILE,
    PRIOR_FILE,
    f".{PRIOR_FILE}.lock",
}


# --- platform state folders -------------------------------------------------------------------


def state_folders(run_dir: Path, given: list[Path], state_dir: str | None = None) -> list[Path]:
    """The platform state folders to audit: those handed over, else the simulation's (in the
    run folder, or else where the run's ``dp.state_dir`` put them)."""
    if given:
        missing = [p for p in given if not p.is_dir()]
        if missing:
            raise FedFuseError(f"{missing[0]}: platform state folder not found")
        return given
    root = run_dir / PLATFORM_STATE
    if not root.is_dir() and state_dir:
        root = Path(state_dir)
    folders = sorted(p for p in root.iterdir() if p.is_dir()) if root.is_dir() else []
    if not folders:
        raise FedFuseError(
            f"{root}: no platform state folders (deployment: pass --platform-state DIR)"
        )
    return folders


def _check_state_folder(folder: Path) -> None:
    """Only files FedFuse writes may be there: anything else means the copy is not authentic."""
    for child in sorted(folder.iterdir()):
        if child.name == FLOWER_HOME and child.is_dir():
            continue  # Flower's own files on a deployed SuperNode, none of them FedFuse's
        if child.name not in STATE_FILES or not child.is_file():
            raise FedFuseError(f"{child}: foreign file in platform state folder {folder}")


# --- the whole audit --------------------------------------------------------------------------


def _model_record(server: list[dict[str, Any]], path: Path) -> dict[str, Any]:
    models = [r for r in server if r["kind"] == "model"]
    if not models:
        raise FedFuseError(f"{path}: no model record (full model size, shared tensors)")
    return models[0]


def audit(
    run_dir: Path | str,
    platform_states: list[Path] | None = None,
    white_box_audit: bool = True,
    release: dict[str, str] | None = None,
) -> dict[str, Any]:
    """The audit report of a run folder (nothing written); ``white_box_audit``: with the
    white-box audit of the DP step; ``release``: the code identity every platform must have
    recorded (``source_sha256`` and library versions, any subset)."""
    run_dir = Path(run_dir)
    config = RunRecord(run_dir).read_config()
    strategy = config["federation"]["strategy"]
    dp_claimed = bool(config["dp"]["enabled"])
    server_path = run_dir / WIRE_LOG_FILE
    records = read_records(server_path)
    model = _model_record(records, server_path)
    server = [r for r in records if r["kind"] == "message"]
    flags = foreign_tensors(server, set(model["shared_tensors"]), strategy, str(server_path))

    platforms, logs, ledgers = [], {}, []
    identities: dict[str, list[str]] = {}
    state_dir = config.get("dp", {}).get("state_dir")
    for folder in state_folders(run_dir, list(platform_states or []), state_dir):
        _check_state_folder(folder)
        ledger_path = folder / LEDGER_FILE
        log_path = folder / WIRE_LOG_FILE
        if ledger_path.exists() or dp_claimed:
            ledgers.append(load_ledger(ledger_path))
            summary, found = audit_ledger(ledgers[-1])
            checked, identities[summary["platform"]] = evidence_flags(ledgers[-1])
            found += checked + prior_flags(folder, ledgers[-1])
        else:
            summary, found = {"platform": folder.name, "dp": False, "rounds": []}, []
        name = summary["platform"]
        if name in logs:
            raise FedFuseError(f"{folder}: platform {name!r} handed over twice")
        logs[name] = [r for r in read_records(log_path) if r["kind"] == "message"]
        flags += found + foreign_tensors(
            logs[name], set(model["shared_tensors"]), strategy, str(log_path)
        )
        platforms.append(summary)

    flags += code_flags(identities, release)
    nodes, disagreements, notes = compare_logs(server, logs, simulation=not platform_states)
    flags += disagreements + zero_noise_replies(RunRecord(run_dir).events())
    for summary in platforms:
        if summary.get("dp") is not False:
            flags += unrecorded_uploads(summary, server, nodes)
    person = person_epsilon(ledgers, config["dp"]["delta"], PLD_GRID) if dp_claimed else None
    if person:
        flags += person_flags(person)
    canaries = read_canaries(run_dir / CANARY_FILE)
    if canaries:
        flags += canary_flags(canaries)
    steps = white_box(run_dir, ledgers) if white_box_audit else None
    if steps:
        flags += white_box_flags(steps)
    for summary in platforms:
        summary["flags"] = sum(f["platform"] == summary["platform"] for f in flags)
    return {
        "run_dir": str(run_dir),
        "strategy": strategy,
        "dp_claimed": dp_claimed,
        "tolerance": {"relative": RELATIVE_TOLERANCE, "absolute": ABSOLUTE_TOLERANCE},
        "platforms": platforms,
        "person_epsilon": person,
        "model": {k: v for k, v in model.items() if k != "kind"},
        "nodes": {str(node): name for node, name in sorted(nodes.items())},
        "wire": {
            "server_messages": len(server),
            "platform_messages": {name: len(records) for name, records in logs.items()},
            "bytes_per_round": bytes_per_round(server, model["full_model_bytes"]),
        },
        "canary": canaries,
        "white_box": steps,
        "notes": notes,
        "flags": flags,
    }


def write_audit(report: dict[str, Any], run_dir: Path | str) -> tuple[Path, Path]:
    """audit.json and the self-contained audit.html, each replaced atomically."""
    from server.audit.audit_report import render_html

    run_dir = Path(run_dir)
    json_path, html_path = run_dir / AUDIT_JSON, run_dir / AUDIT_HTML
    atomic_write(json_path, json.dumps(report, indent=2, allow_nan=True) + "\n")
    atomic_write(html_path, render_html(report))
    return json_path, html_path
