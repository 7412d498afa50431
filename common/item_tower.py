"""The default scorer: the transformer encodes *items*, never concatenated histories.

LoRA sits on the top ``model.top_layers`` layers only; the frozen layers below are computed
once per item (``common/layer_cache.py``), so a training example costs the top layers over one
short item text. The user is the recency-weighted mean of their history's item vectors plus a
low-rank learned map (``common/item_tower_head.py``); logit = w * cos(user, item) +
beta * prior(item) + b, where the prior is the platform's DP-released item popularity
(``client/popularity_prior.py``).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

import numpy as np
import torch
from peft import LoraConfig, PeftModel
from torch import nn

from common.backbone import pool
from common.errors import ConfigError
from common.featurizer import TextFeaturizer
from common.item_tower_head import Carried, ItemTowerHead
from common.layer_cache import LayerCache, top_layers_only
from common.scorers import Scorer
from common.task import Example, RankingCase


class ItemTowerScorer(Scorer):
    """Users as pooled item vectors, items through the top LoRA layers from a frozen cache.

    A training example runs the top layers over its candidate's text only; its history
    items' vectors come from ``featurizer.item_vectors``, computed with the model as it was
    at the start of the round (:meth:`prepare`) — a function of public item texts and the
    received adapters, never of other examples, so each example's gradient stays its own.
    """

    kind = "item_tower"
    head: ItemTowerHead

    def __init__(self, encoder: PeftModel, pooling: str, head: nn.Module) -> None:
        super().__init__(encoder, pooling, head)
        # the lowest layer LoRA was put on (build_scorer's layers_to_transform)
        lora = encoder.peft_config["default"]
        assert isinstance(lora, LoraConfig) and isinstance(lora.layers_to_transform, list)
        self.first_top_layer = min(lora.layers_to_transform)

    def _cache(self, featurizer: TextFeaturizer) -> LayerCache:
        """The platform's frozen lower-layer states, computed on first use."""
        if featurizer.cache is None:
            tokens = featurizer.encode([featurizer.item_text[i] for i in featurizer.items])
            try:
                featurizer.cache = LayerCache.build(
                    self.encoder, tokens, self.first_top_layer, batch_size=256
                )
            except ValueError as err:
                raise ConfigError(
                    f"the item tower cannot cache this backbone ({err}); "
                    "choose another model.backbone"
                ) from None
        return featurizer.cache

    def encode_items(
        self, input_ids: torch.Tensor, attention_mask: torch.Tensor, states: torch.Tensor
    ) -> torch.Tensor:
        """Item vectors from cached states; padding beyond the longest row is trimmed."""
        length = int(attention_mask.sum(dim=1).max().clamp(min=1))
        input_ids, attention_mask = input_ids[:, :length], attention_mask[:, :length]
        with top_layers_only(self.encoder, self.first_top_layer, states[:, :length]):
            hidden = self.encoder(input_ids=input_ids, attention_mask=attention_mask)
        return pool(hidden.last_hidden_state, attention_mask, self.pooling)

    def forward(self, **batch: torch.Tensor) -> torch.Tensor:
        """(B,) logits of one candidate per example, or (B, W) of each example's candidates.

        A batch without ``item_states`` is a head-only step: the candidates' vectors come
        precomputed (``item_vectors``) and the adapters get no gradient."""
        if "item_states" in batch:
            item = self.encode_items(batch["item_ids"], batch["item_mask"], batch["item_states"])
            item = item.view(*batch["item_rows"].shape, -1)
        else:
            item = batch["item_vectors"]
        carried = (batch["carried"], batch["carried_mask"]) if "carried" in batch else None
        return self.head.logits(
            batch["history"],
            batch["history_mask"],
            batch["history_rows"],
            item,
            batch["item_rows"],
            batch["prior"],
            carried,
        )

    def _adapters_digest(self) -> bytes:
        """What the item vectors depend on besides the featurizer's frozen cache: this scorer
        (its backbone) and its adapters."""
        digest = hashlib.blake2b(id(self).to_bytes(8, "little"), digest_size=16)
        for name, param in self.encoder.named_parameters():
            if "lora_" in name:
                digest.update(param.detach().cpu().numpy().tobytes())
        return digest.digest()

    @torch.no_grad()
    def prepare(self, featurizer: TextFeaturizer, batch_size: int = 256) -> None:
        """Item vectors of the whole catalogue under the current adapters (history side);
        kept when the adapters have not changed since (the lockstep schedule's head-only
        rounds, where a recomputation would cost as much as the step)."""
        key = self._adapters_digest()
        if featurizer.item_vectors is not None and featurizer.item_vectors_of == key:
            return
        cache = self._cache(featurizer)
        parts = [torch.zeros(0, self.encoder.config.hidden_size, device=self.device())]
        for start in range(0, len(featurizer.items), batch_size):
            rows = slice(start, start + batch_size)
            parts.append(
                self.encode_items(
                    cache.input_ids[rows].to(self.device()),
                    cache.attention_mask[rows].to(self.device()),
                    cache.states[rows].to(self.device()),
                )
            )
        featurizer.item_vectors = torch.cat(parts)
        featurizer.item_vectors_of = key

    @torch.no_grad()
    def text_vectors(self, featurizer: TextFeaturizer, texts: Sequence[str]) -> torch.Tensor:
        """Item vectors of texts outside the catalogue (an item liked on another platform),
        by a full pass of the encoder: what the cached path computes for catalogue items."""
        if not texts:
            return torch.zeros(0, self.encoder.config.hidden_size, device=self.device())
        tokens = {k: v.to(self.device()) for k, v in featurizer.encode(list(texts)).items()}
        return self.embed(tokens["input_ids"], tokens["attention_mask"])

    def _history(
        self, featurizer: TextFeaturizer, histories: Sequence[tuple[str, ...]]
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(B, H, D) history item vectors, (B, H) mask and item rows; unknown items are
        masked out."""
        assert featurizer.item_vectors is not None, "call prepare() first"
        width = max([1, *(len(h) for h in histories)])
        rows = torch.zeros(len(histories), width, dtype=torch.long)
        mask = torch.zeros(len(histories), width, dtype=torch.long)
        for k, history in enumerate(histories):
            known = [featurizer.item_row[i] for i in history if i in featurizer.item_row]
            rows[k, : len(known)] = torch.tensor(known, dtype=torch.long)
            mask[k, : len(known)] = 1
        rows = rows.to(featurizer.item_vectors.device)
        return featurizer.item_vectors[rows], mask.to(rows.device), rows

    def _carried(
        self, featurizer: TextFeaturizer, cases: Sequence[Example | RankingCase]
    ) -> Carried | None:
        """The (B, C, D) vectors and mask of what each person brought, when the head reads it."""
        if not self.head.carried:
            return None
        vectors, mask, _ = self._history(featurizer, [c.carried for c in cases])
        return vectors, mask

    def batch(
        self,
        featurizer: TextFeaturizer,
        examples: Sequence[Example],
        through_adapters: bool = True,
    ) -> dict[str, torch.Tensor]:
        """Examples with ``negatives`` give (B, W) candidates (positive first; a shorter list
        is padded with its positive and ``candidate_mask`` = 0); others one candidate each.
        Without ``through_adapters`` the candidates' current vectors replace their tokens."""
        cache = self._cache(featurizer)
        if featurizer.item_vectors is None:
            self.prepare(featurizer)
        vectors = featurizer.item_vectors
        assert vectors is not None
        if any(e.negatives for e in examples):
            width = 1 + max(len(e.negatives) for e in examples)
            ids = [(e.candidate, *e.negatives) for e in examples]
            mask = torch.tensor([[k < len(c) for k in range(width)] for c in ids])
            rows = torch.tensor(
                [
                    [featurizer.item_row[c[k if k < len(c) else 0]] for k in range(width)]
                    for c in ids
                ]
            )
        else:
            rows = torch.tensor([featurizer.item_row[e.candidate] for e in examples])
            mask = torch.ones_like(rows, dtype=torch.bool)
        history, history_mask, history_rows = self._history(
            featurizer, [e.history for e in examples]
        )
        flat = rows.reshape(-1)
        candidates = (
            {
                "item_ids": cache.input_ids[flat],
                "item_mask": cache.attention_mask[flat],
                "item_states": cache.states[flat],
            }
            if through_adapters
            else {"item_vectors": vectors[rows.to(vectors.device)]}
        )
        carried = self._carried(featurizer, examples)
        return (
            candidates
            | {
                "item_rows": rows,
                "candidate_mask": mask,
                "history": history,
                "history_mask": history_mask,
                "history_rows": history_rows,
                "prior": featurizer.prior[rows],
            }
            | ({} if carried is None else {"carried": carried[0], "carried_mask": carried[1]})
        )

    @torch.no_grad()
    def score_examples(
        self, featurizer: TextFeaturizer, examples: Sequence[Example], batch_size: int
    ) -> np.ndarray:
        """Every item vector is computed once; each example is then a cosine and the prior."""
        if not examples:
            return np.zeros(0, dtype=np.float32)
        self.prepare(featurizer, batch_size)
        vectors = featurizer.item_vectors
        assert vectors is not None
        out = []
        for start in range(0, len(examples), batch_size):
            chunk = examples[start : start + batch_size]
            rows = torch.tensor([featurizer.item_row[e.candidate] for e in chunk])
            history, mask, history_rows = self._history(featurizer, [e.history for e in chunk])
            rows = rows.to(vectors.device)
            prior = featurizer.prior.to(vectors.device)[rows]
            carried = self._carried(featurizer, chunk)
            logits = self.head.logits(
                history, mask, history_rows, vectors[rows], rows, prior, carried
            )
            out.append(logits.float().cpu())
        return torch.cat(out).numpy()

    @torch.no_grad()
    def score_cases(
        self, featurizer: TextFeaturizer, cases: Sequence[RankingCase], batch_size: int
    ) -> list[np.ndarray]:
        """Each case's user vector once for all its candidates: the (case × candidate) pairs
        of the generic path would rebuild the same user a hundred times per case."""
        if not cases:
            return []
        self.prepare(featurizer, batch_size)
        vectors = featurizer.item_vectors
        assert vectors is not None
        prior = featurizer.prior.to(vectors.device)
        out: list[np.ndarray] = []
        for start in range(0, len(cases), batch_size):
            chunk = cases[start : start + batch_size]
            width = max(len(c.candidates) for c in chunk)
            rows = torch.tensor(
                [
                    [featurizer.item_row[i] for i in c.candidates]
                    + [featurizer.item_row[c.positive]] * (width - len(c.candidates))
                    for c in chunk
                ],
                dtype=torch.long,
                device=vectors.device,
            )
            history, mask, history_rows = self._history(featurizer, [c.history for c in chunk])
            carried = self._carried(featurizer, chunk)
            logits = self.head.logits(
                history, mask, history_rows, vectors[rows], rows, prior[rows], carried
            )
            scores = logits.float().cpu().numpy()
            out.extend(scores[k, : len(c.candidates)] for k, c in enumerate(chunk))
        return out

    @torch.no_grad()
    def score_catalogue(
        self,
        featurizer: TextFeaturizer,
        cases: Sequence[RankingCase],
        items: Sequence[str],
        batch_size: int,
    ) -> np.ndarray:
        """(cases, items) logits: each case's user against every given catalogue item."""
        self.prepare(featurizer, batch_size)
        vectors = featurizer.item_vectors
        assert vectors is not None
        rows = torch.tensor([featurizer.item_row[i] for i in items], dtype=torch.long)
        rows = rows.to(vectors.device)
        prior = featurizer.prior.to(vectors.device)[rows]
        out = []
        for start in range(0, len(cases), batch_size):
            chunk = cases[start : start + batch_size]
            history, mask, history_rows = self._history(featurizer, [c.history for c in chunk])
            logits = self.head.catalogue_logits(
                history,
                mask,
                history_rows,
                vectors[rows],
                rows,
                prior,
                self._carried(featurizer, chunk),
            )
            out.append(logits.float().cpu())
        if not out:
            return np.zeros((0, len(items)), dtype=np.float32)
        return torch.cat(out).numpy()
