"""A person's ε across the federation: the worst case over every k-subset of platforms, checked
against an independent dp_accounting computation written here, and through ``fedfuse audit``.

The PLD uses the audit's own discretisation (``PLD_GRID`` = 10⁻³, pessimistic: still an upper
bound), which keeps the whole file to a few seconds besides the shared finished run.
"""

from __future__ import annotations

import itertools
import math
from pathlib import Path
from typing import Any

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant

from client.ledger import (
    DP_SGD,
    GAUSSIAN_HISTOGRAM,
    PRIVACY_UNITS,
    Mechanism,
    PrivacyLedger,
    epsilon,
    unit_of,
)
from server.audit.audit import audit
from server.audit.audit_report import person_heading, render_html, summary_text
from server.audit.ledger_checks import PLD_GRID, agree, audit_ledger, recompute
from server.audit.person_epsilon import (
    EXAMPLE,
    MAX_EXACT,
    USER,
    person_epsilon,
    what_it_bounds,
)

DELTA = 1e-5
PRIOR = (10.0, 1.0, 1)  # the popularity prior's one Gaussian release (σ, q, steps)


def _ledger(name: str, *entries: tuple[float, float, int], unit: str = EXAMPLE) -> PrivacyLedger:
    """An in-memory ledger of (σ, q, steps) entries; ``PRIOR`` is recorded as a histogram."""
    keys = ("noise_multiplier", "sample_rate", "steps")
    rows = [
        {
            **dict(zip(keys, entry, strict=True)),
            "max_grad_norm": 1.0,
            "kind": GAUSSIAN_HISTOGRAM if entry == PRIOR else DP_SGD,
        }
        for entry in entries
    ]
    header = {"platform": name, "privacy_unit": unit, "delta": DELTA, "epsilon_budget": 100.0}
    return PrivacyLedger(Path(f"{name}/privacy_ledger.json"), header, rows)


def _independent(ledgers: list[PrivacyLedger]) -> float:
    """dp_accounting's PLDAccountant over one DpEvent composing every entry of ``ledgers``."""
    accountant = PLDAccountant(value_discretization_interval=PLD_GRID)
    event = dp_accounting.ComposedDpEvent(
        [
            dp_accounting.SelfComposedDpEvent(
                dp_accounting.PoissonSampledDpEvent(
                    e["sample_rate"], dp_accounting.GaussianDpEvent(e["noise_multiplier"])
                ),
                e["steps"],
            )
            for ledger in ledgers
            for e in ledger.entries
        ]
    )
    return float(accountant.compose(event).get_epsilon(DELTA))


# Three platforms with distinct σ, q and steps, each with its popularity prior; "news" changed
# σ on a restart.
THREE = [
    _ledger("shop", PRIOR, (0.9, 0.02, 40), (0.9, 0.02, 40)),
    _ledger("news", PRIOR, (1.1, 0.05, 30), (1.0, 0.05, 10)),
    _ledger("games", PRIOR, (0.7, 0.01, 80)),
]


@pytest.fixture(scope="module")
def three() -> dict[str, Any]:
    return person_epsilon(THREE, DELTA, PLD_GRID)


def test_worst_case_matches_an_independent_dp_accounting_computation(three) -> None:
    assert [row["k"] for row in three["rows"]] == [1, 2, 3] and three["every_subset"]
    for row in three["rows"]:
        subsets = itertools.combinations(THREE, row["k"])
        figures = {tuple(x.header["platform"] for x in s): _independent(list(s)) for s in subsets}
        worst = max(figures, key=figures.__getitem__)
        assert tuple(row["platforms"]) == worst
        assert row["epsilon_pld"] == pytest.approx(figures[worst], rel=1e-4)
        # FedFuse's own accountant on the same union of entries agrees within the audit's bar
        assert agree(row["epsilon_prv"], row["epsilon_pld"])
    everything = [m for ledger in THREE for m in ledger.mechanisms()]
    assert three["rows"][-1]["epsilon_prv"] == pytest.approx(epsilon(everything, DELTA), rel=5e-3)


def test_k_1_is_the_single_platform_figure_and_more_platforms_never_cost_less(three) -> None:
    alone = {
        ledger.header["platform"]: recompute(ledger.entries, DELTA)[0][-1]["pld"]
        for ledger in THREE
    }
    first = three["rows"][0]
    assert first["platforms"] == [max(alone, key=alone.__getitem__)]
    assert first["epsilon_pld"] == pytest.approx(max(alone.values()), rel=1e-9)
    prv = max(epsilon(ledger.mechanisms(), DELTA) for ledger in THREE)
    assert first["epsilon_prv"] == pytest.approx(prv, rel=5e-3)
    figures = [row["epsilon_pld"] for row in three["rows"]]
    assert figures == sorted(figures) and figures[0] < figures[-1]
    assert [row["epsilon_prv"] for row in three["rows"]] == sorted(
        r["epsilon_prv"] for r in three["rows"]
    )


