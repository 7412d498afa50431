"""The sections of the run configuration that check or compare a run rather than train it:
the empirical privacy check (``[audit]``) and the in-house baselines of ``fedfuse compare``
(``[baselines]``). ``common/config.py`` puts them together with the training sections
(``common/config_sections.py``).
"""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class AuditConfig(BaseModel):
    """Empirical privacy check (the ``[audit]`` section): canaries on one platform, then an ε
    lower bound (see client/canaries.py and server/audit/canary_audit.py). Off by default."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    canaries: int = Field(
        0, ge=0, le=100_000, description="canaries offered to the audited platform; 0 = no audit"
    )
    canary_platform: str = Field("", description="platform whose train split gets the canaries")
    canary_seed: int = Field(0, ge=0, description="seed of the canaries and their inclusion")
    confidence: float = Field(0.95, gt=0, lt=1, description="confidence of the ε lower bound")

    @model_validator(mode="after")
    def _complete(self) -> AuditConfig:
        if self.canaries == 1:
            raise ValueError("audit.canaries must be 0 (off) or at least 2")
        if self.canaries and not self.canary_platform:
            raise ValueError("audit.canaries > 0 needs audit.canary_platform")
        return self


class BaselineConfig(BaseModel):
    """The non-private in-house baselines of ``fedfuse compare`` (the ``[baselines]`` section):
    BPR-MF and SASRec train exactly this point, early-stopped on validation NDCG@10 (epochs are
    the only thing chosen inside a run); comparing points is ``fedfuse tune``'s job."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    bpr_dim: int = Field(32, ge=1, le=1024, description="BPR: user and item vector size")
    bpr_reg: float = Field(
        1e-1, ge=0, allow_inf_nan=False, description="BPR: L2 weight on each triple's parameters"
    )
    sasrec_dim: int = Field(64, ge=2, le=1024, description="SASRec: item and position vector size")
    sasrec_layers: int = Field(2, ge=1, le=12, description="SASRec: self-attention blocks")
    sasrec_heads: int = Field(1, ge=1, le=16, description="SASRec: attention heads (divide dim)")
    sasrec_dropout: float = Field(0.5, ge=0, lt=1, description="SASRec: dropout rate")
    sasrec_learning_rate: float = Field(
        3e-3, gt=0, allow_inf_nan=False, description="SASRec: AdamW learning rate"
    )
    sasrec_weight_decay: float = Field(
        0.0, ge=0, allow_inf_nan=False, description="SASRec: AdamW weight decay"
    )
    sasrec_max_len: int | None = Field(
        None,
        ge=1,
        le=1024,
        description="SASRec: most recent items of a sequence the model reads (none = "
        "task.history_len, what a ranking case's own history holds)",
    )
    sasrec_batch_size: int = Field(128, ge=1, description="SASRec: sequences per optimiser step")
    sasrec_max_epochs: int = Field(
        100, ge=1, description="SASRec: most passes over the users' sequences"
    )
    sasrec_eval_every: int = Field(
        5, ge=1, description="SASRec: epochs between validations (early stopping)"
    )
    sasrec_patience: int = Field(
        3, ge=1, description="SASRec: validations without a better NDCG@10 before stopping"
    )

    @model_validator(mode="after")
    def _heads_divide(self) -> BaselineConfig:
        if self.sasrec_dim % self.sasrec_heads:
            raise ValueError(
                f"baselines.sasrec_heads = {self.sasrec_heads} must divide "
                f"baselines.sasrec_dim = {self.sasrec_dim}"
            )
        return self
