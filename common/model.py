"""The LoRA scorer: a frozen pretrained transformer, peft LoRA adapters and a small head,
built from the configuration (:func:`build_scorer`).

Three scorers share one backbone design (``common/backbone.py``) and one featurizer
(``common/featurizer.py``): ``item_tower`` (the default, ``common/item_tower.py``), and
``cross`` and ``two_tower`` (``common/scorers.py``). All keep one labelled example as the unit
of per-example gradients: a batch of B examples is B rows in every encoder call, in the same
order, which Opacus needs to sum the per-sample gradients of repeated calls correctly.
"""

from __future__ import annotations

import torch
from peft import LoraConfig, get_peft_model
from torch import nn
from transformers import PreTrainedModel

# The ``X as X`` imports are re-exports for modules open in other work that still import them
# from here (server/audit/canary_audit.py, server/serving/recommender.py,
# server/simulation/simulation.py, client/dp_training.py); drop them once those import from
# common.backbone and common.featurizer.
from common.backbone import is_encoder, lora_targets
from common.backbone import resolve_backbone as resolve_backbone
from common.config import LoraSettings, ModelConfig
from common.errors import ConfigError
from common.featurizer import TextFeaturizer as TextFeaturizer
from common.item_tower import ItemTowerScorer
from common.item_tower_head import ItemTowerHead
from common.layer_cache import layer_list_name, layers_of
from common.scorers import CrossScorer, Scorer, TwoTowerScorer

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
                lora_alpha=lora.alpha,  # type: ignore[arg-type]  # peft says int; any number works
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
