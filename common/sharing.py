"""Which adapter tensors each aggregation rule trains, sends and keeps at home.

- ``fedavg`` (FedIT): LoRA A, LoRA B and the head are trained and all averaged; A and B are
  averaged separately, so the aggregate of the products B·A is only approximated.
- ``ffa`` (FFA-LoRA): A stays frozen at the shared random initialisation (``lora.seed``); only
  B and the head are trained and averaged. The average of B·A is then exact (A is common), no
  product of two noisy factors arises under DP, and half the LoRA tensors are uploaded. The
  item tower's user map is a low-rank product too, but both its factors train: with its
  down-projection frozen at random, the map reads 8 random directions of the history vector,
  and ffa lost to local-only training on every ML-100K platform (docs/results.md).
- ``fedsa``: A is shared and averaged; B and the head stay on each platform (a personalised
  model: one shared adapter, a private part per platform).
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import cache
from typing import Any

import numpy as np

from common.adapters import trainable_arrays
from common.backbone import load_backbone
from common.config import LoraSettings, ModelConfig
from common.model import build_scorer
from common.scorers import Scorer

Arrays = dict[str, np.ndarray]


def _is_lora_a(name: str) -> bool:
    """LoRA's down-projection A."""
    return ".lora_A." in name


def _is_platform_private(name: str) -> bool:
    """The item tower's item factors (rows of one platform's own items) and its mixing
    weights (how much this platform's users follow its own popularity prior against content
    similarity: measured to differ by platform, docs/results.md): never shared."""
    return ".private_items." in name or ".mix." in name


def trains(name: str, strategy: str) -> bool:
    """Whether ``strategy`` trains the adapter tensor ``name`` locally."""
    return not (strategy == "ffa" and _is_lora_a(name))


def shares(name: str, strategy: str) -> bool:
    """Whether the trained tensor ``name`` is sent to the server and aggregated."""
    if _is_platform_private(name):
        return False
    if strategy == "fedsa":
        return _is_lora_a(name)
    return trains(name, strategy)


def shared_names(names: Iterable[str], strategy: str) -> list[str]:
    return [name for name in names if shares(name, strategy)]


def private_names(names: Iterable[str], strategy: str) -> list[str]:
    """Trained here but never sent: the platform's personal part (fedsa's B and head)."""
    return [name for name in names if trains(name, strategy) and not shares(name, strategy)]


@cache
def _built(model: ModelConfig, lora: LoraSettings, strategy: str) -> tuple[Scorer, Any, Arrays]:
    backbone, tokenizer = load_backbone(model.backbone)
    scorer = build_scorer(backbone, model, lora)
    for name, param in scorer.named_parameters():
        if param.requires_grad and not trains(name, strategy):
            param.requires_grad_(False)
    return scorer, tokenizer, trainable_arrays(scorer)


def shared_scorer(model: ModelConfig, lora: LoraSettings, strategy: str) -> tuple[Scorer, Any]:
    """The process's scorer and tokenizer for these settings: the backbone is loaded once.

    Tensors the strategy does not train (FFA-LoRA's A) are frozen at their seeded init.
    """
    scorer, tokenizer, _ = _built(model, lora, strategy)
    return scorer, tokenizer


def seeded_arrays(model: ModelConfig, lora: LoraSettings, strategy: str) -> Arrays:
    """The trainable tensors as first built (seeded), whatever the shared scorer holds now:
    a new run in a process that already trained must still start from the common init."""
    return _built(model, lora, strategy)[2]
