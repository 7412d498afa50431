"""Empirical privacy check: the one-run ε lower bound, the canaries, and the acceptance test
"with noise switched off the audit flags the run; with correct DP it does not"."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import opacus.optimizers.optimizer as opacus_optimizer
import pytest
import torch

from client.canaries import insert_canaries, make_canaries
from client.platform_client import PlatformClient, PlatformIdentity
from common.adapters import save_adapter, trainable_arrays
from common.backbone import load_backbone
from common.config import RunConfig, load_config
from common.errors import ConfigError, DataError
from common.model import build_scorer
from common.platform_data import read_platform
from common.platform_writer import write_dataset
from common.synthetic import SyntheticConfig, generate
from common.task import Example, PlatformTask, build_task, training_units
from server.audit.canary_audit import (
    AUDIT_FILE,
    audit_scores,
    check_audit_platform,
    epsilon_lower_bound,
    guess_counts,
    p_value,
    run_canary_audit,
)
from server.federation.run_record import RunRecord
from server.simulation.simulation import prepare_run, simulate

# --- the bound -----------------------------------------------------------------------------


def test_all_correct_guesses_give_the_closed_form() -> None:
    """v = r: P[Binomial(r, q) >= r] = q^r = β, so ε = ln(q / (1 - q)) with q = β^(1/r)."""
    q = 0.05 ** (1 / 100)
    assert epsilon_lower_bound(100, 100, 100, 0.0, 0.05) == pytest.approx(
        math.log(q / (1 - q)), abs=1e-9
    )
    assert epsilon_lower_bound(1000, 100, 100, 0.0, 0.05) == pytest.approx(3.493, abs=1e-3)


def test_the_bound_grows_with_correct_guesses_and_is_zero_at_chance() -> None:
    bounds = [epsilon_lower_bound(1000, 200, v, 1e-6, 0.05) for v in range(80, 201, 5)]
    assert all(a <= b for a, b in zip(bounds, bounds[1:], strict=False))
    assert bounds[-1] > bounds[len(bounds) // 2] > 0
    assert epsilon_lower_bound(1000, 200, 100, 0.0, 0.05) == 0.0  # chance level
    assert epsilon_lower_bound(1000, 200, 60, 0.0, 0.05) == 0.0  # worse than chance


def test_delta_weakens_the_bound() -> None:
    bounds = [epsilon_lower_bound(500, 100, 90, d, 0.05) for d in (0, 1e-6, 1e-5, 1e-4, 1e-3)]
    assert all(a > b for a, b in zip(bounds, bounds[1:], strict=False))
    assert bounds[-1] > 0


def test_the_p_value_at_the_bound_is_the_significance_level() -> None:
    bound = epsilon_lower_bound(1000, 100, 85, 1e-6, 0.05)
    assert p_value(1000, 100, 85, bound, 1e-6) == pytest.approx(0.05, rel=1e-6)
    values = [p_value(1000, 100, 85, eps, 1e-6) for eps in np.linspace(0, 4, 41)]
    assert all(a <= b for a, b in zip(values, values[1:], strict=False))


def test_guessing_uses_the_declared_grid_with_bonferroni() -> None:
    assert guess_counts(100) == [5, 10, 25, 50] and guess_counts(4) == [1, 2]
    included = np.arange(100) % 2 == 0
    perfect = audit_scores(included.astype(float), included, 0.0, 0.95)
    assert (perfect.guesses, perfect.correct) == (100, 100)
    # all 100 correct at β = 0.05 / 4 (four grid points)
    q = (0.05 / 4) ** (1 / 100)
    assert perfect.epsilon_lower_bound == pytest.approx(math.log(q / (1 - q)), abs=1e-9)
    noise = np.random.default_rng(0).normal(size=100)
    assert audit_scores(noise, included, 0.0, 0.95).epsilon_lower_bound == 0.0


# --- the canaries --------------------------------------------------------------------------


def test_canaries_are_reproducible_from_their_seed() -> None:
    first, again, other = (
        make_canaries(200, 7),
        make_canaries(200, 7),
        make_canaries(200, 8),
    )
    assert first.examples == again.examples and np.array_equal(first.included, again.included)
    assert not np.array_equal(first.included, other.included)
    assert 70 < first.included.sum() < 130  # Bernoulli(1/2)
    assert len(set(first.item_text.values())) == len(first.item_text)  # all items distinct
    assert {e.label for e in first.examples} == {0, 1}
    assert all(len(e.negatives) == 1 for e in first.examples)  # the decoy


def test_only_included_canaries_enter_the_train_split() -> None:
    canaries = make_canaries(20, 0)
    task = PlatformTask(platform="p0")
    text = insert_canaries(task, {"i1": "real item"}, canaries, "softmax")
    assert task.train == canaries.members("softmax")
    assert len(task.train) == canaries.included.sum()
    kept = [e for e, keep in zip(canaries.examples, canaries.included, strict=True) if keep]
    for unit, canary in zip(
        task.train, kept, strict=True
    ):  # the label-1 item of the pair is the liked one
        liked, other = (canary.candidate, canary.negatives[0])[:: 1 if canary.label else -1]
        assert (unit.candidate, unit.negatives, unit.label) == (liked, (other,), 1)
    assert all(not e.negatives for e in canaries.members("bce"))
    assert text["i1"] == "real item" and set(canaries.item_text) < set(text)
    # each canary is a user of its own: one privacy unit under dp.unit = 'user' too
    assert len({e.user for e in task.train}) == len(task.train)
    with pytest.raises(DataError, match="item id .* reserved for audit canaries"):
        insert_canaries(PlatformTask(platform="p0"), dict(canaries.item_text), canaries, "bce")
    taken = PlatformTask(platform="p0", train=[Example("canary:3", (), "i1", 1)])
    with pytest.raises(DataError, match="user id 'canary:3' is reserved for audit canaries"):
        insert_canaries(taken, {"i1": "real item"}, canaries, "bce")


def test_audit_settings_are_checked(synthetic_dir: Path) -> None:
    with pytest.raises(ConfigError, match="canary_platform"):
        load_config(None, ["audit.canaries=10"])
    with pytest.raises(ConfigError, match="at least 2"):
        load_config(None, ["audit.canaries=1", "audit.canary_platform=p0"])
    config = load_config(
        None, [f"data.path='{synthetic_dir}'", "audit.canaries=10", "audit.canary_platform=p9"]
    )
    with pytest.raises(ConfigError, match="not one of"):
        check_audit_platform(config)
    assert load_config().audit.canaries == 0  # off by default


# --- acceptance: missing noise is caught, correct DP passes --------------------------------

# Low enough that a run without noise beats it by a wide margin on any machine: the undefended
# run's bound varies with the initialisation (0.78-1.04 over torch seeds 0-3, against 0 for
# every seed with DP), and at ε = 0.5 with 200 canaries one machine once measured it below 0.5.
CANARIES = 400
CLAIMED_EPSILON = 0.3


@pytest.fixture(scope="module")
def small_platform(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One small platform, so that the canaries are a large share of what it trains on."""
    tables = generate(SyntheticConfig(platforms=1, users=3, items=20, interactions_per_user=6))
    return write_dataset(tmp_path_factory.mktemp("small") / "data", tables)


