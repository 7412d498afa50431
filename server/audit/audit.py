"""``fedfuse audit``: check a run's privacy claims from its files alone.

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
import logging
import math
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import dp_accounting
import numpy as np
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from client.ledger import LEDGER_FILE, LedgerError, PrivacyLedger
from common.atomic import atomic_write
from common.config import load_config
from common.errors import FedFuseError
from common.sharing import shares
from common.wire_log import RECEIVED, SENT, WIRE_LOG_FILE, read_records
from server.audit.person_epsilon import person_epsilon
from server.federation.run_record import CONFIG_FILE, METRICS_FILE, RunRecord

AUDIT_JSON = "audit.json"
AUDIT_HTML = "audit.html"
CANARY_FILE = "canary_audit.json"
PLATFORM_STATE = "platform_state"
# Opacus' PRV bound and dp_accounting's PLD bound are both upper bounds computed to within
# ~0.5 %; the two RDP implementations use slightly different order grids.
RELATIVE_TOLERANCE = 0.01
ABSOLUTE_TOLERANCE = 1e-3
PLD_GRID = 1e-3  # dp_accounting's value_discretization_interval
PRIVATE_ADAPTER_FILE = "private_adapter.safetensors"  # PrivateTensors.FILE (fedsa), spelled
# out so the audit does not import torch and the model code to read JSON files
PRIOR_FILE = "popularity_prior.json"  # client/popularity_prior.PRIOR_FILE, likewise
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
ENTRY_FIELDS = {
    "server_round": int,
    "noise_multiplier": float,
    "sample_rate": float,
    "steps": int,
    "max_grad_norm": float,
    "delta": float,
    "epsilon_prv": float,
    "epsilon_rdp": float,
}


def _flag(code: str, platform: str | None, message: str) -> dict[str, Any]:
    return {"code": code, "platform": platform, "message": message}


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise FedFuseError(f"{path}: file not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise FedFuseError(f"{path}: not valid JSON ({err})") from None


def _agree(recorded: float, recomputed: float) -> bool:
    if math.isinf(recorded) or math.isinf(recomputed):
        return recorded == recomputed
    return abs(recorded - recomputed) <= RELATIVE_TOLERANCE * recomputed + ABSOLUTE_TOLERANCE


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


def _load_ledger(path: Path) -> PrivacyLedger:
    """Parse the ledger without trusting it: the chain is verified later and flagged, not fatal."""
    document = _read_json(path)
    header = document.get("header") if isinstance(document, dict) else None
    entries = document.get("entries") if isinstance(document, dict) else None
    if not isinstance(header, dict) or not isinstance(entries, list):
        raise FedFuseError(f"{path}: not a FedFuse privacy ledger (no header and entries)")
    for key in ("platform", "delta", "epsilon_budget", "privacy_unit"):
        if key not in header:
            raise FedFuseError(f"{path}: ledger header lacks {key!r}")
    for index, entry in enumerate(entries):
        for key, kind in ENTRY_FIELDS.items():
            value = entry.get(key) if isinstance(entry, dict) else None
            if not isinstance(value, int | float) or (kind is int and not isinstance(value, int)):
                raise FedFuseError(f"{path}, entry {index}: {key!r} missing or not a number")
    return PrivacyLedger(path, header, entries)


def _event(entry: dict[str, Any]) -> dp_accounting.DpEvent:
    return dp_accounting.PoissonSampledDpEvent(
        entry["sample_rate"], dp_accounting.GaussianDpEvent(entry["noise_multiplier"])
    )


class _SkippedOrders(logging.Filter):
    """Counts (and silences) dp_accounting's warnings about RDP orders it had to drop.

    For small σ its series for some fractional orders does not converge; it then bounds ε with
    the remaining orders, which is still a valid (slightly looser) bound.
    """

    def __init__(self) -> None:
        super().__init__()
        self.count = 0

    def filter(self, record: logging.LogRecord) -> bool:
        if str(record.msg).startswith("_compute_log_a_frac failed to converge"):
            self.count += 1
            return False
        return True


def recompute(entries: list[dict[str, Any]], delta: float) -> tuple[list[dict[str, float]], int]:
    """Independent ε after each entry (cumulative PLD and RDP) and of each round alone (PLD).

    Google's dp_accounting composes each round's Poisson-subsampled Gaussian steps; σ = 0 has
    no finite ε, which dp_accounting reports as infinity. The PLD grid is 1e-3 (pessimistic, so
    still an upper bound; within 0.05 % of the 1e-4 default and 10× faster). Also returns how
    many RDP orders dp_accounting dropped.
    """
    pld, rdp = PLDAccountant(value_discretization_interval=PLD_GRID), RdpAccountant()
    skipped = _SkippedOrders()
    logging.getLogger("absl").addFilter(skipped)
    try:
        results = []
        for entry in entries:
            pld.compose(_event(entry), entry["steps"])
            rdp.compose(_event(entry), entry["steps"])
            alone = PLDAccountant(value_discretization_interval=PLD_GRID).compose(
                _event(entry), entry["steps"]
            )
            results.append(
                {
                    "pld": float(pld.get_epsilon(delta)),
                    "rdp": float(rdp.get_epsilon(delta)),
                    "round_pld": float(alone.get_epsilon(delta)),
                }
            )
    finally:
        logging.getLogger("absl").removeFilter(skipped)
    return results, skipped.count


def audit_ledger(ledger: PrivacyLedger) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One platform's privacy figures and flags, from its ledger alone."""
    header, entries = ledger.header, ledger.entries
    platform, delta, budget = str(header["platform"]), ledger.delta, ledger.budget
    flags = []
    try:
        ledger.verify()
        chain = True
    except LedgerError as err:
        chain = False
        flags.append(_flag("broken-chain", platform, str(err)))
    if ledger.unit is None:
        flags.append(
            _flag(
                "unknown-privacy-unit",
                platform,
                f"{ledger.path}: privacy unit {header['privacy_unit']!r} is neither 'example' "
                "nor 'user': what its ε protects cannot be stated",
            )
        )
    recomputed, skipped_orders = recompute(entries, delta)
    rounds = []
    for index, (entry, again) in enumerate(zip(entries, recomputed, strict=True)):
        where = f"{ledger.path}, entry {index} (round {entry['server_round']})"
        if entry["noise_multiplier"] <= 0:
            flags.append(_flag("zero-noise", platform, f"{where}: σ = 0 while DP is claimed"))
        if entry["delta"] != delta:
            flags.append(
                _flag("epsilon-mismatch", platform, f"{where}: δ {entry['delta']} ≠ header {delta}")
            )
        for recorded, independent, label in (
            (entry["epsilon_prv"], again["pld"], "PRV vs dp_accounting PLD"),
            (entry["epsilon_rdp"], again["rdp"], "RDP vs dp_accounting RDP"),
        ):
            if not _agree(recorded, independent):
                flags.append(
                    _flag(
                        "epsilon-mismatch",
                        platform,
                        f"{where}: recorded ε {recorded:.4f} ≠ recomputed {independent:.4f} "
                        f"({label})",
                    )
                )
        rounds.append(
            {
                "index": index,
                "round": entry["server_round"],
                "mechanism": entry.get("kind", "dp-sgd"),
                "noise_multiplier": entry["noise_multiplier"],
                "sample_rate": entry["sample_rate"],
                "steps": entry["steps"],
                "max_grad_norm": entry["max_grad_norm"],
                "epsilon_round_pld": again["round_pld"],
                "epsilon_prv": entry["epsilon_prv"],
                "epsilon_rdp": entry["epsilon_rdp"],
                "epsilon_pld_recomputed": again["pld"],
                "epsilon_rdp_recomputed": again["rdp"],
            }
        )
    spent = entries[-1]["epsilon_prv"] if entries else 0.0
    spent_pld = recomputed[-1]["pld"] if recomputed else 0.0
    if spent > budget or spent_pld > budget * (1 + RELATIVE_TOLERANCE) + ABSOLUTE_TOLERANCE:
        flags.append(
            _flag(
                "budget-exceeded",
                platform,
                f"{ledger.path}: ε spent {spent:.4f} (PLD {spent_pld:.4f}) > budget {budget:g}",
            )
        )
    summary = {
        "platform": platform,
        "ledger": str(ledger.path),
        "privacy_unit": header["privacy_unit"],
        "dataset_size": header.get("dataset_size"),
        "delta": delta,
        "epsilon_budget": budget,
        "epsilon_spent_prv": spent,
        "epsilon_spent_rdp": entries[-1]["epsilon_rdp"] if entries else 0.0,
        "epsilon_spent_pld_recomputed": spent_pld,
        "epsilon_spent_rdp_recomputed": recomputed[-1]["rdp"] if recomputed else 0.0,
        "budget_left": budget - spent,
        "hash_chain_intact": chain,
        "rdp_orders_dropped_by_dp_accounting": skipped_orders,
        "rounds": rounds,
    }
    return summary, flags


