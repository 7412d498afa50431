"""One round of local training on a platform: DP-SGD with Opacus, or the same loop without DP.

This is FedFuse's DP training step, for either privacy unit (``dp.unit``): ``example``, one
training unit, or ``user``, all of one user's training units. Per round:

1. Poisson sampling over privacy units: every unit joins each logical batch independently with
   probability q = expected units per batch / N (Opacus' ``DPDataLoader``), so the batch size
   varies and can be 0 — that is what the privacy analysis assumes. Under ``user`` N counts
   users and a batch expects ``expected_batch_size / max_examples_per_user`` of them
   (:func:`expected_batch`), and each sampled user brings a uniformly random subset of at most
   k = ``max_examples_per_user`` of their training units. The generator behind both draws is
   seeded from the operating system's entropy each round, never from ``train.seed``: that seed
   is in the run configuration the server sends, and amplification by subsampling holds only
   if nobody outside the platform can predict which units were drawn.
2. Per-unit gradients of the trainable tensors only (LoRA + head; the backbone is frozen),
   from Opacus' hooks. A training unit is one labelled
   example, or under the ranking objective one positive with its own sampled negatives: its W
   candidates run through the adapters as W rows, and their per-row gradients are summed into
   the unit's (``client/gradient_rows.py``). Under ``user`` each user's unit gradients are then
   summed into one row per user (the same module). Each row — a privacy unit's whole
   gradient — is clipped to L2 norm ``max_grad_norm`` by Opacus' ``DPOptimizer``.
   ``dp.gradient_scales`` first multiplies the named parts of every row by their scale, so
   a part with weak signal (the private item factors) gets a larger share of the clip norm
   and one with strong signal (three mixing weights) a smaller one; after the noise the
   summed gradient is divided by the same scales (post-processing). The mechanism is
   unchanged: each row's norm is still at most C and the noise still N(0, σ²C²).
   The item tower trains its adapters on every ``train.adapter_every``-th step only; the
   steps between update the head alone on the current item vectors (no encoder pass, about
   100x cheaper). Every step is the same Gaussian mechanism (σ, q, C) over the tensors it
   updates, so the accounting is unchanged.
3. Gaussian noise N(0, σ²C²) added to the summed clipped gradients, then the optimiser step.
   A logical batch is run as physical chunks of similar text length (memory, padding), a
   user's units always in one chunk; the chunks only clip and accumulate, and noise is added
   once per logical batch.

The mechanism actually executed (σ, q, steps, C) is read back from Opacus' own accountant and
returned, so the caller records in the ledger exactly what ran. A fresh ``PrivacyEngine`` per
round is safe here because ε is never taken from it: the ledger composes every round.
"""

from __future__ import annotations

import logging
import math
import secrets
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from opacus import PrivacyEngine
from opacus.optimizers import DPOptimizer
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from client.gradient_rows import (
    after_noise,
    fold_candidates,
    fold_users,
    scale_rows,
    scaled_tensors,
    unscale,
)
from client.ledger import Mechanism
from client.noise_calibration import expected_batch, sample_rate
from common.config import DPConfig, TrainConfig
from common.errors import ConfigError
from common.featurizer import TextFeaturizer
from common.scorers import Scorer
from common.task import Example
from common.training import (
    batch_inputs,
    load_moments,
    loss_on,
    make_optimizer,
    optimizer_moments,
    unit_loss,
)

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RoundResult:
    """What one local round did: mean training loss, optimiser steps, mechanism (None if no DP),
    the gradients released instead of applied (lockstep) and the optimiser state it ended with
    (lockstep; empty otherwise)."""

    loss: float
    steps: int
    mechanism: Mechanism | None
    released: dict[str, torch.Tensor] = field(default_factory=dict)
    moments: dict[str, np.ndarray] = field(default_factory=dict)


