"""Pieces of local training shared by the DP trainer and the benchmarks: device, optimiser, loss."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch
from torch import nn

from common.adapters import unwrap
from common.config import TrainConfig
from common.errors import ConfigError
from common.featurizer import TextFeaturizer
from common.task import Example


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device = 'cuda' but no CUDA device is available")
    return torch.device(requested)


def make_optimizer(
    model: nn.Module | Iterable[tuple[str, nn.Parameter]],
    train: TrainConfig,
    learning_rate: float,
) -> torch.optim.Optimizer:
    """``train.optimizer`` over the trainable tensors only (the frozen backbone gets no state),
    in four groups: the adapters at ``learning_rate``; the item tower's user map, its other
    head tensors and its mixing weights at their own rates, scaled by the same schedule. Under
    DP noise, AdamW moves every coordinate by about its rate per step: the few mixing weights
    carry strong signal and need large steps, the LoRA matrices small ones (docs/results.md).
    ``model`` may be (name, tensor) pairs instead: the server's optimiser over the shared
    tensors groups them by the same names."""
    named = unwrap(model).named_parameters() if isinstance(model, nn.Module) else model
    scale = learning_rate / train.learning_rate
    head = (train.head_learning_rate or train.learning_rate) * scale
    settings: dict[str, dict[str, float]] = {
        "adapters": {"lr": learning_rate},
        "map": {"lr": head, "eps": train.map_adam_epsilon},
        "head": {"lr": head},
        "mix": {"lr": (train.mix_learning_rate or train.learning_rate) * scale},
    }
    groups: dict[str, list[nn.Parameter]] = {name: [] for name in settings}
    for name, param in named:
        if param.requires_grad:
            groups[_group(name)].append(param)
    if train.optimizer == "sgd":
        param_groups = [{"params": p, "lr": settings[g]["lr"]} for g, p in groups.items() if p]
        return torch.optim.SGD(
            param_groups, lr=learning_rate, momentum=train.momentum, weight_decay=train.weight_decay
        )
    param_groups = [{"params": p, **settings[g]} for g, p in groups.items() if p]
    return torch.optim.AdamW(param_groups, lr=learning_rate, weight_decay=train.weight_decay)


def _group(name: str) -> str:
    if name.startswith("head.mix."):
        return "mix"
    if name.startswith("head.user_"):
        return "map"
    return "head" if name.startswith("head.") else "adapters"


MOMENT = "moment::"  # prefix of an optimiser state tensor among a state folder's arrays


def optimizer_moments(
    optimizer: torch.optim.Optimizer, named: dict[str, nn.Parameter]
) -> dict[str, np.ndarray]:
    """The optimiser's per-tensor state (AdamW's step count and moments), keyed by tensor
    name so it survives a fresh optimiser (the lockstep schedule keeps it across rounds)."""
    arrays = {}
    for name, param in named.items():
        for key, value in optimizer.state.get(param, {}).items():
            arrays[f"{MOMENT}{name}::{key}"] = torch.as_tensor(value).detach().cpu().numpy()
    return arrays


def load_moments(
    optimizer: torch.optim.Optimizer, named: dict[str, nn.Parameter], arrays: dict[str, np.ndarray]
) -> None:
    """Restore what :func:`optimizer_moments` saved (tensors it names that ``named`` lacks are
    ignored: another strategy's or a frozen tensor's)."""
    for key, value in arrays.items():
        if not key.startswith(MOMENT):
            continue
        name, _, field = key.removeprefix(MOMENT).rpartition("::")
        if name in named:
            param, tensor = named[name], torch.from_numpy(value.copy())
            # AdamW keeps its step count on the CPU unless it is capturable
            optimizer.state[param][field] = tensor if field == "step" else tensor.to(param.device)


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
