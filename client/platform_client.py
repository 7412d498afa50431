"""A platform's side of the federation: its data, scorer, DP trainer and ε ledger.

Built once per (platform, configuration) in a process and reused across rounds; the backbone
is loaded once per process and shared by every platform that process serves, because each
round overwrites all trainable tensors from the server's message anyway.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import safe_open
from safetensors.numpy import load_file as load_numpy
from safetensors.numpy import save_file as save_numpy

from client.canaries import canaries_for, insert_canaries
from client.dp_training import LocalTrainer
from client.ledger import Mechanism, PrivacyLedger
from client.noise_calibration import calibrate_noise, steps_per_round
from client.popularity_prior import popularity_prior, prior_mechanism, prior_scores
from client.step_check import step_evidence
from common.adapters import load_trainable_arrays, trainable_arrays
from common.config import RunConfig
from common.errors import DataError
from common.evaluation import CountScorer, evaluate
from common.featurizer import TextFeaturizer
from common.platform_data import federation_platforms, read_platform
from common.scorers import Scorer
from common.sharing import private_names, seeded_arrays, shared_names, shared_scorer
from common.task import PlatformTask, build_task, training_units
from common.training import MOMENT, resolve_device


@dataclass(frozen=True)
class PlatformIdentity:
    """Who this node is and where its private files live (from the node configuration)."""

    name: str
    data_dir: Path
    state_dir: Path


def identify(node_config: dict[str, Any], config: RunConfig) -> PlatformIdentity:
    """Deployment nodes name their platform and folders; simulation nodes get a partition id.

    Deployment: ``platform``, ``data-dir`` and optionally ``state-dir``. Simulation:
    ``partition-id`` indexes the platform folders under ``data.path`` (sorted by name, or in
    the order of ``data.platforms``).
    """
    if "data-dir" in node_config:
        data_dir = Path(str(node_config["data-dir"]))
        name = str(node_config.get("platform", data_dir.name))
    elif "partition-id" in node_config:
        platforms = federation_platforms(config.data)
        index = int(node_config["partition-id"])
        if not 0 <= index < len(platforms):
            raise DataError(
                config.data.path,
                f"no platform for partition-id {index} ({len(platforms)} platforms)",
            )
        name, data_dir = platforms[index]
    else:
        raise DataError(
            "node config", "needs 'data-dir' (deployment) or 'partition-id' (simulation)"
        )
    state_dir = Path(str(node_config.get("state-dir", Path(config.dp.state_dir) / name)))
    return PlatformIdentity(name=name, data_dir=data_dir, state_dir=state_dir)


class PlatformClient:
    """Everything one platform does in a round: train privately, account, evaluate."""

    def __init__(
        self,
        identity: PlatformIdentity,
        config: RunConfig,
        task: PlatformTask | None = None,
        item_text: dict[str, str] | None = None,
    ) -> None:
        """Reads the platform's folder, unless ``task`` and ``item_text`` are given (the pooled
        data of the centralized baseline, which no single folder holds)."""
        self.identity = identity
        self.config = config
        if task is None or item_text is None:
            data = read_platform(identity.data_dir, identity.name)
            carried = config.model.carried_history
            task, item_text = build_task(data, config.task, carried), data.item_text
        self.task = task
        # audit mode: the audited platform trains on its canaries too (client/canaries.py)
        item_text = insert_canaries(
            task, item_text, canaries_for(config, identity.name), config.objective
        )
        strategy = config.federation.strategy
        self.scorer, tokenizer = shared_scorer(config.model, config.lora, strategy)
        self.scorer.to(resolve_device(config.train.device))
        # The seeded values, not what the process's shared scorer holds now: after another
        # platform (or an earlier run) trained in this process it holds their private part.
        seeded = seeded_arrays(config.model, config.lora, strategy)
        self.shared = shared_names(seeded, strategy)
        self.private = PrivateTensors(
            identity.state_dir, {name: seeded[name] for name in private_names(seeded, strategy)}
        )
        self.last_reply = LastReply(identity.state_dir)
        # items liked elsewhere are encoded like the platform's own, but never ranked or counted
        self.featurizer = TextFeaturizer(
            tokenizer, item_text | task.carried_text, config.model.max_length
        )
        self.trainer = LocalTrainer(
            self.scorer,
            self.featurizer,
            training_units(self.task.train, config.objective),
            config.train,
            config.dp,
        )
        units = self.trainer.privacy_units
        rounds = config.federation.rounds
        self.lockstep = config.federation.schedule == "lockstep"
        # the optimiser steps this platform plans for the whole run; under lockstep one a
        # round, in the rounds it is due (spread evenly over the run, see takes_step)
        planned = steps_per_round(units, config.train, config.dp)
        self.total_steps = min(planned, rounds) if self.lockstep else planned * rounds
        self.steps = 1 if self.lockstep else planned
        self.ledger: PrivacyLedger | None = None
        self.noise_multiplier: float | None = None
        self.evidence: dict[str, Any] | None = None  # charged with each round (step_check)
        uses_prior = config.model.scorer == "item_tower" and config.prior.enabled
        self.prior_counts: dict[str, float] | None = None
        if config.dp.enabled:
            self.ledger = PrivacyLedger.open(
                identity.state_dir,
                identity.name,
                config.dp.delta,
                config.dp.budget,
                units,
                config.dp.unit,
            )
            prior = prior_mechanism(config.prior.noise_multiplier, config.dp.unit)
            committed = [prior] if uses_prior else []
            self.noise_multiplier = calibrate_noise(
                config.dp,
                self.trainer.sample_rate,
                self.total_steps,
                committed,
            )
            self.evidence = step_evidence(self.noise_multiplier, config, self.trainer)
        if uses_prior:
            counts = popularity_prior(
                identity.state_dir,
                self.task,
                list(item_text),
                config.prior.noise_multiplier if self.ledger is not None else None,
                self.ledger,
            )
            self.use_prior(counts)

    def use_prior(self, counts: dict[str, float]) -> None:
        """Score with these prior counts (this platform's release, or its share of a pooled
        one for the centralized baseline)."""
        self.prior_counts = counts
        self.featurizer.set_prior(prior_scores(counts))

    @property
    def num_examples(self) -> int:
        """Training units (FedAvg's weight; under ``dp.unit = 'user'`` the sample rate counts
        users instead, ``trainer.privacy_units``)."""
        return len(self.trainer.examples)

    def planned_mechanism(self) -> Mechanism | None:
        if self.noise_multiplier is None:
            return None
        return Mechanism(
            self.noise_multiplier,
            self.trainer.sample_rate,
            self.steps,
            self.config.dp.max_grad_norm,
            unit=self.config.dp.unit,
        )

    def takes_step(self, server_round: int) -> bool:
        """Whether this platform trains in ``server_round``: always, except under lockstep,
        where its S planned steps are spread evenly over the run's R rounds (a step in round
        r when ⌊rS/R⌋ grows; the largest platform, S = R, steps every round)."""
        if not self.lockstep:
            return True
        rounds, steps = self.config.federation.rounds, self.total_steps
        return server_round * steps // rounds > (server_round - 1) * steps // rounds

    def loaded_scorer(self, arrays: dict[str, np.ndarray]) -> Scorer:
        """This platform's model with the given shared tensors and its own private part."""
        self._load(arrays)
        return self.scorer

    def _load(self, arrays: dict[str, np.ndarray]) -> None:
        """The server's shared tensors plus this platform's own private part (if any)."""
        load_trainable_arrays(self.scorer, arrays, self.shared)
        if self.private.names:
            load_trainable_arrays(self.scorer, self.private.load(), self.private.names)

    def train_round(
        self,
        server_round: int,
        arrays: dict[str, np.ndarray],
        learning_rate: float,
        run: str = "",
    ) -> tuple[dict[str, np.ndarray], dict[str, float | int]]:
        """One local round from the server's adapters.

        The round is charged to the ledger before any training (raising BudgetExhausted, or
        RoundAlreadyCharged for a round number the ledger holds), so a crash, a restart or a
        replayed message can never train a round the ledger did not count (a round whose
        answer was never stored, so never sent, is charged again when asked for again:
        :meth:`PrivacyLedger.charge`'s ``reply_lost``). ``run`` names the
        run (the server's ``run-id``): rounds are charged and replayed per run, so runs in turn
        share one budget and none is answered with another's reply. A replay of the
        round last answered gets that same answer again (re-sending a released update costs
        no privacy), so a server that crashed after the platforms trained can resume. Returns
        only the tensors the strategy shares; a private part stays in the state folder.
        Under lockstep the round is one DP step and what is returned is the noised gradient of
        the shared tensors; in a round the platform is not due it returns nothing and nothing
        is charged.
        """
        stored = self.last_reply.load(run, server_round)
        if stored is not None:
            return stored[0], stored[1] | {"replayed": 1}
        if not self.takes_step(server_round):  # lockstep: nothing to send, nothing charged
            spent = self.ledger.spent() if self.ledger is not None else math.inf
            return {}, {"num-examples": self.num_examples, "local-steps": 0, "epsilon": spent}
        planned = self.planned_mechanism()
        entry = None
        if self.ledger is not None and planned is not None:
            # no stored answer to this round: if it was charged, its answer was lost unsent
            entry = self.ledger.charge(server_round, planned, run, self.evidence, reply_lost=True)
        self._load(arrays)
        first_step = (server_round - 1) * self.steps
        release = self.shared if self.lockstep else ()
        moments = self.private.moments() if self.lockstep else None
        result = self.trainer.run(
            self.steps, learning_rate, self.noise_multiplier, first_step, release, moments
        )
        if result.mechanism != planned:
            raise RuntimeError(f"ran {result.mechanism}, but the ledger charged {planned}")
        if self.private.names or self.lockstep:
            self.private.save(trainable_arrays(self.scorer, self.private.names) | result.moments)
        metrics: dict[str, float | int] = {
            "num-examples": self.num_examples,
            "local-steps": result.steps,
        }
        if entry is not None:  # the ledger entry holds the mechanism as charged and run
            metrics |= {
                "epsilon": entry["epsilon_prv"],
                "epsilon-rdp": entry["epsilon_rdp"],
                "epsilon-budget-left": self.config.dp.budget - entry["epsilon_prv"],
                "delta": entry["delta"],
                "noise-multiplier": entry["noise_multiplier"],
                "sample-rate": entry["sample_rate"],
                "max-grad-norm": entry["max_grad_norm"],
            }
        else:
            # The raw training loss is a function of the private data outside any DP
            # mechanism, so it leaves the platform only when DP is off.
            metrics |= {"train-loss": result.loss, "epsilon": math.inf}
        if self.lockstep:  # the noised gradients (the mechanism's output), not tensors
            shared = {name: g.cpu().numpy() for name, g in result.released.items()}
        else:
            shared = trainable_arrays(self.scorer, self.shared)
        self.last_reply.save(run, server_round, shared, metrics)
        return shared, metrics

    def evaluate(
        self, arrays: dict[str, np.ndarray], split: str, max_cases: int, per_case: bool = False
    ) -> dict[str, Any]:
        """Protocol metrics of the given adapters on this platform's valid or test split; with
        a popularity prior, also its own NDCG@10 (``prior-ndcg@10``): the yardstick the model
        has to beat, on the same users. ``per_case``: each case's metrics too (``cases``)."""
        self._load(arrays)
        metrics = self.score(self.scorer, split, max_cases, per_case)
        if self.prior_counts is not None:
            prior = self.score(CountScorer(self.prior_counts), split, max_cases)  # type: ignore[arg-type]
            metrics["prior-ndcg@10"] = prior["ndcg@10"]
        return metrics

    def score(
        self, scorer: Scorer, split: str, max_cases: int, per_case: bool = False
    ) -> dict[str, Any]:
        """Protocol metrics of any scorer here (baselines bring their own, e.g. popularity);
        ``per_case`` adds each ranking case's user and metrics under ``cases``."""
        metrics = evaluate(
            scorer,
            self.featurizer,
            self.task,
            split,
            self.config.train.eval_batch_size,
            max_cases,
            per_case=per_case,
        )
        cases = metrics.pop("cases", None)
        summary: dict[str, Any] = {"num-examples": int(metrics.pop("ranking_cases"))} | {
            key: float(value) for key, value in metrics.items() if key != "examples"
        }
        return summary if cases is None else summary | {"cases": cases}


