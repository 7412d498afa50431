"""The ε ledger: every DP round a platform ran, composed over the whole federation.

Each platform keeps one ledger in its own state folder; only the ε figures it implies are ever
reported to the server. An entry records the mechanism exactly as Opacus ran it (noise
multiplier σ, Poisson sample rate q, number of steps, clip norm, δ), so any accountant can
recompute ε from the file alone. Cumulative ε composes all entries since the first round,
across process restarts, with Opacus' PRV accountant (the reported figure and the budget check)
and its RDP accountant (a looser cross-check).

Integrity: the file is replaced atomically (temporary file, then rename) and every entry carries
the SHA-256 of its content chained to the previous entry's hash (the first to the header's), so
an edited, dropped or reordered entry is detected on load.

Privacy unit (fixed in the header when the ledger is created, so a run under the other unit
is refused): ``example``, one training unit (record-level DP), or ``user``, everything one user
contributes on the platform (user-level DP); ``dataset_size`` counts those units.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np
from opacus.accountants import PRVAccountant, RDPAccountant
from opacus.accountants.analysis import rdp as rdp_analysis

from common.atomic import atomic_write
from common.errors import FedFuseError

# Opacus computes the Rényi divergence of the same (q, σ) at each of its orders again for every
# composition it is asked for, and again inside the PRV accountant's domain bound. That is
# most of a ledger charge, and under the lockstep schedule a platform is charged up to 141 times
# a run. It is a pure function of (q, σ, α): memoised, every ε is bit-identical
# (tests/test_ledger.py) and ten lockstep charges take 2.0 s instead of 27.0 s. Opacus has no
# hook for it, so the memoised function stands in for Opacus' own only while the ledger's
# accountants run (:func:`_memoised_renyi`): other users of Opacus in the process see its own.
_renyi = lru_cache(maxsize=65_536)(rdp_analysis._compute_rdp)


@contextmanager
def _memoised_renyi() -> Iterator[None]:
    original = rdp_analysis._compute_rdp
    rdp_analysis._compute_rdp = _renyi
    try:
        yield
    finally:
        rdp_analysis._compute_rdp = original


LEDGER_FILE = "privacy_ledger.json"
FORMAT = "fedfuse-privacy-ledger/1"
EXAMPLE, USER = "example", "user"
# What each unit's ε is about, as the ledger header states it.
PRIVACY_UNITS = {
    EXAMPLE: "example: one training unit (record-level: a liked item with its own sampled "
    "negatives, or one labelled example under the bce objective)",
    USER: "user: all of one user's training units on the platform (user-level)",
}
# Ledgers written before the unit was configurable record this long form of ``example``.
LEGACY_UNITS = {"one labelled example (record-level)": EXAMPLE}
PRV_EPS_ERROR = 0.01
PRV_RELATIVE_ERROR = 0.005


class LedgerError(FedFuseError):
    """The ledger is missing, unreadable, tampered with, or inconsistent with this platform."""


class BudgetExhausted(FedFuseError):
    """Running the next round would push ε past the platform's budget; nothing was trained."""


class RoundAlreadyCharged(BudgetExhausted):
    """The ledger already holds this round: a replay (restarted server, duplicate message, a
    second process) is refused rather than trained and charged twice."""


DP_SGD = "dp-sgd"
GAUSSIAN_HISTOGRAM = "gaussian-histogram"


@dataclass(frozen=True)
class Mechanism:
    """``steps`` Poisson-sampled Gaussian steps as executed.

    ``kind`` says what was released: a round of DP-SGD (σ, q, C as Opacus ran them), or a
    Gaussian-mechanism histogram (q = 1, one step, ``max_grad_norm`` = its L2 sensitivity).
    Both are the same event to an accountant. ``unit``: the privacy unit its sensitivity is
    bounded for (the ledger accepts only its own).
    """

    noise_multiplier: float
    sample_rate: float
    steps: int
    max_grad_norm: float
    kind: str = DP_SGD
    unit: str = EXAMPLE

    def history(self) -> tuple[float, float, int]:
        """Opacus accountant history entry (σ, q, steps)."""
        return (self.noise_multiplier, self.sample_rate, self.steps)


