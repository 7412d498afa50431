"""What happens to the per-unit gradient rows between Opacus' per-sample gradients and its
clipping, and to the noised sum after it.

Before clipping: a unit's candidate rows are summed into one row (:func:`fold_candidates`), a
user's unit rows into one (:func:`fold_users`, ``dp.unit = "user"``), and the parts named by
``dp.gradient_scales`` are multiplied by their scale (:func:`scale_rows`), so each clipped row
is one privacy unit's whole gradient. After the noise: the scales are divided out again
(:func:`unscale`, post-processing), run from Opacus' step hook (:func:`after_noise`).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from opacus.optimizers import DPOptimizer
from torch import nn

from common.errors import ConfigError


def fold_candidates(model: nn.Module, units: int, width: int) -> None:
    """Sum the per-row gradients of each unit's ``width`` candidate rows into one per unit.

    The encoder saw ``units * width`` rows and Opacus scaled each row's gradient by that
    count (mean loss over its rows); the loss is a mean over ``units``, hence the division.
    Nothing is clipped yet: clipping then bounds each unit's whole contribution."""
    for param in model.parameters():
        sample = getattr(param, "grad_sample", None)
        if param.requires_grad and sample is not None and sample.shape[0] == units * width:
            folded = sample.view(units, width, *param.shape).sum(dim=1) / width
            param.grad_sample = folded  # type: ignore[attr-defined]  # Opacus' attribute


def fold_users(model: nn.Module, sizes: list[int]) -> None:
    """Sum each user's per-unit gradient rows (consecutive, ``sizes[i]`` rows for user i) into
    one row per user, before clipping: clipping then bounds the user's whole contribution.

    A unit's row is its own loss's gradient, as the example-level step clips it (Opacus'
    mean-loss scaling by the rows' count cancels the loss's mean over units; for candidate
    rows :func:`fold_candidates` has done so already), so a user's row is the plain sum of
    their units' gradients."""
    owners = torch.repeat_interleave(torch.arange(len(sizes)), torch.tensor(sizes))
    for param in model.parameters():
        sample = getattr(param, "grad_sample", None)
        if param.requires_grad and sample is not None:
            rows = sample.new_zeros((len(sizes), *param.shape))
            rows.index_add_(0, owners.to(sample.device), sample)
            param.grad_sample = rows  # type: ignore[attr-defined]  # Opacus' attribute


def scaled_tensors(scorer: nn.Module, scales: dict[str, float]) -> list[tuple[nn.Parameter, float]]:
    """The trainable tensors ``dp.gradient_scales`` names, each with its scale. A key that
    names none is an error: a misspelt part would silently keep its share of the clip norm
    (``fedfuse simulate`` checks this before it starts)."""
    trainable = [(n, p) for n, p in scorer.named_parameters() if p.requires_grad]
    for key in scales:
        if not any(key in name for name, _ in trainable):
            raise ConfigError(f"dp.gradient_scales: '{key}' names no trainable tensor")
    chosen = []
    for name, param in trainable:
        matching = [scale for key, scale in scales.items() if key in name]
        if len(matching) > 1:
            raise ConfigError(f"dp.gradient_scales: more than one key names {name}")
        if matching:
            chosen.append((param, matching[0]))
    return chosen


def scale_rows(scaled: list[tuple[nn.Parameter, float]]) -> None:
    """Multiply the per-unit gradient rows of the scaled tensors, before clipping (a tensor
    frozen on a head-only step has no rows)."""
    for param, scale in scaled:
        sample = getattr(param, "grad_sample", None)
        if sample is not None:
            sample.mul_(scale)


def after_noise(optimizer: DPOptimizer, action: Callable[[], None]) -> None:
    """Run ``action`` once Opacus has added the noise, before the optimiser step. The hooks
    already there (the accountant, an audit's probe, an earlier action) run first: they see
    the Gaussian mechanism's own output."""
    inner = optimizer.step_hook

    def hook(opt: DPOptimizer) -> None:
        if inner is not None:
            inner(opt)
        action()

    optimizer.step_hook = hook


def unscale(scaled: list[tuple[nn.Parameter, float]]) -> None:
    """Divide the noised gradient by the gradient scales (post-processing)."""
    for param, scale in scaled:
        if param.grad is not None:
            param.grad.div_(scale)
