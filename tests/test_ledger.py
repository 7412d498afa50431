"""The ε ledger: composition across rounds and restarts, independent recomputation, integrity."""

from __future__ import annotations

import json
import os
from dataclasses import replace
from pathlib import Path

import dp_accounting
import pytest
from dp_accounting.pld import PLDAccountant
from dp_accounting.rdp import RdpAccountant

from client.ledger import (
    EXAMPLE,
    LEDGER_FILE,
    PRIVACY_UNITS,
    USER,
    BudgetExhausted,
    LedgerError,
    Mechanism,
    PrivacyLedger,
    RoundAlreadyCharged,
    epsilon,
)

ROUNDS = [
    Mechanism(1.1, 0.01, 300, 1.0),
    Mechanism(0.9, 0.02, 150, 1.0),
    Mechanism(1.3, 0.01, 400, 0.5),
]


def independent_epsilon(mechanisms: list[Mechanism], delta: float, kind: str) -> float:
    """Google dp-accounting, composing each round's Poisson-subsampled Gaussian steps."""
    accountant = PLDAccountant() if kind == "pld" else RdpAccountant()
    for m in mechanisms:
        event = dp_accounting.PoissonSampledDpEvent(
            m.sample_rate, dp_accounting.GaussianDpEvent(m.noise_multiplier)
        )
        accountant.compose(event, m.steps)
    return accountant.get_epsilon(delta)


def _open(
    state: Path, budget: float = 50.0, delta: float = 1e-5, unit: str = EXAMPLE
) -> PrivacyLedger:
    return PrivacyLedger.open(state, "kids_family", delta, budget, dataset_size=20_000, unit=unit)


def test_every_recorded_epsilon_is_reproduced_by_dp_accounting(tmp_path: Path) -> None:
    ledger = _open(tmp_path)
    for k, mechanism in enumerate(ROUNDS, start=1):
        ledger.charge(k, mechanism)
    stored = json.loads((tmp_path / LEDGER_FILE).read_text())
    assert stored["header"]["privacy_unit"] == PRIVACY_UNITS[EXAMPLE]
    assert {e["unit"] for e in stored["entries"]} == {EXAMPLE}
    for k, entry in enumerate(stored["entries"]):
        recorded = [
            Mechanism(e["noise_multiplier"], e["sample_rate"], e["steps"], e["max_grad_norm"])
            for e in stored["entries"][: k + 1]
        ]
        pld = independent_epsilon(recorded, entry["delta"], "pld")
        rdp = independent_epsilon(recorded, entry["delta"], "rdp")
        assert entry["epsilon_prv"] == pytest.approx(pld, rel=0.01)
        assert entry["epsilon_rdp"] == pytest.approx(rdp, rel=0.01)
    cumulative = [e["epsilon_prv"] for e in stored["entries"]]
    assert cumulative == sorted(cumulative) and cumulative[0] < cumulative[-1]
    # composition, not the last round alone (the Flower/Opacus example's trap)
    assert cumulative[-1] > 1.2 * epsilon([ROUNDS[-1]], 1e-5)


def test_ledger_survives_a_restart_and_keeps_composing(tmp_path: Path) -> None:
    first = _open(tmp_path)
    first.charge(1, ROUNDS[0])
    again = _open(tmp_path)  # a new process
    assert again.spent() == first.spent() > 0
    again.charge(2, ROUNDS[1])
    assert _open(tmp_path).spent() == pytest.approx(epsilon(ROUNDS[:2], 1e-5))


@pytest.mark.parametrize(
    "tamper",
    [
        lambda doc: doc["entries"][0].update(noise_multiplier=5.0),
        lambda doc: doc["entries"][1].update(epsilon_prv=0.01),
        lambda doc: doc["entries"].pop(0),
        lambda doc: doc["entries"].reverse(),
        lambda doc: doc["header"].update(epsilon_budget=1000.0),
    ],
    ids=["noise-edited", "epsilon-edited", "entry-dropped", "reordered", "budget-raised"],
)
def test_tampering_is_detected(tmp_path: Path, tamper) -> None:
    ledger = _open(tmp_path)
    ledger.charge(1, ROUNDS[0])
    ledger.charge(2, ROUNDS[1])
    path = tmp_path / LEDGER_FILE
    document = json.loads(path.read_text())
    tamper(document)
    path.write_text(json.dumps(document))
    with pytest.raises(LedgerError, match="fails its hash check"):
        PrivacyLedger.load(path)


