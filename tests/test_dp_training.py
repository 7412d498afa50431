"""DP-SGD local training: real updates, exact reference step, per-example clipping, accounting."""

from __future__ import annotations

import copy
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

from client.dp_training import LocalTrainer, calibrate_noise, sample_rate, steps_per_round
from client.ledger import Mechanism, epsilon
from common.adapters import load_trainable_arrays, trainable_arrays
from common.config import DPConfig, LoraSettings, ModelConfig, TrainConfig
from common.errors import ConfigError
from common.model import TextFeaturizer, build_scorer, load_backbone
from common.platform_data import read_dataset
from common.task import build_task, training_units
from common.training import loss_on

HUGE_CLIP = 1e9


@pytest.fixture(scope="module")
def platform(synthetic_dir: Path):
    data = read_dataset(synthetic_dir)[0]
    return data, build_task(data)


def _setup(
    backbone: Path,
    platform,
    kind: str,
    examples: int,
    dp: DPConfig,
    objective: str = "",
    **train: object,
):
    """A scorer with dropout off (so two forward passes are comparable) and its trainer, on
    the training units of ``objective`` (softmax for the item tower, by default)."""
    data, task = platform
    model, tokenizer = load_backbone(str(backbone))
    # the item tower with its private item factors, so every trainable part is exercised
    extra = {"private_factors": 4, "private_item_slots": 64} if kind == "item_tower" else {}
    scorer = build_scorer(model, ModelConfig(scorer=kind, **extra), LoraSettings(rank=4))
    for module in scorer.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    with torch.no_grad():  # LoRA B starts at zero; give it values so A gets gradients too
        for name, param in scorer.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.05, generator=torch.Generator().manual_seed(3))
    featurizer = TextFeaturizer(tokenizer, data.item_text, max_length=40)
    objective = objective or ("softmax" if kind == "item_tower" else "bce")
    chosen = training_units(task.train, objective)[:examples]
    trainer = LocalTrainer(scorer, featurizer, chosen, TrainConfig(**train), dp)
    return scorer, featurizer, chosen, trainer


def _reference_update(
    scorer, featurizer, examples, clip: float, lr: float, through_adapters: bool = True
) -> dict[str, np.ndarray]:
    """Plain PyTorch: per-unit gradients (one unit at a time, so the candidates' rows are
    summed by autograd, not folded), each clipped to ``clip``, averaged, one SGD step.
    ``through_adapters`` = False: the item tower's head-only step."""
    reference = copy.deepcopy(scorer)
    reference.prepare(featurizer)
    params = {
        n: p
        for n, p in reference.named_parameters()
        if p.requires_grad and (through_adapters or n.startswith("head."))
    }
    total = {n: torch.zeros_like(p) for n, p in params.items()}
    for example in examples:
        reference.zero_grad(set_to_none=True)
        loss_on(reference, featurizer, [example], through_adapters).backward()
        norm = torch.sqrt(sum((p.grad**2).sum() for p in params.values()))
        factor = min(1.0, clip / (float(norm) + 1e-6))
        for name, p in params.items():
            total[name] += p.grad * factor
    with torch.no_grad():
        for name, p in params.items():
            p -= lr * total[name] / len(examples)
    return trainable_arrays(reference)


@pytest.mark.parametrize(
    ("kind", "mode", "objective"),
    [
        ("item_tower", "hooks", "softmax"),
        ("item_tower", "hooks", "bce"),
        ("two_tower", "hooks", ""),
        ("cross", "hooks", ""),
        ("cross", "ghost", ""),
    ],
)
def test_dp_step_without_noise_equals_the_plain_step(
    tiny_bert_dir: Path, platform, kind: str, mode: str, objective: str
) -> None:
    """σ = 0, huge clip, q = 1: DP-SGD must be exactly plain full-batch SGD (peft + Opacus).
    Under the softmax objective this checks the folding of each unit's candidate rows."""
    examples = 12
    dp = DPConfig(expected_batch_size=examples, max_grad_norm=HUGE_CLIP, clipping=mode)
    scorer, featurizer, chosen, trainer = _setup(
        tiny_bert_dir, platform, kind, examples, dp, objective, optimizer="sgd", batch_size=5
    )
    assert trainer.sample_rate == 1.0
    expected = _reference_update(scorer, featurizer, chosen, HUGE_CLIP, lr=0.5)
    before = trainable_arrays(scorer)
    result = trainer.run(steps=1, learning_rate=0.5, noise_multiplier=0.0)
    after = trainable_arrays(scorer)
    assert result.mechanism == Mechanism(0.0, 1.0, 1, HUGE_CLIP)
    assert any(not np.allclose(before[n], after[n]) for n in before if "lora_A" in n)
    assert any(not np.allclose(before[n], after[n]) for n in before if "lora_B" in n)
    for name in before:
        np.testing.assert_allclose(after[name], expected[name], rtol=1e-4, atol=1e-6, err_msg=name)


