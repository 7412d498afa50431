"""The scorer interface and the two scorers that encode whole texts.

- ``cross``: candidate text and history text in one sequence -> click logit (classic CTR).
- ``two_tower``: history and candidate encoded separately by the same LoRA backbone,
  logit = w * cosine + b. Item vectors are computed once per evaluation, so ranking 100
  candidates costs one user pass instead of 100 joint passes.

The default, ``item_tower``, is in ``common/item_tower.py``.
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
        pairs = [Example(c.user, c.history, item, 0) for c in cases for item in c.candidates]
        logits = self.score_examples(featurizer, pairs, batch_size)
        return np.split(logits, np.cumsum([len(c.candidates) for c in cases])[:-1])


class CrossScorer(Scorer):
    """Candidate and history in one sequence; the joint encoding feeds a linear click head."""

    kind = "cross"

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        return self.head(self.embed(**batch)).squeeze(-1)

    def batch(
        self, featurizer: TextFeaturizer, examples: Sequence[Example]
    ) -> dict[str, torch.Tensor]:
        candidates = [featurizer.item_text[e.candidate] for e in examples]
        histories = [featurizer.history_text(e.history) for e in examples]
        return featurizer.encode(candidates, histories)

    @torch.no_grad()
    def score_examples(
        self, featurizer: TextFeaturizer, examples: Sequence[Example], batch_size: int
    ) -> np.ndarray:
        out = [torch.zeros(0)]
        for start in range(0, len(examples), batch_size):
            batch = self.batch(featurizer, examples[start : start + batch_size])
            out.append(self(**{k: v.to(self.device()) for k, v in batch.items()}).float().cpu())
        return torch.cat(out).numpy()


class TwoTowerScorer(Scorer):
    """History and candidate encoded apart by the same encoder; logit = w * cos + b.

    The head starts at w = 1/temperature, b = -0.5/temperature: sentence-embedding cosines
    of related texts sit around 0.3-0.7, so a start centred on 0.5 gives calibrated
    probabilities from step one instead of logits of +10 that the BCE loss must first undo.
    """

    kind = "two_tower"

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        user = self.embed(**{k[5:]: v for k, v in batch.items() if k.startswith("user_")})
        item = self.embed(**{k[5:]: v for k, v in batch.items() if k.startswith("item_")})
        return self.similarity_logits(user, item)

    def similarity_logits(self, user: torch.Tensor, item: torch.Tensor) -> torch.Tensor:
        cosine = nn.functional.cosine_similarity(user, item, dim=-1, eps=1e-6)
        return self.head(cosine.unsqueeze(-1)).squeeze(-1)

    def batch(
        self, featurizer: TextFeaturizer, examples: Sequence[Example]
    ) -> dict[str, torch.Tensor]:
        users = featurizer.encode([featurizer.history_text(e.history) for e in examples])
        items = featurizer.encode([featurizer.item_text[e.candidate] for e in examples])
        return {f"user_{k}": v for k, v in users.items()} | {
            f"item_{k}": v for k, v in items.items()
        }

    @torch.no_grad()
    def _vectors(
        self, featurizer: TextFeaturizer, texts: list[str], batch_size: int
    ) -> torch.Tensor:
        parts = []
        for start in range(0, len(texts), batch_size):
            tokens = featurizer.encode(texts[start : start + batch_size])
            parts.append(self.embed(**{k: v.to(self.device()) for k, v in tokens.items()}))
        return torch.cat(parts)

    @torch.no_grad()
    def score_examples(
        self, featurizer: TextFeaturizer, examples: Sequence[Example], batch_size: int
    ) -> np.ndarray:
        """Each distinct history and item is encoded once, however many examples share it."""
        if not examples:
            return np.zeros(0, dtype=np.float32)
        histories = list(dict.fromkeys(e.history for e in examples))
        items = list(dict.fromkeys(e.candidate for e in examples))
        users = self._vectors(
            featurizer, [featurizer.history_text(h) for h in histories], batch_size
        )
        vectors = self._vectors(featurizer, [featurizer.item_text[i] for i in items], batch_size)
        user_row = {h: k for k, h in enumerate(histories)}
        item_row = {i: k for k, i in enumerate(items)}
        user_index = torch.tensor([user_row[e.history] for e in examples], device=self.device())
        item_index = torch.tensor([item_row[e.candidate] for e in examples], device=self.device())
        logits = self.similarity_logits(users[user_index], vectors[item_index])
        return logits.float().cpu().numpy()
