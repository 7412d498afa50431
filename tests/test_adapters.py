"""Adapter tensors: named arrays in and out, peft-format save/load, Opacus unwrapping."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from opacus import GradSampleModule
from peft import PeftModel
from transformers import AutoModel

from common.adapters import (
    HEAD_FILE,
    META_FILE,
    load_adapter,
    load_trainable_arrays,
    save_adapter,
    trainable_arrays,
    unwrap,
)
from common.backbone import load_backbone
from common.config import LoraSettings, ModelConfig
from common.errors import FedFuseError
from common.model import build_scorer


def _scorer(backbone: Path, seed: int = 0):
    model, _ = load_backbone(str(backbone))
    config = ModelConfig(backbone=str(backbone), private_factors=4, private_item_slots=16)
    return build_scorer(model, config, LoraSettings(seed=seed))


def _perturb(scorer) -> None:
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for param in scorer.parameters():
            if param.requires_grad:
                param.add_(torch.randn(param.shape, generator=generator))


def test_arrays_are_exactly_the_trainable_tensors(tiny_bert_dir: Path) -> None:
    scorer = _scorer(tiny_bert_dir)
    arrays = trainable_arrays(scorer)
    trainable = {n: p for n, p in scorer.named_parameters() if p.requires_grad}
    assert list(arrays) == list(trainable)
    assert all(
        a.dtype == np.float32 and a.shape == tuple(trainable[n].shape) for n, a in arrays.items()
    )
    arrays[next(iter(arrays))][...] = 99.0  # a copy: the model is untouched
    assert not torch.any(trainable[next(iter(trainable))] == 99.0)


def test_arrays_round_trip_between_scorers(tiny_bert_dir: Path) -> None:
    source, target = _scorer(tiny_bert_dir), _scorer(tiny_bert_dir)
    _perturb(source)
    load_trainable_arrays(target, trainable_arrays(source))
    for name, value in trainable_arrays(target).items():
        np.testing.assert_array_equal(value, trainable_arrays(source)[name])


def test_mismatched_arrays_are_refused(tiny_bert_dir: Path) -> None:
    scorer = _scorer(tiny_bert_dir)
    arrays = trainable_arrays(scorer)
    name = next(iter(arrays))
    with pytest.raises(FedFuseError, match="missing"):
        load_trainable_arrays(scorer, {k: v for k, v in arrays.items() if k != name})
    with pytest.raises(FedFuseError, match="shape"):
        load_trainable_arrays(scorer, arrays | {name: np.zeros((1, 1), np.float32)})


def test_opacus_wrapper_is_unwrapped(tiny_bert_dir: Path) -> None:
    scorer = _scorer(tiny_bert_dir)
    wrapped = GradSampleModule(scorer)
    assert unwrap(wrapped) is scorer
    assert list(trainable_arrays(wrapped)) == list(trainable_arrays(scorer))


def test_saved_adapter_loads_with_peft_and_fedfuse(tiny_bert_dir: Path, tmp_path: Path) -> None:
    scorer = _scorer(tiny_bert_dir)
    _perturb(scorer)
    out = save_adapter(scorer, tmp_path / "adapter")
    assert (out / "adapter_config.json").is_file() and (out / "adapter_model.safetensors").is_file()
    assert (out / HEAD_FILE).is_file()
    assert [p.name for p in tmp_path.iterdir()] == ["adapter"]  # no staging folder left

    # peft's own loader, on the bare backbone
    peft_model = PeftModel.from_pretrained(AutoModel.from_pretrained(tiny_bert_dir), out)
    expected = {n: p for n, p in scorer.encoder.named_parameters() if "lora_" in n}
    loaded = {n: p for n, p in peft_model.named_parameters() if "lora_" in n}
    assert expected.keys() == loaded.keys()
    for name, value in expected.items():
        torch.testing.assert_close(loaded[name], value, rtol=0, atol=0)

    # FedFuse's loader restores LoRA and head into a fresh scorer
    fresh = _scorer(tiny_bert_dir, seed=5)
    load_adapter(fresh, out)
    for name, value in trainable_arrays(scorer).items():
        np.testing.assert_array_equal(trainable_arrays(fresh)[name], value)


def test_adapter_for_another_scorer_is_refused(tiny_bert_dir: Path, tmp_path: Path) -> None:
    """An adapter a retired scorer saved (an old run's) is refused, not loaded into the tower."""
    out = save_adapter(_scorer(tiny_bert_dir), tmp_path / "adapter")
    meta = json.loads((out / META_FILE).read_text(encoding="utf-8"))
    (out / META_FILE).write_text(json.dumps(meta | {"scorer": "two_tower"}), encoding="utf-8")
    with pytest.raises(FedFuseError, match="scorer 'two_tower'"):
        load_adapter(_scorer(tiny_bert_dir), out)
    with pytest.raises(FedFuseError, match="not a FedFuse adapter folder"):
        load_adapter(_scorer(tiny_bert_dir), tmp_path)