class PrivateTensors:
    """A platform's never-shared adapter part (fedsa's B and head), kept in its state folder,
    with (under lockstep) its optimiser's state, in one file written atomically.

    Until the first round saves it, the seeded initial values are used, so a platform never
    starts from another platform's private tensors when one process serves several.
    """

    FILE = "private_adapter.safetensors"

    def __init__(self, state_dir: Path, initial: dict[str, np.ndarray]) -> None:
        self.path = state_dir / self.FILE
        self.initial = initial
        self.names = list(initial)

    def _stored(self) -> dict[str, np.ndarray]:
        return load_numpy(self.path) if self.path.exists() else self.initial

    def load(self) -> dict[str, np.ndarray]:
        return {k: v for k, v in self._stored().items() if not k.startswith(MOMENT)}

    def moments(self) -> dict[str, np.ndarray]:
        """The local optimiser's state saved with the tensors (lockstep; see
        ``common.training.optimizer_moments``): empty before the first step."""
        return {k: v for k, v in self._stored().items() if k.startswith(MOMENT)}

    def save(self, arrays: dict[str, np.ndarray]) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.FILE}.tmp")
        save_numpy(arrays, temporary)
        os.replace(temporary, self.path)


class LastReply:
    """The update this platform last sent and its metrics, kept in its state folder.

    A round the ledger has charged is never trained again; when the same round is asked for
    once more (a restarted server, a duplicate message) the stored answer is sent instead.
    Only the latest round is kept: an older round's replay is refused by the ledger.
    """

    FILE = "last_reply.safetensors"

    def __init__(self, state_dir: Path) -> None:
        self.path = state_dir / self.FILE

    def load(
        self, run: str, server_round: int
    ) -> tuple[dict[str, np.ndarray], dict[str, float | int]] | None:
        """The stored answer to ``server_round`` of ``run``, if that is the one stored."""
        if not self.path.exists():
            return None
        with safe_open(str(self.path), framework="numpy") as stored:
            metadata = stored.metadata() or {}
        if int(metadata.get("server_round", -1)) != server_round or metadata.get("run", "") != run:
            return None
        return load_numpy(self.path), json.loads(metadata["metrics"])

    def save(
        self,
        run: str,
        server_round: int,
        arrays: dict[str, np.ndarray],
        metrics: dict[str, float | int],
    ) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        temporary = self.path.with_name(f".{self.FILE}.tmp")
        metadata = {"run": run, "server_round": str(server_round), "metrics": json.dumps(metrics)}
        save_numpy(arrays, temporary, metadata=metadata)
        os.replace(temporary, self.path)