class LocalTrainer:
    """Trains a platform's scorer round after round on its train split."""

    def __init__(
        self,
        scorer: Scorer,
        featurizer: TextFeaturizer,
        examples: Sequence[Example],
        train: TrainConfig,
        dp: DPConfig,
        probe: Callable[[DPOptimizer], None] | None = None,
    ) -> None:
        """``probe``: handed each round's DP optimiser once Opacus has made it, before the
        first step; only the canary test of the DP step passes one (``client/step_check.py``,
        on its own tiny model: the platform's self-test and the auditor's white-box audit),
        training never does."""
        if not examples:
            raise ConfigError("the platform has no training examples")
        self.scorer = scorer
        self.featurizer = featurizer
        self.examples = list(examples)
        # what Poisson sampling draws: each training unit alone, or each user with all of theirs
        self.groups = _by_user(self.examples) if dp.user_level else [[e] for e in self.examples]
        self.train = train
        self.dp = dp
        self.probe = probe
        self.named = {n: p for n, p in scorer.named_parameters() if p.requires_grad}
        self.release: Collection[str] = ()  # the round's released tensors (see run)
        # shuffling of the non-private loop only: reproducible from train.seed
        self.generator = torch.Generator().manual_seed(train.seed)
        self.first_step = 0
        # the item tower's adapters, frozen on its head-only steps
        self.adapters = (
            [
                p
                for n, p in scorer.named_parameters()
                if p.requires_grad and n.startswith("encoder.")
            ]
            if scorer.kind == "item_tower"
            else []
        )

    @property
    def privacy_units(self) -> int:
        """N of the sample rate: training units, or users under ``dp.unit = 'user'``."""
        return len(self.groups)

    @property
    def sample_rate(self) -> float:
        return sample_rate(self.privacy_units, self.dp)

    def _loader(self, generator: torch.Generator) -> DataLoader:
        """Logical batches of privacy-unit indices (Poisson-sampled once Opacus wraps it, from
        the same ``generator``: Opacus' ``DPDataLoader`` takes the wrapped loader's)."""
        return DataLoader(
            TensorDataset(torch.arange(self.privacy_units)),
            batch_size=min(expected_batch(self.dp), self.privacy_units),
            shuffle=True,
            generator=generator,
        )

    def _sampled(self, indices: torch.Tensor, generator: torch.Generator) -> list[list[Example]]:
        """The training units of the drawn privacy units; a user brings at most
        ``max_examples_per_user`` of theirs, a uniformly random subset drawn from ``generator``
        (the round's secret one under DP), so one step reads a bounded part of each user."""
        limit = self.dp.max_examples_per_user
        batch = []
        for index in indices.tolist():
            group = self.groups[index]
            if len(group) > limit:
                chosen = torch.randperm(len(group), generator=generator)[:limit]
                group = [group[k] for k in chosen.tolist()]
            batch.append(group)
        return batch

    def _through_adapters(self, step: int) -> bool:
        """Whether optimiser step ``step`` (counted over the whole run) trains the adapters
        (and then leaves them trainable) or the head alone (adapters frozen, so DP-SGD neither
        clips nor noises them)."""
        adapters = not self.adapters or step % self.train.adapter_every == 0
        for param in self.adapters:
            param.requires_grad_(adapters)
        return adapters

    def _after_step(self, through_adapters: bool) -> None:
        """Head-only steps read the item vectors: recompute them once the adapters moved."""
        if through_adapters and self.adapters and self.train.adapter_every > 1:
            self.scorer.prepare(self.featurizer)

    def run(
        self,
        steps: int,
        learning_rate: float,
        noise_multiplier: float | None,
        first_step: int = 0,
        release: Collection[str] = (),
        moments: dict[str, np.ndarray] | None = None,
    ) -> RoundResult:
        """Run ``steps`` optimiser steps; DP when ``noise_multiplier`` is not None.
        ``first_step``: how many steps earlier rounds ran (the adapter schedule's phase).

        The lockstep schedule's step: the tensors named in ``release`` are clipped and noised
        with the others, but their gradient is returned (``RoundResult.released``, the
        Gaussian mechanism's output, after the gradient scales are undone) instead of applied
        here, and ``moments`` (the optimiser state the last round ended with) is continued."""
        if release and steps != 1:
            raise ValueError(f"a round that releases its gradient is one step, not {steps}")
        self.first_step = first_step
        self.release = release
        self.scorer.prepare(self.featurizer)
        self.scorer.train()
        try:
            if noise_multiplier is None:
                return self._run_plain(steps, learning_rate, moments)
            return self._run_private(steps, learning_rate, noise_multiplier, moments)
        finally:
            for param in self.adapters:
                param.requires_grad_(True)

    def _optimizer(
        self, learning_rate: float, moments: dict[str, np.ndarray] | None
    ) -> torch.optim.Optimizer:
        optimizer = make_optimizer(self.scorer, self.train, learning_rate)
        if moments:
            load_moments(optimizer, self.named, moments)
        return optimizer

    def _withhold(self) -> dict[str, torch.Tensor]:
        """Take the released tensors' gradients out of the step: returned, not applied (a
        tensor without a gradient, such as a frozen adapter, is skipped by the optimiser)."""
        released = {}
        for name in self.release:
            param = self.named[name]
            if param.grad is not None:
                released[name] = param.grad.detach().clone()
                param.grad = None
        return released

    def _result(
        self,
        losses: list[float],
        steps: int,
        mechanism: Mechanism | None,
        released: dict[str, torch.Tensor],
        optimizer: torch.optim.Optimizer,
        moments: dict[str, np.ndarray] | None,
    ) -> RoundResult:
        kept = optimizer_moments(optimizer, self.named) if moments is not None else {}
        loss = float(np.mean(losses)) if losses else math.nan
        return RoundResult(loss, steps, mechanism, released, kept)

    def _run_plain(
        self, steps: int, learning_rate: float, moments: dict[str, np.ndarray] | None
    ) -> RoundResult:
        """Non-private baseline: shuffled fixed-size batches, same chunks, no clipping or noise."""
        optimizer = self._optimizer(learning_rate, moments)
        released: dict[str, torch.Tensor] = {}
        losses: list[float] = []
        while len(losses) < steps:
            for (indices,) in self._loader(self.generator):
                batch = self._sampled(indices, self.generator)
                size = sum(map(len, batch))
                optimizer.zero_grad(set_to_none=True)
                adapters = self._through_adapters(self.first_step + len(losses))
                total = 0.0
                for chunk in self._physical(batch):
                    units = _units(chunk)
                    loss = loss_on(self.scorer, self.featurizer, units, adapters)
                    loss = loss * (len(units) / size)
                    loss.backward()
                    total += float(loss.detach())
                released = self._withhold()
                optimizer.step()
                self._after_step(adapters)
                losses.append(total)
                if len(losses) == steps:
                    break
        return self._result(losses, steps, None, released, optimizer, moments)

    def _run_private(
        self,
        steps: int,
        learning_rate: float,
        noise_multiplier: float,
        moments: dict[str, np.ndarray] | None,
    ) -> RoundResult:
        if self.dp.clipping == "ghost":  # also when set past the configuration's validation
            raise ConfigError(
                "dp.clipping = 'ghost' cannot run the item tower: its layer swap and the "
                "candidate and user folding need per-unit gradient rows; use 'hooks' or 'auto'"
            )
        engine = PrivacyEngine(accountant="prv")
        generator = secret_generator()  # the Poisson sample and each user's subset
        inner = self._optimizer(learning_rate, moments)
        made = engine.make_private(
            module=self.scorer,
            optimizer=inner,
            criterion=nn.BCEWithLogitsLoss(),
            data_loader=self._loader(generator),
            noise_multiplier=noise_multiplier,
            max_grad_norm=self.dp.max_grad_norm,
            poisson_sampling=True,
            grad_sample_mode="hooks",
        )
        model, optimizer, loader = made
        if self.probe is not None:
            self.probe(optimizer)
        scaled = scaled_tensors(self.scorer, self.dp.gradient_scales)
        if scaled:
            after_noise(optimizer, lambda: unscale(scaled))
        released: dict[str, torch.Tensor] = {}
        if self.release:
            after_noise(optimizer, lambda: released.update(self._withhold()))
        losses: list[float] = []
        try:
            while _steps_taken(engine) < steps:
                for (indices,) in loader:
                    chunks = list(self._physical(self._sampled(indices, generator)))
                    adapters = self._through_adapters(self.first_step + _steps_taken(engine))
                    for number, chunk in enumerate(chunks, start=1):
                        units = _units(chunk)
                        inputs = batch_inputs(self.scorer, self.featurizer, units, adapters)
                        logits = model(**inputs)
                        loss = unit_loss(logits, inputs, units)
                        loss.backward()
                        if logits.dim() == 2 and adapters:
                            fold_candidates(model, len(units), logits.shape[1])
                        if self.dp.user_level:
                            fold_users(model, [len(group) for group in chunk])
                        scale_rows(scaled)
                        losses.append(float(loss.detach()))
                        # Noise and the step once per logical batch: the other chunks only
                        # clip and accumulate (what Opacus' BatchMemoryManager signals).
                        optimizer.signal_skip_step(do_skip=number < len(chunks))
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    if not chunks:  # an empty Poisson batch still costs one noisy step
                        _zero_grads(model)
                        optimizer.step()
                        optimizer.zero_grad(set_to_none=True)
                    self._after_step(adapters)
                    if _steps_taken(engine) == steps:
                        break
        finally:
            model.to_standard_module()
        sigma, q, taken = _executed(engine)
        mechanism = Mechanism(sigma, q, taken, self.dp.max_grad_norm, unit=self.dp.unit)
        return self._result(losses, taken, mechanism, released, inner, moments)

    def _physical(self, batch: list[list[Example]]) -> Iterator[list[list[Example]]]:
        """A logical batch (each privacy unit's training units) as physical chunks of at most
        ``train.batch_size`` training units, ordered by the candidates' text length so each
        chunk pads little (order does not matter to a sum of per-unit gradients). A privacy
        unit is never split: a user's rows are summed before clipping, within one chunk (a
        user with more units than that gets a chunk of their own)."""

        def length(group: list[Example]) -> int:
            return max(len(self.featurizer.item_text[e.candidate]) for e in group)

        chunk: list[list[Example]] = []
        size = 0
        for group in sorted(batch, key=length):
            if chunk and size + len(group) > self.train.batch_size:
                yield chunk
                chunk, size = [], 0
            chunk.append(group)
            size += len(group)
        if chunk:
            yield chunk


