"""The DP step checked by canaries: what a platform runs on itself before it trains, and what
``fedfuse audit`` runs again on the auditor's machine (``server/audit/gradient_audit.py`` says
how the test works and what its bound means).

Why it lives with the client. A platform's ledger records the mechanism its code *says* it ran;
only the code that ran can show what clipping and noise it applies. So each platform, in the
process that trains, runs this test through its own ``LocalTrainer`` (the same DP-SGD code
path, Opacus optimiser and hooks its rounds use) at the σ, C and privacy unit it is about to
charge, and the outcome goes into every ledger entry it charges, hash-chained, with the
identity of the code that ran (:func:`code_identity`).

Two-sided. Besides the ε lower bound (a step that leaks more than recorded), the test measures
the step's noise and clipping directly: the canary coordinates where no canary was inserted
hold the noise alone (their spread must be σC), and a canary's coordinate holds its clipped
contribution plus noise (its mean must be C). A step much noisier, or clipping much harder,
than recorded is as wrong a record as one that leaks: both are flagged.
"""

from __future__ import annotations

import copy
import hashlib
import logging
import math
import re
import tempfile
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, replace
from functools import lru_cache
from importlib.metadata import version
from pathlib import Path
from typing import Any

import numpy as np
import torch
from opacus.optimizers import DPOptimizer
from torch import nn
from transformers.utils import logging as hf_logging

from client.dp_training import LocalTrainer
from client.step_bound import bound
from common.backbone import load_backbone
from common.config import DPConfig, LoraSettings, ModelConfig, RunConfig, TrainConfig
from common.featurizer import TextFeaturizer
from common.model import build_scorer
from common.scorers import Scorer
from common.task import Example, training_units
from common.tiny_model import write_tiny_model

log = logging.getLogger(__name__)
CANARY_NORM = 1e3  # a canary's gradient norm, in units of the recorded clip norm C
CANARIES_PER_STEP = 500
TRIALS = 20_000  # canary trials per audited mechanism (40 steps of 500 canaries)
SEED = 0  # canary coordinates, inclusion draws and the noise: the audit is reproducible
AUDIT_EXAMPLES = 8  # made-up real examples the step also trains on, 2 per made-up user
AUDIT_DP = {"expected_batch_size": 4, "max_examples_per_user": 2}  # q = ½ in either unit
# What the libraries say about the audit's own tiny model and step, not about the run audited:
# Opacus' secure-RNG reminder, torch's note on backward hooks, a transformers deprecation.
LIBRARY_NOTICES = (
    "Secure RNG turned off",
    "Full backward hook is firing",
    "`is_gradient_checkpointing` is deprecated",
)