def _audit_config(data: Path, backbone: Path, state: Path) -> RunConfig:
    """Platform p0 alone (31 train examples) with 400 canaries: one round of 100 full-batch (q = 1)
    DP-SGD steps at a high learning rate, so canaries get memorised when nothing stops it. The
    popularity prior's noise is raised so that the small claimed ε leaves room for training."""
    return load_config(
        None,
        [
            f"data.path='{data}'",
            f"model.backbone='{backbone}'",
            "task.split='leave_last'",
            "task.history_len=5",
            "model.max_length=16",
            "model.private_factors=0",
            "model.item_score=true",  # a per-item score memorises the canaries in one run
            "lora.rank=4",
            "train.local_steps=100",
            "train.learning_rate=0.05",
            "train.batch_size=128",
            "train.adapter_every=1",
            "dp.gradient_scales={}",
            "prior.noise_multiplier=40",
            f"dp.target_epsilon={CLAIMED_EPSILON}",
            "dp.delta=1e-5",
            "dp.expected_batch_size=1000",  # capped at N: q = 1
            f"dp.state_dir='{state}'",
            "federation.rounds=1",
            "federation.schedule='rounds'",
            "federation.min_nodes=1",
            "federation.fraction_evaluate=0",
            f"audit.canaries={CANARIES}",
            "audit.canary_platform=p0",
        ],
    )


