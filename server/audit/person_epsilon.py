"""A person's ε across the federation: the guarantee for someone present on several platforms.

A platform's ledger bounds what its releases reveal about its own data. One person is usually on
several platforms (942 of 943 ML-100K users are on two or more), and each platform's mechanisms
read only that platform's data and draw their own noise: for that person they are independent
mechanisms, so their privacy losses compose. The person's ε on a set of platforms is the ε of
the union of those platforms' ledger entries (every DP-SGD round and every released statistic,
such as the popularity prior) at the run's δ.

For k = 1 … n this module gives the worst case over every k-subset of the run's n platforms:
what a person present on any k of them is promised. With at most ``MAX_EXACT`` platforms every
subset is enumerated with dp_accounting's PLD (each platform's PLD is built once; a subset is its
parent subset's PLD composed with one more platform's, so 2ⁿ − 1 cheap convolutions instead of
rebuilding every platform for every subset), and the worst subset's ε is recomputed with
FedFuse's own accountant (Opacus PRV, :func:`client.ledger.epsilon`) so the audit can compare the
two. Beyond ``MAX_EXACT`` only k = 1 (each platform alone) and k = n (all of them) are computed,
both exactly: the worst k-subset for 1 < k < n lies between those two figures, since composing
one more mechanism never lowers ε. Taking the k platforms of largest ε alone would not do: a
heavy-tailed mechanism can have the larger ε alone and the smaller ε composed (see the tests).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from functools import reduce
from typing import Any

from dp_accounting.pld import privacy_loss_distribution
from dp_accounting.pld.privacy_loss_distribution import PrivacyLossDistribution

from client.ledger import EXAMPLE, USER, Mechanism, PrivacyLedger, epsilon

# 2ⁿ − 1 subsets, ≈ 10 ms each for ML-100K-sized ledgers: 5 s at 5 platforms, a minute at 12
# (2-core development machine).
MAX_EXACT = 12


def what_it_bounds(units: dict[str, str | None]) -> str:
    """What the composed ε of these platforms (name → unit) is about, in plain words."""
    names = list(units)
    one = len(names) == 1
    by_unit = {unit: [n for n in names if units[n] == unit] for unit in (EXAMPLE, USER, None)}
    if by_unit[None]:
        return (
            f"unknown: the privacy unit of {', '.join(by_unit[None])} is not recognised, "
            "so what this ε protects cannot be stated"
        )
    if not by_unit[USER]:
        where = "this platform" if one else f"each of these {len(names)} platforms"
        return (
            f"what the run reveals about one training example of that person on {where} "
            "(not the person's whole data there)"
        )
    if not by_unit[EXAMPLE]:
        where = "this platform" if one else f"these {len(names)} platforms"
        return f"what the run reveals about everything that person contributed on {where}"
    return (
        "what the run reveals about one training example of that person on each of "
        f"{', '.join(by_unit[EXAMPLE])} and everything that person contributed on "
        f"{', '.join(by_unit[USER])}"
    )


def platform_pld(entries: list[dict[str, Any]], grid: float) -> PrivacyLossDistribution | None:
    """dp_accounting's PLD of one ledger's entries; None when an entry has σ = 0 (ε = ∞).

    Built as dp_accounting's PLDAccountant builds it for the event the audit composes per entry
    (``PoissonSampledDpEvent(q, GaussianDpEvent(σ))`` ``steps`` times, add-or-remove-one
    neighbours, ledger order, value discretisation ``grid``), but kept as an object, because
    the accountant cannot compose another accountant's PLD: each subset of platforms is then
    one convolution rather than a rebuild (≈ 0.35 s per ML-100K platform).
    """
    pld = privacy_loss_distribution.identity(value_discretization_interval=grid)
    for entry in entries:
        if entry["noise_multiplier"] <= 0:
            return None
        pld = pld.compose(
            privacy_loss_distribution.from_gaussian_mechanism(
                entry["noise_multiplier"],
                sampling_prob=entry["sample_rate"],
                value_discretization_interval=grid,
            ).self_compose(entry["steps"])
        )
    return pld


def _compose(
    first: PrivacyLossDistribution | None, second: PrivacyLossDistribution | None
) -> PrivacyLossDistribution | None:
    return None if first is None or second is None else first.compose(second)


def _pld_epsilon(pld: PrivacyLossDistribution | None, delta: float) -> float:
    return math.inf if pld is None else float(pld.get_epsilon_for_delta(delta))


def _subsets(
    plds: list[PrivacyLossDistribution | None],
) -> Iterator[tuple[tuple[int, ...], PrivacyLossDistribution | None]]:
    """(platform indices, composed PLD) of every non-empty subset, depth first; beyond
    ``MAX_EXACT`` platforms, of each platform alone and of all of them."""
    if len(plds) > MAX_EXACT:
        yield from (((i,), pld) for i, pld in enumerate(plds))
        yield tuple(range(len(plds))), reduce(_compose, plds)
        return

    def extend(
        start: int, chosen: tuple[int, ...], pld: PrivacyLossDistribution | None
    ) -> Iterator[tuple[tuple[int, ...], PrivacyLossDistribution | None]]:
        for index in range(start, len(plds)):
            subset = (*chosen, index)
            composed = plds[index] if not chosen else _compose(pld, plds[index])
            yield subset, composed
            yield from extend(index + 1, subset, composed)

    yield from extend(0, (), None)


def _prv_epsilon(ledgers: list[PrivacyLedger], delta: float) -> float:
    """FedFuse's accountant over the union of the ledgers' entries.

    Sorted by (σ, q) so equal mechanisms (every platform's popularity prior, a platform's
    rounds) merge into one history entry: independent mechanisms compose in any order, and the
    PRV accountant's cost grows with distinct entries.
    """
    mechanisms: list[Mechanism] = sorted(
        (m for ledger in ledgers for m in ledger.mechanisms()),
        key=lambda m: (m.noise_multiplier, m.sample_rate),
    )
    if any(m.noise_multiplier <= 0 for m in mechanisms):
        return math.inf
    return epsilon(mechanisms, delta)


def person_epsilon(ledgers: list[PrivacyLedger], delta: float, grid: float) -> dict[str, Any]:
    """The worst-case ε of a person present on k of the ledgers' platforms, for each k.

    ``grid`` is the PLD's value discretisation interval (the audit passes its own). Each row:
    k, the worst k-subset's platforms (found with PLD), its ε by FedFuse's PRV accountant and by
    dp_accounting's PLD, and what that ε is about (the platforms' recorded privacy units).
    """
    names = [str(ledger.header["platform"]) for ledger in ledgers]
    plds = [platform_pld(ledger.entries, grid) for ledger in ledgers]
    worst: dict[int, tuple[float, tuple[int, ...]]] = {}
    for subset, pld in _subsets(plds):
        value = _pld_epsilon(pld, delta)
        if len(subset) not in worst or value > worst[len(subset)][0]:
            worst[len(subset)] = (value, subset)
    rows = []
    for k, (value, subset) in sorted(worst.items()):
        units = {names[i]: ledgers[i].unit for i in subset}
        rows.append(
            {
                "k": k,
                "platforms": [names[i] for i in subset],
                "epsilon_prv": _prv_epsilon([ledgers[i] for i in subset], delta),
                "epsilon_pld": value,
                "bounds": what_it_bounds(units),
            }
        )
    return {
        "delta": delta,
        "platforms": len(ledgers),
        "every_subset": len(ledgers) <= MAX_EXACT,
        "rows": rows,
    }