@pytest.mark.parametrize(
    ("kind", "mode"), [("item_tower", "hooks"), ("two_tower", "hooks"), ("cross", "ghost")]
)
def test_each_example_is_clipped_to_the_bound(
    tiny_bert_dir: Path, platform, kind: str, mode: str
) -> None:
    examples, clip, lr = 10, 1e-3, 1.0
    dp = DPConfig(expected_batch_size=examples, max_grad_norm=clip, clipping=mode)
    scorer, featurizer, chosen, trainer = _setup(
        tiny_bert_dir, platform, kind, examples, dp, optimizer="sgd", batch_size=4
    )
    unclipped = _reference_update(scorer, featurizer, chosen, HUGE_CLIP, lr)
    expected = _reference_update(scorer, featurizer, chosen, clip, lr)
    before = trainable_arrays(scorer)
    trainer.run(steps=1, learning_rate=lr, noise_multiplier=0.0)
    after = trainable_arrays(scorer)

    def step_norm(update: dict[str, np.ndarray]) -> float:
        return float(np.sqrt(sum(((update[n] - before[n]) ** 2).sum() for n in before)))

    assert step_norm(unclipped) > 20 * clip  # the bound really binds
    assert step_norm(after) <= lr * clip * (1 + 1e-4)  # mean of vectors of norm <= C
    for name in before:
        np.testing.assert_allclose(after[name], expected[name], rtol=1e-3, atol=1e-7, err_msg=name)


def test_head_only_steps_match_the_reference_and_leave_the_adapters_untouched(
    tiny_bert_dir: Path, platform
) -> None:
    """``train.adapter_every = 2``: step 0 trains adapters and head, step 1 the head alone on
    the item vectors recomputed after step 0 — each exactly the plain reference step (σ = 0,
    huge clip, q = 1) — and a noisy head-only step adds no noise to the adapters."""
    examples, lr = 10, 0.5
    dp = DPConfig(expected_batch_size=examples, max_grad_norm=HUGE_CLIP, clipping="hooks")
    scorer, featurizer, chosen, trainer = _setup(
        tiny_bert_dir, platform, "item_tower", examples, dp, optimizer="sgd", adapter_every=2
    )
    first = _reference_update(scorer, featurizer, chosen, HUGE_CLIP, lr)
    midway = copy.deepcopy(scorer)
    load_trainable_arrays(midway, first)
    expected = _reference_update(midway, featurizer, chosen, HUGE_CLIP, lr, through_adapters=False)
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


def test_noisy_dp_training_changes_the_adapters_and_runs_empty_batches(
    tiny_bert_dir: Path, platform
) -> None:
    torch.manual_seed(0)
    dp = DPConfig(expected_batch_size=1, clipping="hooks")  # q = 1/40: many empty batches
    scorer, _, _, trainer = _setup(tiny_bert_dir, platform, "two_tower", 40, dp, batch_size=8)
    before = trainable_arrays(scorer)
    result = trainer.run(steps=12, learning_rate=1e-2, noise_multiplier=1.0)
    after = trainable_arrays(scorer)
    assert result.mechanism == Mechanism(1.0, 1 / 40, 12, 1.0)
    assert all(
        not np.array_equal(before[n], after[n]) for n in before
    )  # noise reaches every tensor
    assert type(trainer.scorer).__name__ == "TwoTowerScorer"
    assert not any(getattr(p, "grad_sample", None) is not None for p in scorer.parameters())


def test_plain_mode_is_the_same_loop_without_privacy(tiny_bert_dir: Path, platform) -> None:
    dp = DPConfig(enabled=False, expected_batch_size=8)
    scorer, _, _, trainer = _setup(tiny_bert_dir, platform, "cross", 40, dp, batch_size=3)
    before = trainable_arrays(scorer)
    result = trainer.run(steps=3, learning_rate=1e-2, noise_multiplier=None)
    assert result.mechanism is None and result.steps == 3 and np.isfinite(result.loss)
    assert any(not np.array_equal(before[n], v) for n, v in trainable_arrays(scorer).items())


def test_ghost_clipping_is_refused_for_two_tower(tiny_bert_dir: Path, platform) -> None:
    _, _, _, trainer = _setup(tiny_bert_dir, platform, "two_tower", 10, DPConfig(clipping="ghost"))
    with pytest.raises(ConfigError, match="ghost"):
        trainer.clipping_mode()
    _, _, _, auto = _setup(tiny_bert_dir, platform, "two_tower", 10, DPConfig(clipping="auto"))
    assert auto.clipping_mode() == "hooks"


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
    dp = DPConfig(expected_batch_size=4, max_grad_norm=HUGE_CLIP, clipping="hooks")
    updates = []
    for _ in range(2):
        scorer, _, _, trainer = _setup(tiny_bert_dir, platform, "cross", 40, dp, optimizer="sgd")
        trainer.run(steps=3, learning_rate=0.5, noise_multiplier=0.0)  # no noise: batches only
        updates.append(trainable_arrays(scorer))
    assert any(not np.allclose(updates[0][n], updates[1][n]) for n in updates[0])


def test_building_a_scorer_leaves_the_noise_generator_unseeded(tiny_bert_dir: Path) -> None:
    """The Gaussian noise uses torch's default generator: nothing may reset it to a known seed."""
    state = torch.random.get_rng_state()
    model, _ = load_backbone(str(tiny_bert_dir))
    build_scorer(model, ModelConfig(), LoraSettings(rank=4))
    assert torch.equal(torch.random.get_rng_state(), state)
