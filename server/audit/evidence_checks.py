"""``fedfuse audit``'s checks of what a run recorded beyond its ledgers and wire logs: the
canary audit, the released popularity statistics, each platform's own DP-step self-test and
code identity, and the white-box run of the DP step here (the one check that is not from the
files alone)."""

from __future__ import annotations

import json
import math
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from client.ledger import PrivacyLedger
from client.step_bound import SAMPLING_SIGMAS, bound_verdict
from common.errors import ConfigError, FedFuseError
from server.audit.findings import flag, read_json
from server.federation.run_record import RunRecord

CANARY_FILE = "canary_audit.json"
PRIOR_FILE = "popularity_prior.json"  # client/popularity_prior.PRIOR_FILE, spelled out so the
# audit does not import torch and the model code to read JSON files

# --- the canary audit ------------------------------------------------------------------------

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
    document = read_json(path)
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
        flag(
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
    path = folder / PRIOR_FILE
    platform = str(ledger.header["platform"])
    charged = [e for e in ledger.entries if e.get("kind") == "gaussian-histogram"]
    if not path.exists():
        return []
    document = read_json(path)
    try:
        values = np.array([float(v) for v in document["counts"].values()])
        sigma = float(document["noise_multiplier"])
    except (KeyError, TypeError, ValueError, AttributeError):
        raise FedFuseError(f"{path}: not a FedFuse popularity prior") from None
    where = f"{path} (σ = {sigma:g}, {values.size} items)"
    if not charged or charged[-1]["noise_multiplier"] != sigma:
        recorded = charged[-1]["noise_multiplier"] if charged else None
        return [
            flag(
                "prior-inconsistent",
                platform,
                f"{where}: the ledger charges σ = {recorded} for this release",
            )
        ]
    exact = int(np.sum(values == np.round(values)))
    if values.size and exact == values.size:
        return [flag("prior-without-noise", platform, f"{where}: every value is an integer")]
    if exact > 0:
        return [
            flag(
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
            flag(
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
                flag(
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
                flag(
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
                flag(
                    "self-test-inconsistent",
                    platform,
                    f"{where}: the self-test's verdict ({test.get('passed')!r}) does not follow "
                    "from its own recorded numbers",
                )
            )
        elif problems:
            flags.append(
                flag(
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
                flag(
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
                        flag(
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

    try:
        config = RunRecord(run_dir).run_config()
    except ConfigError as err:  # settings this release cannot rebuild the run's model from
        raise ConfigError(f"{err}, or audit all but the DP step here with --no-white-box") from None
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
        flag(
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
