"""Pieces of local training shared by the DP trainer and the benchmarks: device, optimiser, loss."""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from common.adapters import unwrap
from common.config import TrainConfig
from common.errors import ConfigError
from common.model import TextFeaturizer
from common.task import Example


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda' but no CUDA device is available")
    return torch.device(requested)


def make_optimizer(
    model: nn.Module, train: TrainConfig, learning_rate: float
) -> torch.optim.Optimizer:
    """``train.optimizer`` over the trainable tensors only (the frozen backbone gets no state),
    in three groups: the adapters at ``learning_rate``; the item tower's user map and its
    mixing weights at their own rates, scaled by the same schedule. Under DP noise, AdamW
    moves every coordinate by about its rate per step: the few mixing weights carry strong
    signal and need large steps, the LoRA matrices small ones (docs/results.md)."""
    scale = learning_rate / train.learning_rate
    rates = {
        "adapters": learning_rate,
        "head": (train.head_learning_rate or train.learning_rate) * scale,
        "mix": (train.mix_learning_rate or train.learning_rate) * scale,
    }
    groups: dict[str, list[nn.Parameter]] = {name: [] for name in rates}
    for name, param in unwrap(model).named_parameters():
        if param.requires_grad:
            groups[_group(name)].append(param)
    param_groups = [{"params": p, "lr": rates[g]} for g, p in groups.items() if p]
    if train.optimizer == "sgd":
        return torch.optim.SGD(
            param_groups, lr=learning_rate, momentum=train.momentum, weight_decay=train.weight_decay
        )
    return torch.optim.AdamW(param_groups, lr=learning_rate, weight_decay=train.weight_decay)


def _group(name: str) -> str:
    if name.startswith("head.mix."):
        return "mix"
    return "head" if name.startswith("head.") else "adapters"


def unit_loss(
    logits: torch.Tensor, inputs: dict[str, torch.Tensor], batch: Sequence[Example]
) -> torch.Tensor:
    """Mean loss over the units of a batch: each positive against its own candidates
    (``logits`` (B, W), softmax cross-entropy, padding masked) or pointwise binary
    cross-entropy (``logits`` (B,)). Either way a unit's loss depends on that unit alone."""
    if logits.dim() == 2:
        mask = inputs["candidate_mask"].to(logits.device)
        target = torch.zeros(len(batch), dtype=torch.long, device=logits.device)
        return nn.functional.cross_entropy(logits.masked_fill(~mask, -1e9), target)
    labels = torch.tensor([e.label for e in batch], dtype=torch.float32, device=logits.device)
    return nn.functional.binary_cross_entropy_with_logits(logits, labels)


def batch_inputs(
    model: nn.Module,
    featurizer: TextFeaturizer,
    batch: Sequence[Example],
    through_adapters: bool = True,
) -> dict[str, torch.Tensor]:
    """The scorer's input tensors for ``batch``, on its device (``through_adapters`` = False:
    the item tower's head-only step)."""
    scorer = unwrap(model)
    device = next(scorer.parameters()).device
    extra = {} if through_adapters else {"through_adapters": False}
    return {k: v.to(device) for k, v in scorer.batch(featurizer, batch, **extra).items()}


def loss_on(
    model: nn.Module,
    featurizer: TextFeaturizer,
    batch: Sequence[Example],
    through_adapters: bool = True,
) -> torch.Tensor:
    """:func:`unit_loss` of ``model`` (a scorer, or an Opacus wrapper of one) on a batch."""
    inputs = batch_inputs(model, featurizer, batch, through_adapters)
    return unit_loss(model(**inputs), inputs, batch)