class DiracCanaries:
    """The probe ``LocalTrainer`` hands its DP optimiser to.

    Before each clipping it zeroes the canary coordinates of the real rows and, on a logical
    batch's first clipping, appends that step's included canaries as rows of their own; after
    the noise (Opacus' step hook, before the optimiser applies the gradient) it records every
    canary coordinate of the privatised gradient, in units of the summed gradient.
    """

    def __init__(self, count: int, steps: int, clip: float, seed: int) -> None:
        self.rng = np.random.default_rng(seed)
        self.count = count
        self.value = CANARY_NORM * clip
        self.included = self.rng.random((steps, count)) < 0.5
        self.observed = np.full((steps, count), np.nan)
        self.step = 0
        self.batch_started = False
        self.places: list[tuple[np.ndarray, np.ndarray]] = []

    def __call__(self, optimizer: DPOptimizer) -> None:
        params = optimizer.params
        if not self.places:
            self.places = self._place(params)
        clip, account = optimizer.clip_and_accumulate, optimizer.step_hook

        def clip_with_canaries() -> None:
            self._insert(params)
            clip()

        def observe(opt: DPOptimizer) -> None:
            self._record(opt)
            if account is not None:
                account(opt)  # Opacus' accountant: the trainer counts its steps by it

        optimizer.clip_and_accumulate = clip_with_canaries  # this optimiser object only
        optimizer.attach_step_hook(observe)

    def _place(self, params: list[nn.Parameter]) -> list[tuple[np.ndarray, np.ndarray]]:
        """Distinct coordinates over all trainable tensors, drawn once: per tensor, the ids
        of the canaries it holds and their flat indices."""
        sizes = np.array([p.numel() for p in params])
        if sizes.sum() < self.count:
            raise RuntimeError(f"{self.count} canaries need as many trainable coordinates")
        chosen = self.rng.choice(int(sizes.sum()), size=self.count, replace=False)
        starts = np.concatenate([[0], np.cumsum(sizes)])
        owner = np.searchsorted(starts, chosen, side="right") - 1
        return [
            (np.flatnonzero(owner == i), chosen[owner == i] - starts[i]) for i in range(len(params))
        ]

    def _insert(self, params: list[nn.Parameter]) -> None:
        included = self.included[self.step] if not self.batch_started else np.zeros(0, bool)
        row = np.cumsum(included) - 1  # a canary's row among this step's included ones
        for param, (ids, flat) in zip(params, self.places, strict=True):
            sample = param.grad_sample  # type: ignore[attr-defined]  # Opacus adds it
            rows = sample.reshape(len(sample), param.numel()).clone()
            rows[:, flat] = 0.0
            if included.any():
                extra = rows.new_zeros((int(included.sum()), rows.shape[1]))
                inside = included[ids]
                extra[row[ids[inside]], flat[inside]] = self.value
                rows = torch.cat([rows, extra])
            param.grad_sample = rows.view(len(rows), *param.shape)  # type: ignore[attr-defined]
        self.batch_started = True

    def _record(self, optimizer: DPOptimizer) -> None:
        scale = 1.0  # undo Opacus' mean reduction: the noisy *sum* of clipped rows
        if optimizer.loss_reduction == "mean":
            scale = optimizer.expected_batch_size * optimizer.accumulated_iterations
        for param, (ids, flat) in zip(optimizer.params, self.places, strict=True):
            values = param.grad.detach().reshape(-1)[torch.from_numpy(flat)]
            self.observed[self.step, ids] = values.cpu().double().numpy() * scale
        self.step += 1
        self.batch_started = False


# --- the audited step ---------------------------------------------------------------------


@contextmanager
def _quiet() -> Iterator[None]:
    """Without the libraries' notices, and without Opacus' log line when the audit's own
    Poisson draw leaves a round's first batch empty (one audit in 16 with 4 made-up users)."""
    loader_log = logging.getLogger("opacus.data_loader")
    level = loader_log.level
    loader_log.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            for notice in LIBRARY_NOTICES:
                warnings.filterwarnings("ignore", message=re.escape(notice))
            yield
    finally:
        loader_log.setLevel(level)


@lru_cache(maxsize=4)
def _audit_model(private_factors: int) -> tuple[Scorer, TextFeaturizer]:
    """A tiny random BERT under FedFuse's item tower (with the run's private item factors, so
    the run's ``dp.gradient_scales`` find their tensors), dropout off (the forward pass then
    draws nothing from torch's generator, so the seeded noise is the same whatever the Poisson
    sample). Built once per process; the audit's learning rate of 0 never changes it."""
    hf_logging.disable_progress_bar()
    with _quiet(), tempfile.TemporaryDirectory() as folder:
        backbone, tokenizer = load_backbone(str(write_tiny_model(folder)))
        config = ModelConfig(max_length=16, private_factors=private_factors, private_item_slots=8)
        model = build_scorer(backbone, config, LoraSettings(rank=4))
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0
    items = {f"i{k}": f"audit item {k}" for k in range(6)}
    return model, TextFeaturizer(tokenizer, items, max_length=16)


def _audit_examples(objective: str) -> list[Example]:
    """Made-up training units (a positive or negative with its own sampled negatives), two per
    user, so that the user-level step sums rows before clipping."""
    examples = [
        Example("", (f"i{k % 3}",), f"i{3 + k % 3}", k % 2, (f"i{(k + 1) % 3}",))
        for k in range(2 * AUDIT_EXAMPLES)
    ]
    units = training_units(examples, objective)[:AUDIT_EXAMPLES]
    return [replace(unit, user=f"u{k // 2}") for k, unit in enumerate(units)]


