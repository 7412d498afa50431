"""DP-SGD local training: real updates, exact reference step, clipping per privacy unit
(training unit or user), accounting."""

from __future__ import annotations

import copy
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus.optimizers import DPOptimizer
from torch import nn

from client.dp_training import LocalTrainer
from client.ledger import EXAMPLE, USER, Mechanism, epsilon
from client.noise_calibration import calibrate_noise, expected_batch, sample_rate, steps_per_round
from common.adapters import load_trainable_arrays, trainable_arrays
from common.backbone import load_backbone
from common.config import DPConfig, LoraSettings, ModelConfig, TaskConfig, TrainConfig
from common.errors import ConfigError
from common.featurizer import TextFeaturizer
from common.model import build_scorer
from common.platform_data import read_dataset
from common.task import Example, build_task, training_units
from common.training import loss_on

HUGE_CLIP = 1e9


def _dp(**settings: object) -> DPConfig:
    """``dp`` settings without the recipe's per-part clip shares, unless a test names them."""
    return DPConfig.model_validate({"gradient_scales": {}} | settings)


def _full_batch(examples: int, clip: float, unit: str = EXAMPLE, **dp: object) -> DPConfig:
    """q = 1 in either unit (the expected batch is capped at N), every unit of every user."""
    return _dp(
        expected_batch_size=examples * examples,
        max_examples_per_user=examples,
        max_grad_norm=clip,
        unit=unit,
        **dp,
    )


def _privacy_units(examples: list[Example], unit: str) -> list[list[Example]]:
    """The training units of each privacy unit: one each, or every unit of one user."""
    if unit == EXAMPLE:
        return [[e] for e in examples]
    users: dict[str, list[Example]] = {}
    for example in examples:
        users.setdefault(example.user, []).append(example)
    return list(users.values())


@pytest.fixture(scope="module")
def platform(synthetic_dir: Path):
    data = read_dataset(synthetic_dir)[0]
    return data, build_task(data, TaskConfig(split="leave_last", history_len=5))


def _setup(
    backbone: Path,
    platform,
    examples: int,
    dp: DPConfig,
    objective: str = "softmax",
    **train: object,
):
    """A scorer with dropout off (so two forward passes are comparable) and its trainer, on
    the training units of ``objective``: adapters on every step and one learning rate for
    every part (as the reference step has it), unless a test says otherwise."""
    data, task = platform
    model, tokenizer = load_backbone(str(backbone))
    # the item tower with its private item factors and item scores: every part is exercised
    config = ModelConfig(private_factors=4, private_item_slots=64, item_score=True)
    scorer = build_scorer(model, config, LoraSettings(rank=4))
    for module in scorer.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    # LoRA B and the user map's up-projection start at zero: give them values so that LoRA A
    # and the map's down-projection get gradients too
    with torch.no_grad():
        for name, param in scorer.named_parameters():
            if "lora_B" in name or "user_up" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    featurizer = TextFeaturizer(tokenizer, data.item_text, max_length=40)
    chosen = training_units(task.train, objective)[:examples]
    one_rate = {"adapter_every": 1, "head_learning_rate": None, "mix_learning_rate": None}
    trainer = LocalTrainer(scorer, featurizer, chosen, TrainConfig(**(one_rate | train)), dp)
    return scorer, featurizer, chosen, trainer


