"""Plain (non-private) local training of a scorer: the loop DP training wraps, and baselines use."""

from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
import torch
from torch import nn

from common.adapters import unwrap
from common.model import Scorer, TextFeaturizer
from common.task import Example


def resolve_device(requested: str) -> torch.device:
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if requested == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("train.device = 'cuda' but no CUDA device is available")
    return torch.device(requested)


def make_optimizer(
    model: nn.Module, learning_rate: float, weight_decay: float = 0.0
) -> torch.optim.Optimizer:
    """AdamW over the trainable tensors only (LoRA + head): the frozen backbone gets no state."""
    params = [p for p in model.parameters() if p.requires_grad]
    return torch.optim.AdamW(params, lr=learning_rate, weight_decay=weight_decay)


def shuffled_batches(
    examples: Sequence[Example], batch_size: int, rng: np.random.Generator
) -> Iterator[list[Example]]:
    order = rng.permutation(len(examples))
    for start in range(0, len(order), batch_size):
        yield [examples[k] for k in order[start : start + batch_size]]


def loss_on(model: nn.Module, featurizer: TextFeaturizer, batch: Sequence[Example]) -> torch.Tensor:
    """Mean binary cross-entropy of ``model`` (a scorer, or an Opacus wrapper of one) on a batch."""
    scorer = unwrap(model)
    device = next(scorer.parameters()).device
    inputs = {k: v.to(device) for k, v in scorer.batch(featurizer, batch).items()}
    labels = torch.tensor([e.label for e in batch], dtype=torch.float32, device=device)
    return nn.functional.binary_cross_entropy_with_logits(model(**inputs), labels)


def train_steps(
    scorer: Scorer,
    featurizer: TextFeaturizer,
    examples: Sequence[Example],
    optimizer: torch.optim.Optimizer,
    batch_size: int,
    max_steps: int,
    rng: np.random.Generator,
) -> list[float]:
    """Up to ``max_steps`` optimiser steps over shuffled passes; returns the per-step losses."""
    scorer.train()
    losses: list[float] = []
    while len(losses) < max_steps:
        for batch in shuffled_batches(examples, batch_size, rng):
            optimizer.zero_grad(set_to_none=True)
            loss = loss_on(scorer, featurizer, batch)
            loss.backward()
            optimizer.step()
            losses.append(float(loss.detach()))
            if len(losses) >= max_steps:
                break
    return losses