def test_the_worst_pair_need_not_be_the_two_largest_alone() -> None:
    """A heavy-tailed mechanism (one step, q = 10⁻³, σ = 0.35) has the largest ε alone but
    adds little when composed; two Gaussian releases compose to more. Picking the k largest
    would under-report: the audit enumerates."""
    ledgers = [
        _ledger("rare", (0.35, 1e-3, 1)),
        _ledger("steady", (1.5 * math.sqrt(2), 1.0, 2)),
        _ledger("calm", (1.575 * math.sqrt(3), 1.0, 3)),
    ]
    alone = [_independent([ledger]) for ledger in ledgers]
    assert alone == sorted(alone, reverse=True)  # rare > steady > calm on their own
    rows = person_epsilon(ledgers, DELTA, PLD_GRID)["rows"]
    assert rows[1]["platforms"] == ["steady", "calm"]
    assert rows[1]["epsilon_pld"] > _independent(ledgers[:2]) + 0.3
    assert rows[1]["epsilon_pld"] == pytest.approx(_independent(ledgers[1:]), rel=1e-4)


def test_beyond_max_exact_only_one_platform_and_all_of_them_are_computed() -> None:
    ledgers = [_ledger(f"p{i:02d}", (2.0 + 0.1 * i, 1.0, 1)) for i in range(MAX_EXACT + 1)]
    person = person_epsilon(ledgers, DELTA, PLD_GRID)
    assert not person["every_subset"]
    assert [(row["k"], row["platforms"][0]) for row in person["rows"]] == [
        (1, "p00"),
        (MAX_EXACT + 1, "p00"),
    ]
    assert person["rows"][1]["epsilon_pld"] == pytest.approx(_independent(ledgers), rel=1e-4)
    assert f"k = 1 and k = {MAX_EXACT + 1} only" in person_heading({"person_epsilon": person})


def test_zero_noise_makes_every_set_with_that_platform_infinite() -> None:
    rows = person_epsilon(
        [_ledger("a", (1.0, 0.1, 5)), _ledger("b", (0.0, 0.1, 5))], DELTA, PLD_GRID
    )["rows"]
    assert [(r["platforms"], r["epsilon_prv"], r["epsilon_pld"]) for r in rows] == [
        (["b"], math.inf, math.inf),
        (["a", "b"], math.inf, math.inf),
    ]


def test_the_unit_sentence_says_what_the_epsilon_is_about() -> None:
    assert unit_of("example") == unit_of("one labelled example (record-level)") == EXAMPLE
    assert unit_of(PRIVACY_UNITS[EXAMPLE]) == EXAMPLE and unit_of(PRIVACY_UNITS[USER]) == USER
    assert unit_of("user") == USER and unit_of("household") is None
    assert what_it_bounds({"a": EXAMPLE}) == (
        "what the run reveals about one training example of that person on this platform "
        "(not the person's whole data there)"
    )
    assert what_it_bounds({"a": EXAMPLE, "b": EXAMPLE}) == (
        "what the run reveals about one training example of that person on each of these 2 "
        "platforms (not the person's whole data there)"
    )
    assert what_it_bounds({"a": USER, "b": USER, "c": USER}) == (
        "what the run reveals about everything that person contributed on these 3 platforms"
    )
    assert what_it_bounds({"a": EXAMPLE, "b": USER}) == (
        "what the run reveals about one training example of that person on each of a and "
        "everything that person contributed on b"
    )
    assert what_it_bounds({"a": EXAMPLE, "b": None}).startswith(
        "unknown: the privacy unit of b is not recognised"
    )


def test_an_unknown_privacy_unit_is_flagged(tmp_path: Path) -> None:
    ledger = PrivacyLedger.open(tmp_path, "p0", DELTA, 8.0, 1000)
    ledger.header["privacy_unit"] = "household"  # before the first entry hashes the header
    ledger.charge(1, Mechanism(1.0, 0.01, 10, 1.0))
    _, flags = audit_ledger(PrivacyLedger.load(ledger.path))
    assert [f["code"] for f in flags] == ["unknown-privacy-unit"]
    assert "'household'" in flags[0]["message"]


def test_audit_reports_a_persons_epsilon_for_a_real_run(finished_run: Path) -> None:
    report = audit(finished_run)
    person, platforms = report["person_epsilon"], report["platforms"]
    assert person["delta"] == platforms[0]["delta"] and person["platforms"] == 2
    rows = person["rows"]
    assert [row["k"] for row in rows] == [1, 2]
    assert sorted(rows[1]["platforms"]) == sorted(p["platform"] for p in platforms)
    assert rows[0]["epsilon_pld"] == pytest.approx(
        max(p["epsilon_spent_pld_recomputed"] for p in platforms), rel=1e-9
    )
    assert rows[0]["epsilon_prv"] == pytest.approx(
        max(p["epsilon_spent_prv"] for p in platforms), rel=5e-3
    )
    assert rows[0]["epsilon_pld"] < rows[1]["epsilon_pld"]
    assert "one training example of that person on each of these 2 platforms" in rows[1]["bounds"]
    codes = {flag["code"] for flag in report["flags"]}
    assert not codes & {"epsilon-mismatch", "unknown-privacy-unit"}
    printed = summary_text(report)
    assert "A person's ε across the federation" in printed
    assert f"| 2 | {', '.join(rows[1]['platforms'])} |" in printed
    assert "<h2>A person's ε across the federation</h2>" in render_html(report)
