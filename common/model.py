"""The LoRA scorer: a frozen pretrained transformer, peft LoRA adapters on its top layers and
the item tower's head, built from the configuration (:func:`build_scorer`).

The backbone is loaded by ``common/backbone.py``, the text it reads made by
``common/featurizer.py``, and the scorer itself is ``common/item_tower.py``. It keeps one
labelled example as the unit of per-example gradients: a batch of B examples is B rows in
every encoder call, in the same order, which Opacus needs to sum the per-sample gradients of
repeated calls correctly.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import PreTrainedModel

from common.backbone import is_encoder, lora_targets
from common.config import LoraSettings, ModelConfig
from common.errors import ConfigError
from common.item_tower import ItemTowerScorer
from common.item_tower_head import ItemTowerHead
from common.layer_cache import layer_list_name, layers_of


def build_scorer(
    backbone: PreTrainedModel, model: ModelConfig, lora: LoraSettings
) -> ItemTowerScorer:
    """Freeze the backbone, add LoRA adapters to its top ``model.top_layers`` layers and the
    item tower's head; only those stay trainable.

    The LoRA A matrices and the head are drawn from ``lora.seed`` so every platform starts
    from the same initialisation (FFA-LoRA relies on a shared, frozen A).
    """
    pooling = (
        model.pooling if model.pooling != "auto" else ("mean" if is_encoder(backbone) else "last")
    )
    layer_count = len(layers_of(backbone))
    if model.top_layers > layer_count:
        raise ConfigError(
            f"model.top_layers = {model.top_layers} but the backbone has {layer_count} layers"
        )
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(lora.seed)
    try:
        encoder = get_peft_model(
            backbone,
            LoraConfig(
                r=lora.rank,
                lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft says int; any number works
                lora_dropout=lora.dropout,
                target_modules=lora_targets(backbone, lora.target_modules),
                layers_to_transform=list(range(layer_count - model.top_layers, layer_count)),
                layers_pattern=layer_list_name(backbone).rsplit(".", 1)[-1],
                bias="none",
            ),
        )
        head = ItemTowerHead(
            backbone.config.hidden_size,
            model.user_rank,
            model.temperature,
            model.prior_weight,
            model.private_factors,
            model.private_item_slots,
            model.item_score,
            model.carried_history,
        )
    finally:
        torch.random.set_rng_state(generator_state)
    if not any(p.requires_grad for p in encoder.parameters()):
        raise ConfigError(
            f"lora.target_modules = {lora.target_modules!r} matched no layer of the backbone"
        )
    # No dropout: DP noise already regularises, a step runs 12 % faster without it, and
    # non-private training becomes reproducible.
    for module in encoder.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    return ItemTowerScorer(encoder, pooling, head)


def count_parameters(module: nn.Module, trainable_only: bool = False) -> int:
    return sum(p.numel() for p in module.parameters() if p.requires_grad or not trainable_only)