def unit_of(recorded: str) -> str | None:
    """``EXAMPLE`` or ``USER`` for a ledger header's privacy unit (its name, its description or
    an older ledger's form); None if not recognised."""
    for unit, description in PRIVACY_UNITS.items():
        if recorded in (unit, description):
            return unit
    return LEGACY_UNITS.get(recorded)


def _merged_history(mechanisms: list[Mechanism]) -> list[tuple[float, float, int]]:
    """Consecutive rounds of one (σ, q) compose as one longer run: the PRV accountant's cost
    grows with the number of distinct entries, not with steps."""
    history: list[tuple[float, float, int]] = []
    for sigma, q, steps in (m.history() for m in mechanisms if m.steps > 0):
        if history and history[-1][:2] == (sigma, q):
            history[-1] = (sigma, q, history[-1][2] + steps)
        else:
            history.append((sigma, q, steps))
    return history


def epsilon(mechanisms: list[Mechanism], delta: float, accountant: str = "prv") -> float:
    """ε of the sequential composition of ``mechanisms`` at ``delta`` (0 for no mechanism).

    PRV returns an upper bound within an absolute error we keep below 0.5 % of ε (a first
    coarse pass sizes the error), so the ledger agrees with an independent PLD accountant to
    better than 1 % at any ε.
    """
    return _composed_epsilon(tuple(_merged_history(mechanisms)), delta, accountant)


@lru_cache(maxsize=256)
def _composed_epsilon(
    history: tuple[tuple[float, float, int], ...], delta: float, accountant: str
) -> float:
    """Memoised: a round asks for the same composition twice (budget check before training,
    record after), and noise calibration repeats for platforms of equal size; one PRV
    evaluation costs 0.1-0.5 s of CPU."""
    if not history:
        return 0.0
    with _memoised_renyi():
        return _accountant_epsilon(history, delta, accountant)


def _accountant_epsilon(
    history: tuple[tuple[float, float, int], ...], delta: float, accountant: str
) -> float:
    if accountant == "prv":
        prv = PRVAccountant()
        prv.history = list(history)
        # q = 1 (a plain Gaussian release) makes Opacus take log(1 - q) = -inf, by design
        with np.errstate(divide="ignore"):
            coarse = float(prv.get_epsilon(delta=delta, eps_error=PRV_EPS_ERROR))
            if coarse * PRV_RELATIVE_ERROR >= PRV_EPS_ERROR:
                return coarse
            error = max(coarse * PRV_RELATIVE_ERROR, 1e-4)
            return float(prv.get_epsilon(delta=delta, eps_error=error))
    if accountant == "rdp":
        rdp = RDPAccountant()
        rdp.history = list(history)
        return float(rdp.get_epsilon(delta=delta))
    raise ValueError(f"unknown accountant {accountant!r}")