def _reference_update(
    scorer,
    featurizer,
    examples,
    clip: float,
    lr: float,
    through_adapters: bool = True,
    unit: str = EXAMPLE,
    scales: dict[str, float] | None = None,
) -> dict[str, np.ndarray]:
    """Plain PyTorch: per-privacy-unit gradients — of one training unit's loss, or of the sum
    of a user's units' losses (autograd sums the candidates' rows and a user's units, nothing
    is folded) — each clipped to ``clip``, averaged over the privacy units, one SGD step.
    ``through_adapters`` = False: the item tower's head-only step. ``scales``: a tensor
    whose name contains a key has its gradient multiplied by the value before the clipping
    and divided by it after."""
    reference = copy.deepcopy(scorer)
    reference.prepare(featurizer)
    params = {
        n: p
        for n, p in reference.named_parameters()
        if p.requires_grad and (through_adapters or n.startswith("head."))
    }
    scale = {n: next((v for k, v in (scales or {}).items() if k in n), 1.0) for n in params}
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    groups = _privacy_units(examples, unit)
    for group in groups:
        reference.zero_grad(set_to_none=True)
        (loss_on(reference, featurizer, group, through_adapters) * len(group)).backward()
        norm = torch.sqrt(sum(((p.grad * scale[n]) ** 2).sum() for n, p in params.items()))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for name, p in params.items():
            total[name] += p.grad * factor
    with torch.no_grad():
        for name, p in params.items():
            p -= lr * total[name] / len(groups)
    return trainable_arrays(reference)