def secret_generator() -> torch.Generator:
    """A generator no one else can reproduce (OS entropy), for the Poisson sample.

    The Gaussian noise comes from torch's default generator, which torch itself seeds from OS
    entropy at start-up and FedFuse never reseeds (``build_scorer`` restores its state).
    """
    return torch.Generator().manual_seed(secrets.randbits(63))


def _by_user(examples: list[Example]) -> list[list[Example]]:
    users: dict[str, list[Example]] = {}
    for example in examples:
        users.setdefault(example.user, []).append(example)
    return list(users.values())


def _units(chunk: list[list[Example]]) -> list[Example]:
    return [example for group in chunk for example in group]


def _zero_grads(model: nn.Module) -> None:
    for param in model.parameters():
        if param.requires_grad:
            empty = torch.zeros((0, *param.shape), dtype=param.dtype, device=param.device)
            param.grad_sample = empty  # type: ignore[attr-defined]  # Opacus' attribute


def _steps_taken(engine: PrivacyEngine) -> int:
    return sum(steps for _, _, steps in engine.accountant.history)


def _executed(engine: PrivacyEngine) -> tuple[float, float, int]:
    """(σ, q, steps) from Opacus' accountant: the mechanism as it really ran this round."""
    history = engine.accountant.history
    if len({(sigma, q) for sigma, q, _ in history}) != 1:
        raise RuntimeError(f"one round must use one (σ, q); Opacus recorded {history}")
    return history[0][0], history[0][1], _steps_taken(engine)
