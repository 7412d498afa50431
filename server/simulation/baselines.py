"""The yardsticks for federation, under the same protocol, trained in this process.

- ``popularity``: candidates ranked by how often the platform's own users liked them in its
  train split; no model, no privacy cost worth accounting (it is not released here).
- ``local``: each platform alone — the same rounds, local steps, learning-rate schedule and DP
  budget as in the federation, only nothing is aggregated (its own ledger).
- ``centralized``: every platform's train examples pooled in one place and trained with the
  federation's total number of optimiser steps, with or without DP. Raw data leaves the
  platforms, so it is a reference point, not a deployable option.

Every model is scored by ``PlatformClient.evaluate`` on each platform's test split (or, to
tune a setting without touching test, its validation split: ``Scoring``), the very code path
the federation's evaluation uses.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from safetensors.numpy import save_file

from client.platform_client import PlatformClient, PlatformIdentity
from client.popularity_prior import positive_counts
from common.config import RunConfig, with_settings
from common.evaluation import CountScorer
from common.platform_data import federation_platforms
from common.scorers import Scorer
from common.task import Example, PlatformTask
from server.federation.server_app import learning_rate_schedule
from server.federation.server_optimizer import ServerOptimizer

log = logging.getLogger(__name__)

Arrays = dict[str, np.ndarray]
LOCAL_ARRAYS = "local_shared.safetensors"
Metrics = dict[str, Any]  # metric name -> value; ``cases``: per-case columns
POOLED = "centralized"


def platform_clients(config: RunConfig, state_root: Path) -> list[PlatformClient]:
    """One client per platform of the federation, its state folder under ``state_root``."""
    return [
        PlatformClient(PlatformIdentity(name, folder, state_root / name), config)
        for name, folder in federation_platforms(config.data)
    ]


def evaluation_clients(config: RunConfig, state_root: Path) -> list[PlatformClient]:
    """Clients that only evaluate: DP off, so no ledger is opened or noise calibrated."""
    return platform_clients(with_settings(config, dp={"enabled": False}), state_root)


@dataclass(frozen=True)
class Scoring:
    """Where every method of a comparison is scored: the test split for the numbers reported,
    the validation split to choose a setting (test stays unseen); ``max_cases`` users per
    platform, 0 = all."""

    split: Literal["valid", "test"] = "test"
    max_cases: int = 0

    def score(self, client: PlatformClient, scorer: Scorer) -> Metrics:
        """Metrics of any scorer (a baseline's own too: popularity, BPR) on ``client``'s users,
        with each case's metrics (``cases``) for intervals over users."""
        return client.score(scorer, self.split, self.max_cases, per_case=True)

    def adapters(self, clients: Sequence[PlatformClient], arrays: Arrays) -> dict[str, Metrics]:
        """Each platform's metrics of the same shared tensors (plus its own private part)."""
        return {
            c.identity.name: c.evaluate(arrays, self.split, self.max_cases, per_case=True)
            for c in clients
        }


def train_rounds(client: PlatformClient, initial: Arrays) -> tuple[Arrays, float]:
    """The federation's rounds (and its learning-rate schedule) on one client without
    aggregation; returns the tensors and the final ε. Under lockstep the client's gradients
    are applied by a server optimiser of its own: a federation of one."""
    learning_rate = learning_rate_schedule(client.config)
    arrays = {name: initial[name] for name in client.shared}
    server = ServerOptimizer(client.config.train, arrays) if client.lockstep else None
    epsilon = float("inf")
    rounds = client.config.federation.rounds
    shown = max(1, rounds // 5)  # about five progress lines
    for server_round in range(1, rounds + 1):
        rate = learning_rate(server_round)
        reply, metrics = client.train_round(server_round, arrays, rate)
        if server is None:
            arrays = reply
        elif reply:
            arrays = server.step([reply], rate)
        epsilon = float(metrics["epsilon"])
        if server_round % shown == 0 or server_round == rounds:
            log.info(
                "%s: round %d/%d, ε = %.3f", client.identity.name, server_round, rounds, epsilon
            )
    return arrays, epsilon


def train_local(
    config: RunConfig, initial: Arrays, state_root: Path, scoring: Scoring
) -> tuple[dict[str, Metrics], dict[str, float]]:
    """Each platform trains alone; returns its metrics (``scoring``) and its ε."""
    config = with_settings(config, federation={"strategy": "fedavg"})
    metrics, epsilons = {}, {}
    for client in platform_clients(config, state_root):
        arrays, epsilons[client.identity.name] = train_rounds(client, initial)
        kept = {k: np.ascontiguousarray(v) for k, v in arrays.items()}
        save_file(kept, str(local_arrays(client.identity.state_dir)))
        metrics |= scoring.adapters([client], arrays)
    return metrics, epsilons


def local_arrays(state_dir: Path) -> Path:
    """Where ``local`` keeps a platform's trained shared tensors (in its state folder), so a
    blend with the in-house model scores that very model (server/simulation/joining.py)."""
    return state_dir / LOCAL_ARRAYS


def pooled_item(platform: str, item: str) -> str:
    """An item's id in pooled data: two platforms may use the same id for different items."""
    return f"{platform}\x1f{item}"


def pooled_task(clients: Sequence[PlatformClient]) -> tuple[PlatformTask, dict[str, str]]:
    """All platforms' train examples in one task; item ids get their platform as a prefix,
    because two platforms may use the same id for different items."""

    task = PlatformTask(POOLED)
    item_text: dict[str, str] = {}
    for client in clients:
        name = client.identity.name
        item_text |= {pooled_item(name, i): t for i, t in client.featurizer.item_text.items()}
        task.train += [
            Example(
                user=f"{name}\x1f{e.user}",
                history=tuple(pooled_item(name, i) for i in e.history),
                candidate=pooled_item(name, e.candidate),
                label=e.label,
                negatives=tuple(pooled_item(name, i) for i in e.negatives),
            )
            for e in client.task.train
        ]
    return task, item_text


def pooled_client(
    config: RunConfig, clients: Sequence[PlatformClient], state_root: Path
) -> PlatformClient:
    """The centralized model's trainer: every platform's data in one client, with a private
    item-factor row per pooled item (each platform has one per item of its own)."""
    task, item_text = pooled_task(clients)
    slots = max(config.model.private_item_slots, len(item_text))
    config = with_settings(config, model={"private_item_slots": slots})
    identity = PlatformIdentity(POOLED, state_root, state_root / POOLED)
    return PlatformClient(identity, config, task=task, item_text=item_text)


def train_centralized(
    config: RunConfig, initial: Arrays, state_root: Path, scoring: Scoring
) -> tuple[dict[str, Metrics], dict[str, float]]:
    """One model on the pooled train examples, as many optimiser steps per round as all
    platforms together take in the federation; returns per-platform metrics and its ε."""
    config = with_settings(config, federation={"strategy": "fedavg"})
    clients = evaluation_clients(config, state_root)
    if config.train.local_steps:
        steps = config.train.local_steps * len(clients)
        config = with_settings(config, train={"local_steps": steps})
    if config.federation.schedule == "lockstep":  # one step a round: the federation's total
        rounds = config.train.local_steps or sum(c.total_steps for c in clients)
        config = with_settings(config, federation={"rounds": rounds})
    pooled = pooled_client(config, clients, state_root)
    arrays, epsilon = train_rounds(pooled, initial)
    if pooled.prior_counts is not None:  # each platform scores with its share of the release
        for client in clients:
            prefix = pooled_item(client.identity.name, "")
            client.use_prior(
                {
                    k[len(prefix) :]: v
                    for k, v in pooled.prior_counts.items()
                    if k.startswith(prefix)
                }
            )
    for client in clients:  # one model: its private part too
        client.private.save(platform_private(pooled, client))
    metrics = scoring.adapters(clients, arrays)
    return metrics, dict.fromkeys(metrics, epsilon)


def platform_private(pooled: PlatformClient, client: PlatformClient) -> Arrays:
    """The pooled model's private part as ``client`` scores with it: the mixing weights as
    they are; the private item factors moved from the rows of the platform's items in the
    pooled table to their rows in the platform's own (rows are per catalogue)."""
    arrays = dict(pooled.private.load())
    name = client.identity.name
    for key in arrays:
        if ".private_items." not in key:
            continue
        table = client.private.initial[key].copy()
        for item, row in client.featurizer.item_row.items():
            source = pooled.featurizer.item_row[pooled_item(name, item)]
            table[row % len(table)] = arrays[key][source % len(arrays[key])]
        arrays[key] = table
    return arrays


def dp_prior(
    config: RunConfig, state_root: Path, scoring: Scoring
) -> tuple[dict[str, Metrics], dict[str, float]]:
    """Each platform ranked by its DP-released popularity prior alone (the item tower's
    prior, ablated from the model); returns its metrics and the ε the release cost."""
    config = with_settings(config, model={"scorer": "item_tower"}, prior={"enabled": True})
    metrics, epsilons = {}, {}
    for client in platform_clients(config, state_root):
        name = client.identity.name
        counts = client.prior_counts or {}
        metrics[name] = scoring.score(client, CountScorer(counts))  # type: ignore[arg-type]
        epsilons[name] = client.ledger.spent() if client.ledger is not None else float("inf")
    return metrics, epsilons


def popularity(config: RunConfig, state_root: Path, scoring: Scoring) -> dict[str, Metrics]:
    """Each platform's metrics of its own popularity ranking."""
    metrics = {}
    for client in evaluation_clients(config, state_root):
        counts = CountScorer(positive_counts(client.task))
        metrics[client.identity.name] = scoring.score(client, counts)  # type: ignore[arg-type]
    return metrics