def _digest(payload: dict[str, Any]) -> str:
    text = json.dumps(payload, sort_keys=True, separators=(",", ":"), allow_nan=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


class PrivacyLedger:
    """A platform's persistent, hash-chained record of spent privacy budget."""

    def __init__(self, path: Path, header: dict[str, Any], entries: list[dict[str, Any]]) -> None:
        self.path = path
        self.header = header
        self.entries = entries

    @classmethod
    def open(
        cls,
        state_dir: Path | str,
        platform: str,
        delta: float,
        epsilon_budget: float,
        dataset_size: int,
        unit: str = EXAMPLE,
    ) -> PrivacyLedger:
        """Load and verify the platform's ledger, or start an empty one (written on first round).

        The header (platform, δ, budget, privacy unit, ``dataset_size`` in that unit: training
        units or users) is fixed when the ledger is created: a later run with other values is
        refused rather than silently re-based — a budget spent per example says nothing per
        user, and the reverse.
        """
        noun = "users" if unit == USER else "training units"
        if not 0 < delta < 1 / dataset_size:
            raise LedgerError(
                f"dp.delta = {delta:g} must be in (0, 1/N) = (0, {1 / dataset_size:.3g}) "
                f"for the {dataset_size} {noun} of platform {platform!r}"
            )
        path = Path(state_dir) / LEDGER_FILE
        header = {
            "format": FORMAT,
            "platform": platform,
            "privacy_unit": PRIVACY_UNITS[unit],
            "delta": delta,
            "epsilon_budget": epsilon_budget,
            "dataset_size": dataset_size,
        }
        if not path.exists():
            return cls(path, header, [])
        ledger = cls.load(path)
        if ledger.unit != unit:
            raise LedgerError(
                f"{path}: ledger was created for privacy unit {ledger.unit!r}, this run has "
                f"dp.unit = {unit!r}; use a new state folder to start a new budget"
            )
        for key, value in header.items():
            if key != "privacy_unit" and ledger.header.get(key) != value:
                raise LedgerError(
                    f"{path}: ledger was created with {key} = {ledger.header.get(key)!r}, "
                    f"this run has {value!r}; use a new state folder to start a new budget"
                )
        return ledger

    @classmethod
    def load(cls, path: Path | str) -> PrivacyLedger:
        """Read a ledger file and verify its hash chain."""
        path = Path(path)
        try:
            document = json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise LedgerError(f"{path}: no privacy ledger") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise LedgerError(f"{path}: not valid JSON ({err})") from None
        if not isinstance(document, dict) or document.get("header", {}).get("format") != FORMAT:
            raise LedgerError(f"{path}: not a FedFuse privacy ledger ({FORMAT})")
        ledger = cls(path, document["header"], list(document.get("entries", [])))
        ledger.verify()
        return ledger

    def verify(self) -> None:
        """Raise :class:`LedgerError` naming the first entry whose hash or link is wrong."""
        previous = _digest(self.header)
        for index, entry in enumerate(self.entries):
            body = {k: v for k, v in entry.items() if k != "hash"}
            if entry.get("prev_hash") != previous or entry.get("hash") != _digest(body):
                raise LedgerError(f"{self.path}: entry {index} fails its hash check (tampered?)")
            previous = entry["hash"]

    @property
    def delta(self) -> float:
        return float(self.header["delta"])

    @property
    def budget(self) -> float:
        return float(self.header["epsilon_budget"])

    @property
    def unit(self) -> str | None:
        return unit_of(str(self.header["privacy_unit"]))

    def mechanisms(self) -> list[Mechanism]:
        return [
            Mechanism(
                e["noise_multiplier"],
                e["sample_rate"],
                e["steps"],
                e["max_grad_norm"],
                e.get("kind", DP_SGD),
                str(e.get("unit", self.unit or EXAMPLE)),  # an unknown unit: audited as example
            )
            for e in self.entries
        ]

    def spent(self) -> float:
        """Cumulative ε (PRV) of every recorded round."""
        return self.entries[-1]["epsilon_prv"] if self.entries else 0.0

    @contextmanager
    def _synchronised(self) -> Iterator[None]:
        """Hold the platform's ledger lock and reload the file: it, not memory, is the truth.

        Several processes can serve one platform over a run (Ray actors in simulation, a
        restarted SuperNode): each must compose what the others recorded, or an entry written
        elsewhere would be overwritten and ε under-reported.
        """
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.path.with_name(f".{LEDGER_FILE}.lock"), "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if self.path.exists():
                    stored = PrivacyLedger.load(self.path)
                    if stored.header != self.header:
                        raise LedgerError(f"{self.path}: ledger header changed on disk")
                    self.entries = stored.entries
                yield
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)

    def check(self, mechanism: Mechanism) -> float:
        """ε after ``mechanism``; raises :class:`BudgetExhausted` if it would pass the budget."""
        with self._synchronised():
            return self._projected(mechanism)

    def _projected(self, mechanism: Mechanism) -> float:
        projected = epsilon([*self.mechanisms(), mechanism], self.delta)
        if projected > self.budget:
            raise BudgetExhausted(
                f"privacy budget exhausted for platform {self.header['platform']!r}: "
                f"spent ε = {self.spent():.3f}, next round would reach ε = {projected:.3f} "
                f"> budget {self.budget:g} (δ = {self.delta:g})"
            )
        return projected

    def charge(
        self,
        server_round: int,
        mechanism: Mechanism,
        run: str = "",
        evidence: dict[str, Any] | None = None,
        reply_lost: bool = False,
    ) -> dict[str, Any]:
        """Record ``mechanism`` for ``server_round`` of ``run`` *before* it runs, under the
        ledger lock.

        Check and append are one atomic step, so two processes serving one platform cannot
        both pass the check, and a round this run already has in the ledger is refused
        (:class:`RoundAlreadyCharged`): no restart, replay or duplicate message trains a round
        twice or takes the platform past its budget. Rounds are keyed by run, so several runs
        can spend one platform's budget in turn (a shared ``dp.state_dir``). A round that fails
        after its charge stays charged: the noise it would have drawn is spent either way, which
        errs on the safe side. A mechanism of another privacy unit than the ledger's is refused.
        ``evidence``: the platform's own check of the step about to run and the identity of the
        code running it (``client/step_check.py``), hash-chained with the entry.

        ``reply_lost``: the platform holds no stored reply to this round (it failed before its
        answer was stored, e.g. on a full disk, so nothing was sent). Only this run's latest
        charged round may then be charged once more, as a new entry (``attempt`` 2, 3, …): the
        retry draws new noise, so it is a second mechanism and costs its own ε, and the run can
        resume instead of being refused that round for ever.
        """
        if self.unit is not None and mechanism.unit != self.unit:
            raise LedgerError(
                f"{self.path}: a {mechanism.unit}-level mechanism cannot be charged to a ledger "
                f"of privacy unit {self.unit!r}"
            )
        with self._synchronised():
            charged = [
                e
                for e in self.entries
                if e["server_round"] == server_round and e.get("run", "") == run
            ]
            ours = [e["server_round"] for e in self.entries if e.get("run", "") == run]
            retry = bool(charged) and reply_lost and max(ours) == server_round
            if charged and not retry:
                raise RoundAlreadyCharged(
                    f"platform {self.header['platform']!r} already spent round {server_round} "
                    f"of run {run or '(unnamed)'} (ledger entry {charged[0]['index']}, "
                    f"{charged[0]['recorded_at']}); a round is never trained or charged twice"
                )
            self._projected(mechanism)
            mechanisms = [*self.mechanisms(), mechanism]
            body = {
                "index": len(self.entries),
                "run": run,
                "server_round": server_round,
                **({"attempt": len(charged) + 1} if retry else {}),
                **asdict(mechanism),
                "delta": self.delta,
                "epsilon_prv": epsilon(mechanisms, self.delta, "prv"),
                "epsilon_rdp": epsilon(mechanisms, self.delta, "rdp"),
                "recorded_at": datetime.now(UTC).isoformat(timespec="seconds"),
                **({"evidence": evidence} if evidence is not None else {}),
                "prev_hash": self.entries[-1]["hash"] if self.entries else _digest(self.header),
            }
            entry = {**body, "hash": _digest(body)}
            self._write([*self.entries, entry])
            self.entries.append(entry)
        return entry

    def _write(self, entries: list[dict[str, Any]]) -> None:
        text = json.dumps({"header": self.header, "entries": entries}, indent=2, allow_nan=False)
        atomic_write(self.path, text + "\n")