@pytest.mark.parametrize(
    ("objective", "unit"),
    [
        ("softmax", EXAMPLE),
        ("bce", EXAMPLE),
        ("softmax", USER),  # 4 users of 4, 4, 3 and 1 units
        ("bce", USER),  # one user of 12 units, over chunks of 5
    ],
)
def test_dp_step_without_noise_equals_the_plain_step(
    tiny_bert_dir: Path, platform, objective: str, unit: str
) -> None:
    """σ = 0, huge clip, q = 1: DP-SGD must be exactly plain full-batch SGD (peft + Opacus).
    Under the softmax objective this checks the folding of each unit's candidate rows; under
    the user unit, that a user's gradient is the plain sum of their units' (a chunk never
    splits a user)."""
    examples = 12
    dp = _full_batch(examples, HUGE_CLIP, unit, clipping="hooks")
    scorer, featurizer, chosen, trainer = _setup(
        tiny_bert_dir, platform, examples, dp, objective, optimizer="sgd", batch_size=5
    )
    assert trainer.sample_rate == 1.0
    assert trainer.privacy_units == len(_privacy_units(chosen, unit))
    expected = _reference_update(scorer, featurizer, chosen, HUGE_CLIP, lr=0.5, unit=unit)
    before = trainable_arrays(scorer)
    result = trainer.run(steps=1, learning_rate=0.5, noise_multiplier=0.0)
    after = trainable_arrays(scorer)
    assert result.mechanism == Mechanism(0.0, 1.0, 1, HUGE_CLIP, unit=unit)
    assert any(not np.allclose(before[n], after[n]) for n in before if "lora_A" in n)
    assert any(not np.allclose(before[n], after[n]) for n in before if "lora_B" in n)
    moved = {n for n in before if not np.allclose(before[n], after[n])}
    assert "head.user_down.weight" in moved
    for name in before:
        np.testing.assert_allclose(after[name], expected[name], rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize("unit", [EXAMPLE, USER])
def test_each_privacy_unit_is_clipped_to_the_bound(
    tiny_bert_dir: Path, platform, unit: str
) -> None:
    examples, clip, lr = 10, 1e-3, 1.0
    dp = _full_batch(examples, clip, unit, clipping="hooks")
    scorer, featurizer, chosen, trainer = _setup(
        tiny_bert_dir, platform, examples, dp, optimizer="sgd", batch_size=4
    )
    unclipped = _reference_update(scorer, featurizer, chosen, HUGE_CLIP, lr, unit=unit)
    expected = _reference_update(scorer, featurizer, chosen, clip, lr, unit=unit)
    before = trainable_arrays(scorer)
    trainer.run(steps=1, learning_rate=lr, noise_multiplier=0.0)
    after = trainable_arrays(scorer)

    def step_norm(update: dict[str, np.ndarray]) -> float:
        return float(np.sqrt(sum(((update[n] - before[n]) ** 2).sum() for n in before)))

    assert step_norm(unclipped) > 20 * clip  # the bound really binds
    assert step_norm(after) <= lr * clip * (1 + 1e-4)  # mean of vectors of norm <= C
    for name in before:
        np.testing.assert_allclose(after[name], expected[name], rtol=1e-3, atol=1e-7, err_msg=name)


@pytest.mark.parametrize("unit", [EXAMPLE, USER])
def test_head_only_steps_match_the_reference_and_leave_the_adapters_untouched(
    tiny_bert_dir: Path, platform, unit: str
) -> None:
    """``train.adapter_every = 2``: step 0 trains adapters and head, step 1 the head alone on
    the item vectors recomputed after step 0 — each exactly the plain reference step (σ = 0,
    huge clip, q = 1; under the user unit both fold each user's units into one row) — and a
    noisy head-only step adds no noise to the adapters."""
    examples, lr = 10, 0.5
    dp = _full_batch(examples, HUGE_CLIP, unit, clipping="hooks")
    scorer, featurizer, chosen, trainer = _setup(
        tiny_bert_dir, platform, examples, dp, optimizer="sgd", adapter_every=2
    )
    first = _reference_update(scorer, featurizer, chosen, HUGE_CLIP, lr, unit=unit)
    midway = copy.deepcopy(scorer)
    load_trainable_arrays(midway, first)
    expected = _reference_update(
        midway, featurizer, chosen, HUGE_CLIP, lr, through_adapters=False, unit=unit
    )
    before = trainable_arrays(scorer)
    trainer.run(steps=2, learning_rate=lr, noise_multiplier=0.0)
    after = trainable_arrays(scorer)
    adapters = [n for n in before if n.startswith("encoder.")]
    assert adapters and any(not np.allclose(before[n], first[n]) for n in adapters)
    for name in before:
        np.testing.assert_allclose(after[name], expected[name], rtol=1e-4, atol=1e-6, err_msg=name)
        if name in adapters:  # the second step left them as the first step made them
            np.testing.assert_allclose(after[name], first[name], rtol=1e-4, atol=1e-6, err_msg=name)
    assert all(p.requires_grad for n, p in scorer.named_parameters() if n in adapters)

    # a noisy step at an odd position of the run's schedule is head-only: adapters unchanged
    trainer.run(steps=1, learning_rate=lr, noise_multiplier=1.0, first_step=3)
    noisy = trainable_arrays(scorer)
    assert all(np.array_equal(noisy[n], after[n]) for n in adapters)
    assert all(not np.array_equal(noisy[n], after[n]) for n in after if n not in adapters)


SCALES = {"head.mix.": 0.1, "head.private_items.": 3.0}


def test_gradient_scales_change_each_parts_share_of_the_clip_norm(
    tiny_bert_dir: Path, platform
) -> None:
    """``dp.gradient_scales``: each unit's gradient is clipped with the named parts scaled,
    and the step moves each part by its own unscaled gradient — exactly the plain reference
    step (σ = 0, q = 1), not the unscaled one — so the noise, N(0, σ²C²) on the scaled sum,
    lands on a part divided by its scale: the item factors (× 3) get a third of the rest's."""
    examples, clip, lr = 10, 1e-3, 1.0
    dp = _full_batch(examples, clip, gradient_scales=SCALES)
    scorer, featurizer, chosen, trainer = _setup(
        tiny_bert_dir, platform, examples, dp, optimizer="sgd", batch_size=4
    )
    plain = _reference_update(scorer, featurizer, chosen, clip, lr)
    expected = _reference_update(scorer, featurizer, chosen, clip, lr, scales=SCALES)
    before = trainable_arrays(scorer)
    result = trainer.run(steps=1, learning_rate=lr, noise_multiplier=0.0)
    after = trainable_arrays(scorer)
    assert result.mechanism == Mechanism(0.0, 1.0, 1, clip)
    for name in before:
        np.testing.assert_allclose(after[name], expected[name], rtol=1e-3, atol=1e-7, err_msg=name)
    factors = next(n for n in before if "private_items" in n)
    step, unscaled = after[factors] - before[factors], plain[factors] - before[factors]
    assert not np.allclose(step, unscaled, rtol=0.05, atol=0)

    sigma = 1e3  # the noise dwarfs the clipped signal (C = 10⁻³)
    load_trainable_arrays(scorer, before)
    trainer.run(steps=1, learning_rate=lr, noise_multiplier=sigma)
    noisy = trainable_arrays(scorer)
    spread = {n: float(np.std(noisy[n] - expected[n])) / (sigma * clip / examples) for n in before}
    others = [spread[n] for n in before if "lora_B" in n or "user_" in n]
    assert np.allclose(others, 1.0, rtol=0.2)
    assert spread[factors] == pytest.approx(1 / 3, rel=0.2)


@pytest.mark.parametrize(
    ("scales", "message"),
    [
        ({"head.mixx.": 2.0}, "names no trainable tensor"),
        ({"head.": 2.0, "mix": 1.0}, "more than one"),
    ],
)
def test_gradient_scales_must_name_each_tensor_once(
    tiny_bert_dir: Path, platform, scales: dict[str, float], message: str
) -> None:
    """A misspelt part would silently keep its share of the clip norm: refused at the run."""
    dp = _full_batch(4, 1.0, gradient_scales=scales)
    *_, trainer = _setup(tiny_bert_dir, platform, 4, dp)
    with pytest.raises(ConfigError, match=message):
        trainer.run(steps=1, learning_rate=0.1, noise_multiplier=1.0)


def test_gradient_scales_are_positive_and_need_per_unit_rows() -> None:
    with pytest.raises(ValueError, match="scale > 0"):
        DPConfig(gradient_scales={"head.mix.": 0.0})
    with pytest.raises(ValueError, match="hooks"):
        DPConfig(gradient_scales={"head.mix.": 0.5}, clipping="ghost")


class _ClippedRows:
    """Probe: each row Opacus clips (per privacy unit) and the clipped sum it accumulates,
    by tensor name, for every clipping call."""

    def __init__(self, scorer: nn.Module) -> None:
        self.names = {id(p): n for n, p in scorer.named_parameters()}
        self.rows: list[dict[str, torch.Tensor]] = []
        self.summed: list[dict[str, torch.Tensor]] = []

    def __call__(self, optimizer: DPOptimizer) -> None:
        clip = optimizer.clip_and_accumulate

        def recording() -> None:
            params = {self.names[id(p)]: p for p in optimizer.params}
            self.rows.append({n: p.grad_sample.detach().clone() for n, p in params.items()})
            clip()
            self.summed.append({n: p.summed_grad.detach().clone() for n, p in params.items()})

        optimizer.clip_and_accumulate = recording


def _norm(tensors: dict[str, torch.Tensor]) -> float:
    return float(torch.sqrt(sum((t.double() ** 2).sum() for t in tensors.values())))


@pytest.mark.parametrize("clip", [1e-3, HUGE_CLIP])
def test_a_users_row_is_the_sum_of_their_units_gradients_clipped_to_c(
    tiny_bert_dir: Path, platform, clip: float
) -> None:
    """One user of 4 units, σ = 0, an adapter step then a head-only step: Opacus clips one row
    per step, the plain sum of the user's unit gradients (each as the example-level step
    has it), and accumulates it clipped: norm C when the sum is longer, else the sum itself.
    Chunks of 2 units: the user is kept whole in one chunk."""
    dp = _full_batch(4, clip, USER, clipping="hooks")
    scorer, featurizer, chosen, trainer = _setup(
        tiny_bert_dir, platform, 4, dp, adapter_every=2, batch_size=2
    )
    assert len({e.user for e in chosen}) == 1 and trainer.privacy_units == 1
    reference = copy.deepcopy(scorer)
    reference.prepare(featurizer)
    probe = _ClippedRows(scorer)
    trainer.probe = probe
    trainer.run(steps=2, learning_rate=0.0, noise_multiplier=0.0)  # lr 0: both see one model
    assert len(probe.rows) == 2
    for through_adapters, rows, summed in zip((True, False), probe.rows, probe.summed, strict=True):
        total = {n: torch.zeros_like(r[0]) for n, r in rows.items()}
        for unit in chosen:
            reference.zero_grad(set_to_none=True)
            loss_on(reference, featurizer, [unit], through_adapters).backward()
            for name, p in reference.named_parameters():
                if name in total:
                    total[name] += p.grad
        assert all(r.shape[0] == 1 for r in rows.values())  # one row: the user's
        assert any(n.startswith("encoder.") for n in rows) == through_adapters
        for name, row in rows.items():
            # the softmax cancels mix.bias's gradient (every candidate gets the same bias), so
            # what is left there is rounding of order 1e-7
            atol = 1e-6 if name == "head.mix.bias" else 1e-7
            torch.testing.assert_close(row[0], total[name], rtol=1e-4, atol=atol, msg=name)
        unclipped = _norm(total)
        assert _norm(summed) == pytest.approx(min(clip, unclipped), rel=1e-4)
        if clip < 1:
            assert unclipped > 20 * clip  # the bound binds


def test_a_user_brings_at_most_k_of_their_units_a_uniform_random_subset(
    tiny_bert_dir: Path, platform
) -> None:
    k = 2
    dp = _dp(unit=USER, expected_batch_size=2 * k, max_examples_per_user=k)  # 2 users
    _, _, chosen, trainer = _setup(tiny_bert_dir, platform, 12, dp, batch_size=4)
    largest = max(trainer.groups, key=len)
    assert len(largest) == 4
    generator = torch.Generator().manual_seed(0)
    drawn: Counter[Example] = Counter()
    for _ in range(2000):
        (units,) = trainer._sampled(torch.tensor([trainer.groups.index(largest)]), generator)
        assert len(set(units)) == k and set(units) <= set(largest)
        drawn.update(units)
    assert all(abs(drawn[unit] - 1000) < 100 for unit in largest)  # each with chance k / 4

    batches: list[list[list[Example]]] = []
    physical = trainer._physical

    def recording(batch: list[list[Example]]):
        batches.append(batch)
        return physical(batch)

    trainer._physical = recording  # type: ignore[method-assign]
    trainer.run(steps=6, learning_rate=1e-3, noise_multiplier=1.0)
    assert len(batches) == 6
    for batch in batches:
        users = [group[0].user for group in batch]
        assert len(set(users)) == len(users)  # a user is drawn once per step
        assert all(
            len(group) <= k and {e.user for e in group} == {group[0].user} for group in batch
        )
    assert max(len(group) for batch in batches for group in batch) == k


def test_under_the_user_unit_poisson_sampling_draws_users(tiny_bert_dir: Path, platform) -> None:
    """q = expected users / N users; an expected batch of B training units is B / k users."""
    default = DPConfig(unit=USER, expected_batch_size=1024, max_examples_per_user=8)
    assert expected_batch(default) == 128
    assert sample_rate(934, default) == 1 / 8  # ML-100K action_scifi's users: ⌈934 / 128⌉
    assert steps_per_round(934, TrainConfig(local_epochs=0.6), default) == 5
    assert expected_batch(default.model_copy(update={"enabled": False})) == 1024  # no unit
    dp = _dp(unit=USER, expected_batch_size=4, max_examples_per_user=2, clipping="hooks")
    _, _, chosen, trainer = _setup(tiny_bert_dir, platform, 12, dp, batch_size=4)
    users = len({e.user for e in chosen})
    assert trainer.privacy_units == users == 4 and trainer.sample_rate == 1 / 2
    result = trainer.run(steps=2, learning_rate=1e-3, noise_multiplier=1.0)
    assert result.mechanism == Mechanism(1.0, 1 / 2, 2, 1.0, unit=USER)  # as Opacus ran it


def test_noisy_dp_training_changes_the_adapters_and_runs_empty_batches(
    tiny_bert_dir: Path, platform
) -> None:
    torch.manual_seed(0)
    dp = _dp(expected_batch_size=1, clipping="hooks")  # q = 1/40: many empty batches
    scorer, _, _, trainer = _setup(tiny_bert_dir, platform, 40, dp, "bce", batch_size=8)
    before = trainable_arrays(scorer)
    result = trainer.run(steps=12, learning_rate=1e-2, noise_multiplier=1.0)
    after = trainable_arrays(scorer)
    assert result.mechanism == Mechanism(1.0, 1 / 40, 12, 1.0)
    assert all(
        not np.array_equal(before[n], after[n]) for n in before
    )  # noise reaches every tensor
    assert not any(getattr(p, "grad_sample", None) is not None for p in scorer.parameters())


def test_plain_mode_is_the_same_loop_without_privacy(tiny_bert_dir: Path, platform) -> None:
    dp = _dp(enabled=False, expected_batch_size=8)
    scorer, _, _, trainer = _setup(tiny_bert_dir, platform, 40, dp, batch_size=3)
    before = trainable_arrays(scorer)
    result = trainer.run(steps=3, learning_rate=1e-2, noise_multiplier=None)
    assert result.mechanism is None and result.steps == 3 and np.isfinite(result.loss)
    assert any(not np.array_equal(before[n], v) for n, v in trainable_arrays(scorer).items())


def test_ghost_clipping_is_refused(tiny_bert_dir: Path, platform) -> None:
    with pytest.raises(ValueError, match="dp.clipping = 'ghost' cannot run the item tower"):
        _dp(clipping="ghost")
    # even set past the configuration's validation, in either unit
    for unit in ("example", "user"):
        ghost = _dp(unit=unit).model_copy(update={"clipping": "ghost"})
        _, _, _, trainer = _setup(tiny_bert_dir, platform, 10, ghost)
        with pytest.raises(ConfigError, match="dp.clipping = 'ghost' cannot run the item tower"):
            trainer.run(steps=1, learning_rate=1e-3, noise_multiplier=1.0)


def test_noise_is_calibrated_for_the_whole_planned_run() -> None:
    dp = DPConfig(target_epsilon=2.0, delta=1e-5)
    q, total = sample_rate(50_000, dp), 5 * 40
    sigma = calibrate_noise(dp, q, total)
    assert epsilon([Mechanism(sigma, q, total, 1.0)], 1e-5) <= 2.0
    assert epsilon([Mechanism(sigma * 0.99, q, total, 1.0)], 1e-5) > 2.0  # tight: no waste
    # noise calibrated for one round only would overspend over five rounds
    one_round_sigma = calibrate_noise(dp, q, 40)
    assert one_round_sigma < sigma
    assert epsilon([Mechanism(one_round_sigma, q, total, 1.0)], 1e-5) > 2.0
    assert calibrate_noise(DPConfig(noise_multiplier=0.7), q, total) == 0.7


def test_steps_per_round_and_sample_rate_match_opacus() -> None:
    dp = DPConfig(expected_batch_size=64)
    assert sample_rate(1000, dp) == 1 / 16  # Opacus: 1 / len(loader) = 1 / ceil(1000 / 64)
    assert steps_per_round(1000, TrainConfig(local_epochs=2.0), dp) == 32
    assert steps_per_round(1000, TrainConfig(local_steps=5), dp) == 5


def test_poisson_sample_is_not_predictable_from_the_shared_seed(
    tiny_bert_dir: Path, platform
) -> None:
    """``train.seed`` travels in the run config: under DP it must not decide the batches."""
    dp = _dp(expected_batch_size=4, max_grad_norm=HUGE_CLIP, clipping="hooks")
    updates = []
    for _ in range(2):
        scorer, _, _, trainer = _setup(tiny_bert_dir, platform, 40, dp, optimizer="sgd")
        trainer.run(steps=3, learning_rate=0.5, noise_multiplier=0.0)  # no noise: batches only
        updates.append(trainable_arrays(scorer))
    assert any(not np.allclose(updates[0][n], updates[1][n]) for n in updates[0])


def test_building_a_scorer_leaves_the_noise_generator_unseeded(tiny_bert_dir: Path) -> None:
    """The Gaussian noise uses torch's default generator: nothing may reset it to a known seed."""
    state = torch.random.get_rng_state()
    model, _ = load_backbone(str(tiny_bert_dir))
    build_scorer(model, ModelConfig(), LoraSettings(rank=4))
    assert torch.equal(torch.random.get_rng_state(), state)


@pytest.mark.parametrize("noise_multiplier", [0.0, None])
def test_a_released_gradient_is_the_dp_step_not_applied_here(
    tiny_bert_dir: Path, platform, noise_multiplier: float | None
) -> None:
    """The lockstep step (σ = 0, q = 1, clipping active): the released tensors' gradients are
    exactly the reference's clipped mean, the released tensors stay where they were, and the
    rest take the reference step; without DP, the same with no clipping."""
    examples, lr = 10, 0.5
    clip = 1e-3 if noise_multiplier is not None else HUGE_CLIP
    dp = _full_batch(examples, clip, enabled=noise_multiplier is not None)
    scorer, featurizer, chosen, trainer = _setup(
        tiny_bert_dir, platform, examples, dp, optimizer="sgd", batch_size=4
    )
    expected = _reference_update(scorer, featurizer, chosen, clip, lr)
    before = trainable_arrays(scorer)
    release = [n for n in before if not n.startswith("head.mix.")]
    result = trainer.run(1, lr, noise_multiplier, release=release, moments={})
    after = trainable_arrays(scorer)
    assert set(result.released) == set(release)
    for name in before:
        if name in release:
            np.testing.assert_array_equal(after[name], before[name], err_msg=name)
            gradient = (before[name] - expected[name]) / lr
            np.testing.assert_allclose(
                result.released[name].numpy(), gradient, rtol=1e-3, atol=1e-7, err_msg=name
            )
        else:
            np.testing.assert_allclose(after[name], expected[name], rtol=1e-3, atol=1e-7)
    with pytest.raises(ValueError, match="one step"):
        trainer.run(2, lr, noise_multiplier, release=release)


@pytest.mark.parametrize("noise_multiplier", [0.0, None])
def test_one_step_rounds_that_keep_their_moments_are_one_optimiser(
    tiny_bert_dir: Path, platform, noise_multiplier: float | None
) -> None:
    """Lockstep's private part: three rounds of one step, each continuing the optimiser state
    the last one returned, end exactly where one round of three AdamW steps does (the middle
    one head-only: the item vectors are recomputed whenever the adapters moved, either way)."""
    dp = _full_batch(8, 1e-2, enabled=noise_multiplier is not None)
    scorer, _, _, trainer = _setup(tiny_bert_dir, platform, 8, dp, batch_size=4, adapter_every=2)
    before = trainable_arrays(scorer)
    trainer.run(3, 1e-2, noise_multiplier)
    expected = trainable_arrays(scorer)
    load_trainable_arrays(scorer, before)
    moments: dict[str, np.ndarray] = {}
    for step in range(3):
        moments = trainer.run(1, 1e-2, noise_multiplier, step, moments=moments).moments
    assert any(key.endswith("::exp_avg_sq") for key in moments)
    for name, value in trainable_arrays(scorer).items():
        if name == "head.mix.bias":  # under the softmax its gradient is 0 up to rounding,
            continue  # which AdamW turns into steps of ±lr: the order of a sum decides it
        np.testing.assert_allclose(value, expected[name], rtol=1e-4, atol=1e-7, err_msg=name)


def test_a_slow_calibration_reports_its_progress(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """A calibration that takes longer than its reporting interval says where σ stands as it
    goes, then the σ it found; a fast one says nothing."""
    import client.noise_calibration as noise_calibration

    dp = DPConfig(target_epsilon=2.0, delta=1e-5)
    monkeypatch.setattr(noise_calibration._Progress, "EVERY", 1e9)
    with caplog.at_level("INFO", logger="client.noise_calibration"):
        calibrate_noise(dp, 0.01, 25)
    assert caplog.records == []
    monkeypatch.setattr(noise_calibration._Progress, "EVERY", 0.0)
    with caplog.at_level("INFO", logger="client.noise_calibration"):
        sigma = calibrate_noise(dp, 0.01, 26)
    lines = [record.getMessage() for record in caplog.records]
    assert len(lines) > 5 and all("calibrating σ to ε = 2 over 26 steps" in x for x in lines)
    assert "σ in [" in lines[0] and f"σ = {sigma:.4g} (" in lines[-1]
