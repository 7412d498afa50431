"""The trainable part of a scorer (LoRA adapters + head): as named arrays, and on disk.

Only these tensors ever leave a platform, so this module is the single definition of "what
is sent". On disk they use peft's own format (``adapter_config.json`` and
``adapter_model.safetensors``, loadable with ``PeftModel.from_pretrained`` on the backbone),
plus the head and a small description of the scorer next to them.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Collection
from pathlib import Path
from typing import Any

import numpy as np
import torch
from opacus import GradSampleModule
from peft import load_peft_weights, set_peft_model_state_dict
from safetensors.numpy import save_file as save_numpy
from safetensors.torch import load_file, save_file
from torch import nn

from common.errors import FedFuseError
from common.scorers import Scorer

HEAD_FILE = "fedfuse_head.safetensors"
META_FILE = "fedfuse_scorer.json"
FORMAT_VERSION = 1


def unwrap(model: nn.Module) -> Scorer:
    """The scorer inside an Opacus ``GradSampleModule`` (whose parameter names gain a prefix)."""
    while isinstance(model, GradSampleModule):
        model = model._module
    if not isinstance(model, Scorer):
        raise TypeError(f"expected a Scorer, got {type(model).__name__}")
    return model


def trainable_arrays(
    model: nn.Module, names: Collection[str] | None = None
) -> dict[str, np.ndarray]:
    """Trainable tensors (LoRA + head) by parameter name, as float32 numpy copies.

    ``names`` restricts the result to a subset (e.g. what a strategy shares), in model order.
    """
    scorer = unwrap(model)
    return {
        name: param.detach().to(torch.float32).cpu().numpy().copy()
        for name, param in scorer.named_parameters()
        if param.requires_grad and (names is None or name in names)
    }


def load_trainable_arrays(
    model: nn.Module, arrays: dict[str, np.ndarray], names: Collection[str] | None = None
) -> None:
    """Overwrite trainable tensors (all, or exactly ``names``); names and shapes must match."""
    params = {
        n: p
        for n, p in unwrap(model).named_parameters()
        if p.requires_grad and (names is None or n in names)
    }
    missing = sorted(set(params) - set(arrays))
    unexpected = sorted(set(arrays) - set(params))
    if missing or unexpected:
        raise FedFuseError(
            "adapter tensors do not match the scorer: "
            f"missing {missing[:3]}, unexpected {unexpected[:3]}"
        )
    with torch.no_grad():
        for name, param in params.items():
            value = np.asarray(arrays[name])
            if tuple(value.shape) != tuple(param.shape):
                raise FedFuseError(
                    f"adapter tensor {name}: shape {value.shape}, expected {tuple(param.shape)}"
                )
            param.copy_(torch.from_numpy(value).to(param.dtype))


def save_adapter(
    model: nn.Module, out: Path | str, extra: dict[str, dict[str, np.ndarray]] | None = None
) -> Path:
    """Write the adapter folder atomically (staged next to ``out``, then renamed into place),
    with ``extra`` safetensors files (name → arrays) inside it: the lockstep server's
    optimiser state is saved with the tensors it belongs to, or not at all."""
    scorer = unwrap(model)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        scorer.encoder.save_pretrained(str(staging))
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in scorer.head.state_dict().items()},
            staging / HEAD_FILE,
        )
        meta = {"format_version": FORMAT_VERSION, "scorer": scorer.kind, "pooling": scorer.pooling}
        (staging / META_FILE).write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")
        for name, arrays in (extra or {}).items():
            save_numpy(arrays, staging / name)
        if out.exists():
            shutil.rmtree(out)
        os.replace(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return out


def load_adapter(model: nn.Module, folder: Path | str) -> None:
    """Load adapters and head saved by :func:`save_adapter` into a scorer of the same shape."""
    scorer = unwrap(model)
    folder = Path(folder)
    meta_path = folder / META_FILE
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as err:
        raise FedFuseError(f"{meta_path}: not a FedFuse adapter folder ({err})") from None
    if meta.get("scorer") != scorer.kind:
        raise FedFuseError(
            f"{meta_path}: adapter is for scorer {meta.get('scorer')!r}, not {scorer.kind!r}"
        )
    # torch's (missing_keys, unexpected_keys); peft's annotation names no type
    result: Any = set_peft_model_state_dict(
        scorer.encoder, load_peft_weights(str(folder), device="cpu")
    )
    missing = [key for key in result.missing_keys if "lora_" in key]
    if result.unexpected_keys or missing:
        raise FedFuseError(
            f"{folder}: adapter does not fit the scorer "
            f"(unexpected {result.unexpected_keys[:3]}, missing {missing[:3]})"
        )
    scorer.head.load_state_dict(load_file(folder / HEAD_FILE))
