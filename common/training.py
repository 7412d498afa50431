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
    """``train.optimizer`` over the trainable tensors only (LoRA + head): the frozen backbone
    gets no optimiser state."""
    params = [p for p in model.parameters() if p.requires_grad]
    if train.optimizer == "sgd":
        return torch.optim.SGD(
            params, lr=learning_rate, momentum=train.momentum, weight_decay=train.weight_decay
        )
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=train.weight_decay)


def loss_on(model: nn.Module, featurizer: TextFeaturizer, batch: Sequence[Example]) -> torch.Tensor:
    """Mean binary cross-entropy of ``model`` (a scorer, or an Opacus wrapper of one) on a batch."""
    scorer = unwrap(model)
    device = next(scorer.parameters()).device
    inputs = {k: v.to(device) for k, v in scorer.batch(featurizer, batch).items()}
    labels = torch.tensor([e.label for e in batch], dtype=torch.float32, device=device)
    return nn.functional.binary_cross_entropy_with_logits(model(**inputs), labels)