def test_corrupt_or_foreign_files_are_refused(tmp_path: Path) -> None:
    path = tmp_path / LEDGER_FILE
    path.write_text('{"header": {"format"')
    with pytest.raises(LedgerError, match="not valid JSON"):
        PrivacyLedger.load(path)
    path.write_text('{"some": "thing"}')
    with pytest.raises(LedgerError, match="not a FedFuse privacy ledger"):
        PrivacyLedger.load(path)


def test_budget_is_never_exceeded(tmp_path: Path) -> None:
    one_round = epsilon([ROUNDS[0]], 1e-5)
    two_rounds = epsilon([ROUNDS[0], ROUNDS[0]], 1e-5)
    ledger = _open(tmp_path, budget=(one_round + two_rounds) / 2)
    assert ledger.check(ROUNDS[0]) == pytest.approx(one_round)
    ledger.charge(1, ROUNDS[0])
    with pytest.raises(BudgetExhausted, match="privacy budget exhausted"):
        ledger.check(ROUNDS[0])
    assert len(ledger.entries) == 1


def test_delta_must_be_below_one_over_n(tmp_path: Path) -> None:
    with pytest.raises(LedgerError, match=r"must be in \(0, 1/N\)"):
        PrivacyLedger.open(tmp_path, "p", 1e-3, 8.0, dataset_size=1000)


@pytest.mark.parametrize(
    ("first", "then", "message"),
    [
        ({"budget": 8.0}, {"budget": 16.0}, "epsilon_budget"),
        (
            {"unit": EXAMPLE},
            {"unit": USER},
            "privacy unit 'example', this run has dp.unit = 'user'",
        ),
        (
            {"unit": USER},
            {"unit": EXAMPLE},
            "privacy unit 'user', this run has dp.unit = 'example'",
        ),
    ],
    ids=["budget", "example-then-user", "user-then-example"],
)
def test_a_new_budget_or_unit_needs_a_new_state_folder(
    tmp_path: Path, first: dict, then: dict, message: str
) -> None:
    """A budget is spent in one unit: ε per example says nothing per user, and the reverse."""
    _open(tmp_path, **first).charge(1, replace(ROUNDS[0], unit=first.get("unit", EXAMPLE)))
    with pytest.raises(LedgerError, match=message):
        _open(tmp_path, **then)


def test_a_user_ledger_records_users_and_charges_only_user_level_mechanisms(
    tmp_path: Path,
) -> None:
    ledger = PrivacyLedger.open(tmp_path, "p", 1e-4, 8.0, dataset_size=900, unit=USER)
    with pytest.raises(LedgerError, match="example-level mechanism cannot be charged"):
        ledger.charge(1, ROUNDS[0])
    assert not (tmp_path / LEDGER_FILE).exists()
    ledger.charge(1, replace(ROUNDS[0], unit=USER))
    stored = PrivacyLedger.load(tmp_path / LEDGER_FILE)
    assert stored.unit == USER and stored.header["dataset_size"] == 900
    assert stored.header["privacy_unit"] == PRIVACY_UNITS[USER]
    assert stored.mechanisms() == [replace(ROUNDS[0], unit=USER)]
    with pytest.raises(LedgerError, match=r"\(0, 0.00111\) for the 900 users"):
        PrivacyLedger.open(tmp_path / "other", "p", 1e-2, 8.0, dataset_size=900, unit=USER)


def test_a_ledger_from_before_the_unit_setting_continues_per_example(tmp_path: Path) -> None:
    ledger = _open(tmp_path)
    ledger.header["privacy_unit"] = "one labelled example (record-level)"  # then hashed in
    ledger.charge(1, ROUNDS[0])
    _open(tmp_path).charge(2, ROUNDS[1])
    assert PrivacyLedger.load(tmp_path / LEDGER_FILE).mechanisms() == ROUNDS[:2]
    with pytest.raises(LedgerError, match="privacy unit 'example'"):
        _open(tmp_path, unit=USER)