def run_canaries(
    noise_multiplier: float,
    max_grad_norm: float,
    config: RunConfig | None = None,
    trials: int = TRIALS,
    seed: int = SEED,
    platform: LocalTrainer | None = None,
) -> DiracCanaries:
    """Run at least ``trials`` canary trials through the DP step at (σ, C); the probe holds
    what each canary coordinate of the noisy gradient was and whether that canary was in.

    ``config``: the run's configuration, for its objective, private item factors and
    gradient scales (default: FedFuse's). ``platform``: the platform's own trainer, which
    the test then runs through (:func:`_as_platform`).
    Torch's generator is seeded for the run, and one thread used (the tiny model's steps gain
    nothing from more, and threads thrash on a busy machine); both are restored afterwards.
    """
    config = config or RunConfig()
    scorer, featurizer = _audit_model(config.model.private_factors)
    steps = math.ceil(trials / CANARIES_PER_STEP)
    probe = DiracCanaries(CANARIES_PER_STEP, steps, max_grad_norm, seed)
    trainer = LocalTrainer(
        scorer,
        featurizer,
        _audit_examples(config.objective),
        TrainConfig(batch_size=2, adapter_every=1, optimizer="sgd"),
        DPConfig(
            max_grad_norm=max_grad_norm,
            clipping="hooks",
            unit=config.dp.unit,
            gradient_scales=config.dp.gradient_scales,
            **AUDIT_DP,
        ),
        probe,
    )
    if platform is not None:
        trainer = _as_platform(platform, trainer)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        with _quiet(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            trainer.run(steps, learning_rate=0.0, noise_multiplier=noise_multiplier)
    finally:
        torch.set_num_threads(threads)
    return probe


def _as_platform(platform: LocalTrainer, audit: LocalTrainer) -> LocalTrainer:
    """The audit's trainer as a copy of the platform's own: its class and whatever state the
    platform's code set on it, with the audit's model, examples, settings and probe in their
    place. A fault in how one platform's trainer was made (one platform left unclipped, in
    issue 33's experiment) is then in that platform's test too."""
    clone = copy.copy(platform)
    vars(clone).update(vars(audit))
    return clone


# --- the platform's own check -------------------------------------------------------------

SELF_TEST_TRIALS = 4_000  # 8 steps of 500 canaries: scripts/bench_self_test.py times it
# the packages whose code the platform's step runs: FedFuse's own files are hashed, the
# libraries named by version
CODE_PACKAGES = ("client", "common")
LIBRARIES = ("torch", "opacus", "flwr")


@lru_cache(maxsize=1)
def code_identity() -> dict[str, str]:
    """What ran: the SHA-256 of the FedFuse source files this process imports from (the app
    bundle's ``client/`` and ``common/`` as installed here, path and content) and the
    versions of the libraries the DP step runs on."""
    digest = hashlib.sha256()
    for package in CODE_PACKAGES:
        root = Path(__file__).resolve().parents[1] / package
        for path in sorted(root.rglob("*.py")):
            digest.update(f"{package}/{path.relative_to(root).as_posix()}\0".encode())
            digest.update(path.read_bytes())
    return {"source_sha256": digest.hexdigest()} | {name: version(name) for name in LIBRARIES}


_SELF_TESTS: dict[tuple[Any, ...], dict[str, Any]] = {}


def step_evidence(
    noise_multiplier: float, config: RunConfig, trainer: LocalTrainer | None = None
) -> dict[str, Any]:
    """The record a platform charges with each round: its DP step's canary test at the σ it
    will run, the recorded C and privacy unit, and the identity of the code that ran it.

    Computed once per process and mechanism (the code cannot change under a running process),
    or with ``trainer`` (the platform's own, which the test then runs through) once per call:
    the platform keeps its record. A failed test is recorded and training goes on: the
    evidence is for the auditor, and the ledger's ε is charged either way."""
    dp = config.dp
    key = (
        noise_multiplier,
        dp.max_grad_norm,
        dp.delta,
        dp.unit,
        tuple(sorted(dp.gradient_scales.items())),
        config.model.private_factors,
        config.objective,
        config.audit.confidence,
    )
    record = _SELF_TESTS.get(key) if trainer is None else None
    if record is None:
        probe = run_canaries(
            noise_multiplier, dp.max_grad_norm, config, SELF_TEST_TRIALS, platform=trainer
        )
        result = bound(
            probe.observed,
            probe.included,
            noise_multiplier,
            dp.max_grad_norm,
            dp.delta,
            config.audit.confidence,
        )
        record = {
            "passed": not result.flagged,
            "unit": dp.unit,
            **asdict(result),
            "problems": list(result.problems),  # as JSON holds it
        }
        if trainer is None:
            _SELF_TESTS[key] = record
        if result.flagged:
            log.warning("DP step self-test failed: %s", "; ".join(result.problems))
    return {"self_test": record, "code": code_identity()}