def _audit_entry(run_dir: Path) -> dict[str, object]:
    document = json.loads((run_dir / AUDIT_FILE).read_text(encoding="utf-8"))
    assert document["confidence"] == 0.95 and len(document["platforms"]) == 1
    entry = document["platforms"][0]
    assert entry["platform"] == "p0" and entry["canaries"] == CANARIES and entry["delta"] == 1e-5
    assert 0 < entry["correct"] <= entry["guesses"] <= CANARIES and entry["canary_seed"] == 0
    assert entry["epsilon_theoretical"] == pytest.approx(CLAIMED_EPSILON, rel=0.01)
    return entry


def _train_and_audit(tmp_path: Path, data: Path, backbone: Path) -> dict[str, object]:
    """The run of ``_audit_config`` in this process, with torch's generator seeded (so the DP
    noise too is the same on every run), then the audit as ``fedfuse simulate`` does it."""
    config = _audit_config(data, backbone, tmp_path / "state")
    client = PlatformClient(PlatformIdentity("p0", data / "p0", tmp_path / "state" / "p0"), config)
    fresh = build_scorer(load_backbone(str(backbone))[0], config.model, config.lora)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a Ray actor; two threads thrash on a busy 2-core machine
    torch.manual_seed(0)
    try:
        client.train_round(1, trainable_arrays(fresh, client.shared), config.train.learning_rate)
    finally:
        torch.set_num_threads(threads)
    save_adapter(client.scorer, tmp_path / "adapter")
    run_canary_audit(config, tmp_path, tmp_path / "adapter")
    return _audit_entry(tmp_path)


def test_without_noise_the_audit_flags_the_run_and_with_dp_it_does_not(
    tmp_path: Path, small_platform: Path, tiny_bert_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    correct = _train_and_audit(tmp_path / "dp", small_platform, tiny_bert_dir)
    assert correct["epsilon_lower_bound"] <= correct["epsilon_theoretical"]
    assert not correct["flagged"]

    # The bug: DP-SGD adds no noise, while Opacus' accountant (and so the ledger) still
    # records the calibrated σ and claims the same ε.
    monkeypatch.setattr(
        opacus_optimizer, "_generate_noise", lambda std, reference, **_: torch.zeros_like(reference)
    )
    leaky = _train_and_audit(tmp_path / "no-noise", small_platform, tiny_bert_dir)
    assert leaky["flagged"]
    # measured: 152-162 of 200 right, ε >= 0.78-1.04 over torch seeds 0-3
    assert leaky["epsilon_lower_bound"] > 2 * CLAIMED_EPSILON


@pytest.mark.ray
def test_fedfuse_simulate_writes_the_audit_into_the_run_folder(
    tmp_path: Path, small_platform: Path, tiny_bert_dir: Path
) -> None:
    """`fedfuse simulate` with audit.* set: canaries on p0 (in its Ray actor), the audit of the
    final global adapter in RUN_DIR/canary_audit.json."""
    config = _audit_config(small_platform, tiny_bert_dir, tmp_path / "unused")
    run = simulate(prepare_run(config, tmp_path / "runs", "audited"))
    entry = _audit_entry(run)
    # the recipe keeps item factors and mixing weights private: the served model includes them
    assert entry["model"] == "final global adapter + the platform's private part"
    # the platform trained on its real training units plus the included canaries
    task = build_task(read_platform(small_platform / "p0"), config.task)
    real = len(training_units(task.train, config.objective))
    train = next(e for e in RunRecord(run).events() if e["event"] == "train")
    assert train["num-examples"] == real + entry["included"]
    # Not asserted: "not flagged". The actor's DP noise is not seeded, and the bound only
    # promises 95 %; the seeded test above checks correct DP deterministically.