def person_flags(person: dict[str, Any]) -> list[dict[str, Any]]:
    """A person's composed ε must come out the same with FedFuse's accountant and PLD."""
    return [
        _flag(
            "epsilon-mismatch",
            None,
            f"a person on {row['k']} platform(s) ({', '.join(row['platforms'])}): ε PRV "
            f"{row['epsilon_prv']:.4f} ≠ dp_accounting PLD {row['epsilon_pld']:.4f}",
        )
        for row in person["rows"]
        if not _agree(row["epsilon_prv"], row["epsilon_pld"])
    ]


# --- wire logs --------------------------------------------------------------------------------


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
                    _flag("wire-disagreement", name, f"platform log names {record['platform']!r}")
                )
            nodes.setdefault(record["node"], name)
    for record in server:
        claimed = record["platform"]
        if claimed and nodes.setdefault(record["node"], claimed) != claimed:
            flags.append(
                _flag(
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
                _flag(
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
            _flag(
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
                    _flag(
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
        _flag(
            "ledger-incomplete",
            platform,
            f"{summary['ledger']}: {count} upload(s) of round {server_round} in the server's "
            "wire log have no ledger entry (ledger cut short?)",
        )
        for server_round, count in sorted((uploads - recorded).items())
    ]


# --- reported ε, canaries ---------------------------------------------------------------------


def zero_noise_replies(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Train replies that claim a finite ε but report σ = 0 (metrics.jsonl, server side)."""
    return [
        _flag(
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


CANARY_FIELDS = {
    "platform": str,
    "canaries": int,
    "guesses": int,
    "correct": int,
    "epsilon_lower_bound": float,
    "epsilon_theoretical": float,
    "delta": float,
}


def read_canaries(path: Path) -> dict[str, Any] | None:
    """The one-run canary audit (Steinke, Nasr, Jagielski 2023), if the run has one."""
    if not path.exists():
        return None
    document = _read_json(path)
    rows = document.get("platforms") if isinstance(document, dict) else None
    if not isinstance(rows, list) or not isinstance(document.get("confidence"), int | float):
        raise FedFuseError(f"{path}: needs 'confidence' and a 'platforms' list")
    for index, row in enumerate(rows):
        for key, kind in CANARY_FIELDS.items():
            value = row.get(key) if isinstance(row, dict) else None
            ok = isinstance(value, str) if kind is str else isinstance(value, int | float)
            if not ok or (kind is int and not isinstance(value, int)):
                raise FedFuseError(f"{path}, platforms[{index}]: {key!r} missing or wrong type")
    return document


def canary_flags(canaries: dict[str, Any]) -> list[dict[str, Any]]:
    """A lower bound above the theoretical ε means the accounting or the DP code is wrong."""
    return [
        _flag(
            "canary-exceeds-theory",
            row["platform"],
            f"{CANARY_FILE}: empirical ε lower bound {row['epsilon_lower_bound']:.4f} > "
            f"theoretical ε {row['epsilon_theoretical']:.4f} at confidence "
            f"{canaries['confidence']}",
        )
        for row in canaries["platforms"]
        if row["epsilon_lower_bound"] > row["epsilon_theoretical"]
    ]


# --- released statistics ----------------------------------------------------------------------


def wrapped_square(sigma: float) -> float:
    """E[r²] for r = x − round(x), x an integer plus N(0, σ²): the wrapped normal's second
    moment on [−½, ½] (1/12 once σ is large, σ² when it is small)."""
    if sigma <= 0:
        return 0.0
    grid = np.linspace(-0.5, 0.5, 2001)
    shifts = np.arange(-int(10 * sigma) - 2, int(10 * sigma) + 3)
    density = np.exp(-(((grid[:, None] + shifts[None, :]) / sigma) ** 2) / 2).sum(axis=1)
    density /= np.trapezoid(density, grid)
    return float(np.trapezoid(grid**2 * density, grid))


def prior_flags(folder: Path, ledger: PrivacyLedger) -> list[dict[str, Any]]:
    """The released popularity histogram must carry the noise its ledger entry records.

    A Gaussian draw is never an exact integer nor exactly 0, so such values mean counts went
    out unnoised. Under the example unit the true counts are integers, so the distance of
    each released value to the nearest integer follows the wrapped normal of the recorded σ:
    its mean square is compared with that law's, at SAMPLING_SIGMAS standard errors."""
    from client.step_check import SAMPLING_SIGMAS

    path = folder / PRIOR_FILE
    platform = str(ledger.header["platform"])
    charged = [e for e in ledger.entries if e.get("kind") == "gaussian-histogram"]
    if not path.exists():
        return []
    document = _read_json(path)
    try:
        values = np.array([float(v) for v in document["counts"].values()])
        sigma = float(document["noise_multiplier"])
    except (KeyError, TypeError, ValueError, AttributeError):
        raise FedFuseError(f"{path}: not a FedFuse popularity prior") from None
    where = f"{path} (σ = {sigma:g}, {values.size} items)"
    if not charged or charged[-1]["noise_multiplier"] != sigma:
        recorded = charged[-1]["noise_multiplier"] if charged else None
        return [
            _flag(
                "prior-inconsistent",
                platform,
                f"{where}: the ledger charges σ = {recorded} for this release",
            )
        ]
    exact = int(np.sum(values == np.round(values)))
    if values.size and exact == values.size:
        return [_flag("prior-without-noise", platform, f"{where}: every value is an integer")]
    if exact > 0:
        return [
            _flag(
                "prior-without-noise",
                platform,
                f"{where}: {exact} value(s) are exact integers, which Gaussian noise never gives",
            )
        ]
    if ledger.unit != "example" or values.size < 30:
        return []
    squares = (values - np.round(values)) ** 2
    expected = wrapped_square(sigma)
    error = float(squares.std()) / math.sqrt(values.size)
    if abs(float(squares.mean()) - expected) > SAMPLING_SIGMAS * max(error, 1e-3 * expected):
        return [
            _flag(
                "prior-noise-inconsistent",
                platform,
                f"{where}: mean squared distance to the nearest integer "
                f"{float(squares.mean()):.4f}, the recorded σ gives {expected:.4f}: the counts "
                "carry other noise than recorded",
            )
        ]
    return []


# --- the platforms' own evidence --------------------------------------------------------------


def evidence_flags(ledger: PrivacyLedger) -> tuple[list[dict[str, Any]], list[str]]:
    """Flags on the evidence each DP-SGD entry carries (``client/step_check.py``): a missing
    record, a failed self-test, or one inconsistent with its entry (another σ, C or unit) or
    with its own numbers (recomputed here). Also the distinct code identities recorded."""
    from client.step_check import bound_verdict

    platform, unit = str(ledger.header["platform"]), ledger.unit
    flags, identities = [], []
    for index, entry in enumerate(ledger.entries):
        if entry.get("kind", "dp-sgd") != "dp-sgd" or entry["steps"] <= 0:
            continue
        where = f"{ledger.path}, entry {index} (round {entry['server_round']})"
        evidence = entry.get("evidence")
        test = evidence.get("self_test") if isinstance(evidence, dict) else None
        code = evidence.get("code") if isinstance(evidence, dict) else None
        if not isinstance(test, dict) or not isinstance(code, dict):
            flags.append(
                _flag(
                    "self-test-missing",
                    platform,
                    f"{where}: no record of the platform's own DP-step self-test and code "
                    "identity: what ran is unknown",
                )
            )
            continue
        identity = json.dumps(code, sort_keys=True)
        if identity not in identities:
            identities.append(identity)
        recorded = (test.get("noise_multiplier"), test.get("max_grad_norm"), test.get("unit"))
        if recorded != (entry["noise_multiplier"], entry["max_grad_norm"], unit):
            flags.append(
                _flag(
                    "self-test-inconsistent",
                    platform,
                    f"{where}: self-test ran at σ, C, unit = {recorded}, the entry charges "
                    f"{(entry['noise_multiplier'], entry['max_grad_norm'], unit)}",
                )
            )
            continue
        problems = bound_verdict(test)
        if problems is None or bool(problems) == bool(test.get("passed")):
            flags.append(
                _flag(
                    "self-test-inconsistent",
                    platform,
                    f"{where}: the self-test's verdict ({test.get('passed')!r}) does not follow "
                    "from its own recorded numbers",
                )
            )
        elif problems:
            flags.append(
                _flag(
                    "self-test-failed",
                    platform,
                    f"{where}: the platform's DP step at σ = {entry['noise_multiplier']:.4g}, "
                    f"C = {entry['max_grad_norm']:.4g} is not what the ledger records: "
                    + "; ".join(problems),
                )
            )
    return flags, identities


def code_flags(
    identities: dict[str, list[str]], release: dict[str, str] | None
) -> list[dict[str, Any]]:
    """The platforms must have run one code (and the release the operator names, if any)."""
    flags = []
    seen = Counter(i for found in identities.values() for i in dict.fromkeys(found))
    common = seen.most_common(1)[0][0] if seen else None
    for platform, found in sorted(identities.items()):
        if len(found) > 1 or (found and found[0] != common and len(identities) > 1):
            flags.append(
                _flag(
                    "code-identity-differs",
                    platform,
                    f"the platform recorded code {', '.join(found)}; most platforms ran {common}",
                )
            )
        if release is not None:
            wanted = json.dumps(release, sort_keys=True)
            for identity in found:
                if not all(json.loads(identity).get(k) == v for k, v in release.items()):
                    flags.append(
                        _flag(
                            "code-identity-not-release",
                            platform,
                            f"the platform ran {identity}, not the release {wanted}",
                        )
                    )
    return flags


# --- the DP step itself (white box) -----------------------------------------------------------


def white_box(run_dir: Path, ledgers: list[PrivacyLedger]) -> dict[str, Any]:
    """The white-box audit of the DP step at every DP-SGD mechanism the ledgers record, with
    the run's scorer, objective and audit confidence. It runs FedFuse's DP step here (torch,
    about half a second per mechanism), hence imported only when it runs."""
    from client.step_check import CANARY_NORM, TRIALS
    from server.audit.gradient_audit import audit_ledger_steps

    config = load_config(run_dir / CONFIG_FILE)
    return {
        "confidence": config.audit.confidence,
        "trials": TRIALS,
        "canary_norm": CANARY_NORM,
        "rows": [row for ledger in ledgers for row in audit_ledger_steps(ledger, config)],
    }


def white_box_flags(section: dict[str, Any]) -> list[dict[str, Any]]:
    """The DP step, run here at a recorded (σ, C), leaks more than one Gaussian step's
    theoretical ε, or noises or clips otherwise than recorded."""
    return [
        _flag(
            "white-box-exceeds-theory"
            if row["epsilon_lower_bound"] > row["epsilon_theoretical"]
            else "white-box-inconsistent",
            row["platform"],
            f"white-box audit of the DP step at σ = {row['noise_multiplier']:.4g}, "
            f"C = {row['max_grad_norm']:.4g} (δ = {row['delta']:g}, confidence "
            f"{section['confidence']}): " + "; ".join(row["problems"]) + ": clipping or "
            "noise is not what the ledger records",
        )
        for row in section["rows"]
        if row["flagged"]
    ]


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
            ledgers.append(_load_ledger(ledger_path))
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
