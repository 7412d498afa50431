"""The scorer interface: what training, evaluation, sharing and the audit need of a model.

Its one implementation is the item tower (``common/item_tower.py``); the earlier ``cross`` and
``two_tower`` scorers were retired after 0.2.0 (no measured result used them; git keeps them).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from peft import PeftModel
from torch import nn

from common.backbone import pool
from common.featurizer import TextFeaturizer
from common.task import Example, RankingCase


class Scorer(nn.Module):
    """Shared parts: the LoRA-wrapped encoder, pooling and the trainable head."""

    kind: str

    def __init__(self, encoder: PeftModel, pooling: str, head: nn.Module) -> None:
        super().__init__()
        self.encoder = encoder
        self.pooling = pooling
        self.head = head

    def embed(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, **extra: torch.Tensor
    ) -> torch.Tensor:
        hidden = self.encoder(
            input_ids=input_ids, attention_mask=attention_mask, **extra
        ).last_hidden_state
        return pool(hidden, attention_mask, self.pooling)

    def device(self) -> torch.device:
        return next(self.parameters()).device

    def prepare(self, featurizer: TextFeaturizer, batch_size: int = 256) -> None:
        """Per-round precomputation before training on a platform (none by default)."""

    def batch(
        self, featurizer: TextFeaturizer, examples: Sequence[Example]
    ) -> dict[str, torch.Tensor]:
        """Token tensors for ``forward``: row k of every tensor belongs to ``examples[k]``."""
        raise NotImplementedError

    def score_examples(
        self, featurizer: TextFeaturizer, examples: Sequence[Example], batch_size: int
    ) -> np.ndarray:
        """Logits of labelled examples, in order (no gradients; call in eval mode)."""
        raise NotImplementedError

    def score_cases(
        self, featurizer: TextFeaturizer, cases: Sequence[RankingCase], batch_size: int
    ) -> list[np.ndarray]:
        """Logits of each case's candidates, positive first (see RankingCase.candidates)."""
        raise NotImplementedError