def test_a_failed_write_leaves_the_previous_ledger_intact(tmp_path: Path, monkeypatch) -> None:
    ledger = _open(tmp_path)
    ledger.charge(1, ROUNDS[0])
    before = (tmp_path / LEDGER_FILE).read_text()

    def crash(*_args: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(OSError):
        ledger.charge(2, ROUNDS[1])
    assert (tmp_path / LEDGER_FILE).read_text() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == [f".{LEDGER_FILE}.lock", LEDGER_FILE]
    assert len(ledger.entries) == 1


def test_two_processes_serving_one_platform_compose_each_others_rounds(tmp_path: Path) -> None:
    """Ray may hand a platform's rounds to different actor processes: none may lose an entry."""
    first, second = _open(tmp_path), _open(tmp_path)  # opened before any round, like two actors
    first.charge(1, ROUNDS[0])
    second.charge(2, ROUNDS[1])
    first.charge(3, ROUNDS[2])
    stored = PrivacyLedger.load(tmp_path / LEDGER_FILE)
    assert [e["server_round"] for e in stored.entries] == [1, 2, 3]
    assert stored.spent() == pytest.approx(epsilon(ROUNDS, 1e-5))
    assert second.check(ROUNDS[0]) == pytest.approx(epsilon([*ROUNDS, ROUNDS[0]], 1e-5))


def test_a_charged_round_is_never_charged_again(tmp_path: Path) -> None:
    """A restarted SuperLink re-sent round 3 and two platforms recorded it twice (issue 11)."""
    _open(tmp_path).charge(1, ROUNDS[0])
    restarted = _open(tmp_path)  # a new process after the restart
    with pytest.raises(RoundAlreadyCharged, match="already spent round 1"):
        restarted.charge(1, ROUNDS[0])
    assert [e["server_round"] for e in PrivacyLedger.load(tmp_path / LEDGER_FILE).entries] == [1]


def _charge_round_two(state: str, budget: float, results: object) -> None:
    ledger = PrivacyLedger.open(state, "kids_family", 1e-5, budget, dataset_size=20_000)
    try:
        ledger.charge(2, ROUNDS[1])
        results.put("charged")  # type: ignore[attr-defined]
    except BudgetExhausted as err:
        results.put(type(err).__name__)  # type: ignore[attr-defined]


def test_concurrent_processes_cannot_both_charge_past_the_budget(tmp_path: Path) -> None:
    """Two `--resume` of one run trained round 2 twice (issue 11): check and append are one
    locked step, so of several processes racing for a round exactly one is charged."""
    import multiprocessing

    budget = epsilon([ROUNDS[0], ROUNDS[1]], 1e-5) * 1.01
    _open(tmp_path, budget=budget).charge(1, ROUNDS[0])
    context = multiprocessing.get_context("spawn")
    results = context.Queue()
    workers = [
        context.Process(target=_charge_round_two, args=(str(tmp_path), budget, results))
        for _ in range(3)
    ]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(timeout=120)
    outcomes = sorted(results.get(timeout=5) for _ in workers)
    assert outcomes == ["RoundAlreadyCharged", "RoundAlreadyCharged", "charged"]
    stored = PrivacyLedger.load(tmp_path / LEDGER_FILE)
    assert [e["server_round"] for e in stored.entries] == [1, 2]
    assert stored.spent() <= budget


def test_an_over_budget_charge_writes_nothing(tmp_path: Path) -> None:
    ledger = _open(tmp_path, budget=epsilon([ROUNDS[0]], 1e-5) * 1.01)
    ledger.charge(1, ROUNDS[0])
    before = (tmp_path / LEDGER_FILE).read_text()
    with pytest.raises(BudgetExhausted, match="privacy budget exhausted"):
        ledger.charge(2, ROUNDS[1])
    assert (tmp_path / LEDGER_FILE).read_text() == before


def test_the_memoised_renyi_divergence_is_opacus_own() -> None:
    """client/ledger.py memoises Opacus' per-order RDP of a sampled Gaussian (a pure function
    of q, σ and the order): it must return exactly what the unmemoised function does, the
    accountants' ε on it must not move, and it stands in for Opacus' function only while the
    ledger's accountants run."""
    from opacus.accountants.analysis import rdp as rdp_analysis

    from client.ledger import _composed_epsilon, _renyi

    original = rdp_analysis._compute_rdp
    assert original is not _renyi and _renyi.__wrapped__ is original
    for q, sigma in [(1 / 18, 0.7061), (0.2, 0.9159), (1.0, 10.0), (0.01, 2.5)]:
        for order in [1.25, 2.0, 7.5, 32.0, 256.0]:
            assert _renyi(q, sigma, order) == original(q, sigma, order)
    history = [Mechanism(10.0, 1.0, 1, 1.0), Mechanism(0.7061, 1 / 18, 55, 1.0)]
    _renyi.cache_clear()
    _composed_epsilon.cache_clear()
    cached = (epsilon(history, 1e-6, "prv"), epsilon(history, 1e-6, "rdp"))
    assert _renyi.cache_info().hits > 0  # the accountants ran on the memoised function
    assert rdp_analysis._compute_rdp is original  # and Opacus has its own back
    _renyi.cache_clear()
    _composed_epsilon.cache_clear()
    assert (epsilon(history, 1e-6, "prv"), epsilon(history, 1e-6, "rdp")) == cached


def test_rounds_are_charged_per_run_so_runs_in_turn_share_one_budget(tmp_path: Path) -> None:
    """Round 1 of a second run on one state folder was refused as 'already spent'."""
    budget = epsilon([ROUNDS[0]] * 2, 1e-5) * 1.01  # two runs' round 1, not a third round
    ledger = _open(tmp_path, budget=budget)
    ledger.charge(1, ROUNDS[0], "run-a")
    ledger.charge(1, ROUNDS[0], "run-b")  # another run's round 1: charged, composed
    with pytest.raises(RoundAlreadyCharged, match="round 1 of run run-a"):
        _open(tmp_path, budget=budget).charge(1, ROUNDS[0], "run-a")
    stored = PrivacyLedger.load(tmp_path / LEDGER_FILE)
    assert [(e["run"], e["server_round"]) for e in stored.entries] == [("run-a", 1), ("run-b", 1)]
    assert stored.spent() == pytest.approx(epsilon([ROUNDS[0]] * 2, 1e-5))
    with pytest.raises(BudgetExhausted, match="budget exhausted"):
        stored.charge(1, ROUNDS[2], "run-c")


def test_a_round_whose_reply_was_lost_is_charged_again_and_audits_clean(tmp_path: Path) -> None:
    """A round charged but never answered (the disk filled before the reply was stored) used
    to be refused for ever, so the run could not resume. Only this run's latest round may be
    charged once more, as a new attempt that costs its own ε; the audit recomputes it."""
    from server.audit.ledger_checks import audit_ledger

    ledger = _open(tmp_path)
    ledger.charge(1, ROUNDS[0], "run-a")
    with pytest.raises(RoundAlreadyCharged):  # a plain duplicate stays refused
        ledger.charge(1, ROUNDS[0], "run-a")
    retry = ledger.charge(1, ROUNDS[0], "run-a", reply_lost=True)
    assert retry["attempt"] == 2
    assert retry["epsilon_prv"] == pytest.approx(epsilon([ROUNDS[0]] * 2, 1e-5))
    ledger.charge(2, ROUNDS[1], "run-a")
    with pytest.raises(RoundAlreadyCharged, match="already spent round 1"):  # not the latest
        ledger.charge(1, ROUNDS[0], "run-a", reply_lost=True)
    stored = PrivacyLedger.load(tmp_path / LEDGER_FILE)  # the chain verifies
    assert [e.get("attempt") for e in stored.entries] == [None, 2, None]
    summary, flags = audit_ledger(stored)
    assert flags == [] and len(summary["rounds"]) == 3
