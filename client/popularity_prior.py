"""The platform's item-popularity prior, released once under the Gaussian mechanism.

Item popularity ranks held-out items far better than an untrained text model, so the scorer
adds it as a feature. Counting is a function of the platform's data, so under DP it is a
mechanism like any other: a histogram over catalogue items plus N(0, σ²) noise per item. Each
privacy unit's contribution to the histogram has L2 norm at most 1 (:func:`unit_histogram`),
so the L2 sensitivity is 1 and the release is a Gaussian mechanism with noise multiplier σ,
recorded in the platform's ledger in its unit (q = 1, one step) before anything is drawn and
composed with every DP-SGD round.

The noisy counts are released once per platform and budget: they are kept in the state folder
and reused by every later round, process and restart, and never sent to the server (only the
scorer's learned weight of the prior is shared). Without DP the exact counts are used.
"""

from __future__ import annotations

import fcntl
import json
import math
from collections import Counter
from pathlib import Path

import numpy as np

from client.ledger import EXAMPLE, GAUSSIAN_HISTOGRAM, USER, LedgerError, Mechanism, PrivacyLedger
from common.atomic import atomic_write
from common.task import PlatformTask

PRIOR_FILE = "popularity_prior.json"
FORMAT = "fedfuse-popularity-prior/1"


def positive_counts(task: PlatformTask) -> dict[str, float]:
    """Positive train examples per item: the true histogram (raw popularity, no DP)."""
    return {
        item: float(n) for item, n in Counter(e.candidate for e in task.train if e.label).items()
    }


def unit_histogram(task: PlatformTask, unit: str) -> dict[str, float]:
    """The histogram the release noises, one privacy unit adding a vector of L2 norm ≤ 1.

    ``example``: the positive train examples per item (one adds 1 to one count). ``user``: one
    person likes many items, so each user adds their counts of liked items scaled to norm 1
    — 1/√n to each of n distinct items; among contributions of norm 1 that one adds the most
    to the histogram's total.
    """
    if unit != USER:
        return positive_counts(task)
    liked: dict[str, Counter[str]] = {}
    for example in task.train:
        if example.label:
            liked.setdefault(example.user, Counter())[example.candidate] += 1
    histogram: Counter[str] = Counter()
    for counts in liked.values():
        norm = math.sqrt(sum(n * n for n in counts.values()))
        histogram.update({item: n / norm for item, n in counts.items()})
    return dict(histogram)


def prior_mechanism(noise_multiplier: float, unit: str = EXAMPLE) -> Mechanism:
    """The release as the ledger records it: one Gaussian step on the whole histogram."""
    return Mechanism(noise_multiplier, 1.0, 1, 1.0, GAUSSIAN_HISTOGRAM, unit)


def prior_scores(counts: dict[str, float]) -> dict[str, float]:
    """Standardised log counts (mean 0, sd 1 over the catalogue): the scorer's prior feature.

    Negative noisy counts are clipped to 0 first (post-processing, no privacy cost).
    """
    values = np.log1p(np.clip(np.array(list(counts.values()), dtype=np.float64), 0, None))
    spread = values.std() or 1.0
    return dict(zip(counts, ((values - values.mean()) / spread).tolist(), strict=True))


def popularity_prior(
    state_dir: Path,
    task: PlatformTask,
    items: list[str],
    noise_multiplier: float | None,
    ledger: PrivacyLedger | None,
) -> dict[str, float]:
    """This platform's prior counts: the stored release, a new DP one (with ``ledger``), or
    the exact counts (no DP and nothing stored).

    A stored release always wins — evaluating a DP run's model with DP off must still use
    what the platform released, not its raw counts. A new DP release is charged to the ledger
    first (the budget check raises before any noise is drawn) and stored atomically; a lock
    on the state folder makes concurrent processes of one platform share a single release.
    """
    path = state_dir / PRIOR_FILE
    if path.exists():
        return read_prior(path, noise_multiplier if ledger is not None else None)
    if ledger is None or noise_multiplier is None:
        exact = positive_counts(task)
        return {item: exact.get(item, 0.0) for item in items}
    state_dir.mkdir(parents=True, exist_ok=True)
    with open(state_dir / f".{PRIOR_FILE}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if path.exists():
            return read_prior(path, noise_multiplier)
        unit = str(ledger.unit)
        ledger.charge(0, prior_mechanism(noise_multiplier, unit))
        noise = np.random.default_rng().normal(0.0, noise_multiplier, len(items))  # OS entropy
        exact = unit_histogram(task, unit)
        noisy = np.array([exact.get(item, 0.0) for item in items]) + noise
        document = {
            "format": FORMAT,
            "platform": ledger.header["platform"],
            "mechanism": GAUSSIAN_HISTOGRAM,
            "noise_multiplier": noise_multiplier,
            "privacy_unit": unit,
            "l2_sensitivity": 1.0,
            "counts": dict(zip(items, noisy.tolist(), strict=True)),
        }
        atomic_write(path, json.dumps(document, indent=1) + "\n")
        return document["counts"]


def read_prior(path: Path, noise_multiplier: float | None = None) -> dict[str, float]:
    """A stored release; refused if it was made with another σ than ``noise_multiplier``."""
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
        if document["format"] != FORMAT:
            raise ValueError(f"format {document['format']!r}")
        stored = float(document["noise_multiplier"])
        counts = {str(k): float(v) for k, v in document["counts"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError) as err:
        raise LedgerError(f"{path}: not a FedFuse popularity prior ({err})") from None
    if noise_multiplier is not None and not math.isclose(stored, noise_multiplier):
        raise LedgerError(
            f"{path}: released with σ = {stored:g}, this run has prior.noise_multiplier = "
            f"{noise_multiplier:g}; use a new state folder to start a new budget"
        )
    return counts
