"""The lockstep schedule's server step: one AdamW over the shared tensors.

Under ``federation.schedule = "lockstep"`` a round is one DP-SGD step. Each platform due to
step sends the noised gradient of the shared tensors (the Gaussian mechanism's output; its
private part it steps at home), and the server applies their unweighted mean — one step of
each platform's own mechanism — with one AdamW whose state it keeps across rounds:

    g = (1/K) Σ_k g̃_k        global ← AdamW(global, g)

Averaging K noised gradients before the step divides their independent noise by √K, where
averaging K independently trained adapters (the ``rounds`` schedule) lets each platform drift
on its own noise for a whole round first (docs/results.md: "One synchronised DP step per
round"). The groups and rates are the platforms' own (``common.training.make_optimizer``),
so the ``local`` and ``centralized`` baselines, a federation of one, run the same step.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

from common.config import TrainConfig
from common.training import load_moments, make_optimizer, optimizer_moments

Arrays = dict[str, np.ndarray]
MOMENTS_FILE = "server_optimizer.safetensors"  # in each round's adapter folder (resume)


class ServerOptimizer:
    """The shared tensors and their optimiser state, stepped with averaged gradients."""

    def __init__(self, train: TrainConfig, arrays: Arrays, moments: Arrays | None = None) -> None:
        self.train = train
        self.tensors = {
            name: nn.Parameter(torch.from_numpy(np.array(value, dtype=np.float32)))
            for name, value in arrays.items()
        }
        self.moments: Arrays = dict(moments or {})

    @property
    def arrays(self) -> Arrays:
        return {name: tensor.detach().numpy().copy() for name, tensor in self.tensors.items()}

    def step(self, gradients: Sequence[Arrays], learning_rate: float) -> Arrays:
        """One AdamW step on the mean of the platforms' gradients; a tensor no platform sent
        (the adapters on a head-only step) is left as it is, its state untouched. Returns
        the new shared tensors."""
        unknown = {name for g in gradients for name in g} - set(self.tensors)
        if unknown:
            raise ValueError(f"gradients of tensors the server does not hold: {sorted(unknown)}")
        optimizer = make_optimizer(self.tensors.items(), self.train, learning_rate)
        load_moments(optimizer, self.tensors, self.moments)
        for name, tensor in self.tensors.items():
            sent = [g[name] for g in gradients if name in g]
            mean = np.mean(sent, axis=0, dtype=np.float32) if sent else None
            tensor.grad = torch.from_numpy(mean) if mean is not None else None
        optimizer.step()
        for tensor in self.tensors.values():
            tensor.grad = None
        self.moments = optimizer_moments(optimizer, self.tensors)
        return self.arrays
