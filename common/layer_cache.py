"""Run only the top layers of a Hugging Face model, from cached lower-layer states.

The item tower puts LoRA on the top ``k`` transformer layers only, so everything below them is
frozen and depends on the item's text alone: it is computed once per item
(:class:`LayerCache`) and every training step recomputes just the top layers. That cuts the
per-example cost by the share of frozen layers and keeps per-example gradients (Opacus) on the
small graph that remains.

How the top layers are run, for any architecture: the model's own ``forward`` is called as
usual (it builds its attention masks, position ids and rotary embeddings itself), but the
frozen layers in its layer list are swapped for pass-throughs and the first trainable layer's
input is replaced by the cached states. :func:`layers_of` finds the layer list generically;
:meth:`LayerCache.build` checks the result against a full forward pass and refuses a model
where the two differ, so an architecture this cannot handle is never silently wrong.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

# Largest difference from a full forward pass tolerated by the self-check (float32 rounding).
SELF_CHECK_TOLERANCE = 1e-4


def layer_list_name(model: nn.Module) -> str:
    """Qualified name of the transformer's layer list: the ModuleList with
    ``num_hidden_layers`` entries (``encoder.layer`` for BERT, ``h`` for GPT-2, …)."""
    config = getattr(model, "config", None)
    count = getattr(config, "num_hidden_layers", None) or getattr(config, "n_layer", None)
    for name, module in model.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == count:
            return name
    raise ValueError(f"{type(model).__name__}: no layer list of {count} layers found")


def layers_of(model: nn.Module) -> nn.ModuleList:
    layers = model.get_submodule(layer_list_name(model))
    assert isinstance(layers, nn.ModuleList)  # layer_list_name finds a ModuleList
    return layers


class _PassThrough(nn.Module):
    """Stands in for a frozen layer: returns its input states unchanged."""

    def forward(self, hidden_states: torch.Tensor, *args: object, **kwargs: object) -> torch.Tensor:
        return hidden_states


@contextmanager
def top_layers_only(model: nn.Module, first: int, states: torch.Tensor) -> Iterator[None]:
    """Within the block, ``model(...)`` skips layers ``< first`` and feeds ``states`` (the
    cached input of layer ``first``) to the top layers instead."""
    layers = layers_of(model)
    saved = [layers[index] for index in range(first)]

    def replace_input(_: nn.Module, args: tuple, kwargs: dict) -> tuple[tuple, dict]:
        if args:
            return (states, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": states}

    handle = layers[first].register_forward_pre_hook(replace_input, with_kwargs=True)
    try:
        for index in range(first):
            layers[index] = _PassThrough()
        yield
    finally:
        handle.remove()
        for index, layer in enumerate(saved):
            layers[index] = layer


class LayerCache:
    """Tokens and frozen lower-layer states of a fixed list of texts (a platform's items)."""

    def __init__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, states: torch.Tensor):
        self.input_ids = input_ids
        self.attention_mask = attention_mask
        self.states = states

    @classmethod
    @torch.no_grad()
    def build(
        cls,
        model: nn.Module,
        tokens: dict[str, torch.Tensor],
        first: int,
        batch_size: int,
    ) -> LayerCache:
        """Input states of layer ``first`` for every row of ``tokens`` (one full pass each).

        Raises ``ValueError`` if running the top layers from the cache does not reproduce the
        full model's output on the first rows (an architecture whose layers need more than
        their input states and the model's own masks).
        """
        was_training = model.training
        model.eval()
        try:
            parts = []
            for start in range(0, len(tokens["input_ids"]), batch_size):
                chunk = {k: v[start : start + batch_size] for k, v in tokens.items()}
                hidden = model(**chunk, output_hidden_states=True).hidden_states
                parts.append(hidden[first])
            cache = cls(tokens["input_ids"], tokens["attention_mask"], torch.cat(parts))
            rows = slice(0, min(4, len(cache.states)))
            probe = {k: v[rows] for k, v in tokens.items()}
            full = model(**probe).last_hidden_state
            with top_layers_only(model, first, cache.states[rows]):
                cached = model(**probe).last_hidden_state
            mask = probe["attention_mask"].bool()
            error = (full - cached)[mask].abs().max().item() if mask.any() else 0.0
        finally:
            model.train(was_training)
        if error > SELF_CHECK_TOLERANCE:
            raise ValueError(
                f"{type(model).__name__}: running the top layers from cached states differs "
                f"from the full model by {error:.2g}"
            )
        return cache
