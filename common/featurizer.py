"""The text the model sees: item texts and histories as token tensors, and the per-platform
state the item tower derives from them."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from common.layer_cache import LayerCache


class TextFeaturizer:
    """Turns item texts into token tensors; the only place that decides what text the model sees."""

    def __init__(
        self, tokenizer: PreTrainedTokenizerBase, item_text: dict[str, str], max_length: int
    ) -> None:
        self.tokenizer = tokenizer
        self.item_text = item_text
        self.max_length = max_length
        self.items = list(item_text)
        self.item_row = {item: row for row, item in enumerate(self.items)}
        # item_tower state, all derived from public item texts, the received model and the
        # platform's DP-released prior: the frozen layers' cache, the item vectors of the
        # current model (the history side of a training round) and the prior per item row.
        self.cache: LayerCache | None = None
        self.item_vectors: torch.Tensor | None = None
        self.item_vectors_of: bytes = b""  # the adapters they were computed with (a digest)
        self.prior = torch.zeros(len(self.items))

    def set_prior(self, prior: dict[str, float]) -> None:
        """Per-item prior scores (items without one get 0, the catalogue's mean)."""
        self.prior = torch.tensor([prior.get(item, 0.0) for item in self.items])

    def encode(self, texts: list[str]) -> dict[str, torch.Tensor]:
        """Item texts as padded token tensors, each cut to ``max_length`` tokens."""
        return dict(
            self.tokenizer(
                texts,
                padding=True,
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
        )
