"""FedFuse's Flower ServerApp: rounds of adapter aggregation, checkpoints, resumable runs.

The run configuration comes from the run config (``config-file`` plus ``section.key``
overrides); ``run-dir`` names the run folder (see ``server/federation/run_record.py``). A run
folder that already holds checkpoints is resumed from its last complete round.
"""

from __future__ import annotations

import logging
import math
import time
from functools import partial
from pathlib import Path
from typing import Any

from flwr.app import Array, ArrayRecord, ConfigRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp
from safetensors.numpy import load_file as load_numpy

from common.adapters import load_adapter, load_trainable_arrays, save_adapter, trainable_arrays
from common.config import RunConfig, flower_run_config, run_configuration
from common.sharing import seeded_arrays, shared_names, shared_scorer
from server.cli import show_progress
from server.federation.run_record import RunRecord
from server.federation.secure_aggregation import (
    SecureLockstepStrategy,
    value_bound,
)
from server.federation.server_optimizer import MOMENTS_FILE, ServerOptimizer
from server.federation.strategy import FedFuseStrategy, LockstepStrategy
from server.federation.waiting_grid import WaitingGrid

app = ServerApp()
log = logging.getLogger(__name__)


def learning_rate_schedule(config: RunConfig):
    """Cosine decay from ``train.learning_rate`` to 10 % of it over the planned rounds (under
    lockstep: over the run's DP steps, one a round)."""
    base, rounds = config.train.learning_rate, config.federation.rounds

    def rate(server_round: int) -> float:
        progress = min(max(server_round - 1, 0) / max(rounds - 1, 1), 1.0)
        return base * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))

    return rate


def run_federation(grid: Grid, config: RunConfig, record: RunRecord) -> int:
    """Run (or resume) the planned rounds; returns the last completed round."""
    strategy_name = config.federation.strategy
    scorer, _ = shared_scorer(config.model, config.lora, strategy_name)
    names = shared_names(trainable_arrays(scorer), strategy_name)
    done = record.last_round()
    if done:
        load_adapter(scorer, record.adapter_dir(done))
    else:
        load_trainable_arrays(scorer, seeded_arrays(config.model, config.lora, strategy_name))
        record.write_config(config.model_dump(mode="json"))
    remaining = config.federation.rounds - done
    if remaining <= 0:
        return done
    shared = trainable_arrays(scorer, names)
    initial = ArrayRecord({n: Array(v) for n, v in shared.items()})
    federation = config.federation
    optimizer = None
    if federation.schedule == "lockstep":
        saved = record.adapter_dir(done) / MOMENTS_FILE if done else None
        moments = load_numpy(saved) if saved is not None and saved.exists() else None
        optimizer = ServerOptimizer(config.train, shared, moments)
    if optimizer is None:
        kind: Any = FedFuseStrategy
    elif federation.secure_aggregation:  # with DP on (RunConfig checks)
        kind = partial(SecureLockstepStrategy, value_bound(config, names), optimizer)
    else:
        kind = partial(LockstepStrategy, optimizer)
    strategy = kind(
        record,
        learning_rate_schedule(config),
        round_offset=done,
        planned_rounds=federation.rounds,
        server_learning_rate=federation.server_learning_rate,
        node_wait=federation.node_wait,
        fraction_train=federation.fraction_train,
        fraction_evaluate=federation.fraction_evaluate,
        min_train_nodes=federation.min_nodes,
        min_evaluate_nodes=federation.min_nodes,
        min_available_nodes=federation.min_nodes,
    )
    if not done and config.dp.enabled and config.dp.noise_multiplier is None:
        # the platforms' first replies wait for it: say so rather than look stuck
        log.info(
            "round 1 starts once each platform has calibrated its DP noise to ε = %g over "
            "all %d rounds (a minute or more per platform for long runs at small ε)",
            config.dp.target_epsilon,
            federation.rounds,
        )
    started = time.perf_counter()

    def checkpoint(server_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if server_round == 0:
            return None
        absolute = done + server_round
        global_arrays = {name: array.numpy() for name, array in arrays.items()}
        load_trainable_arrays(scorer, global_arrays, names)
        extra = {MOMENTS_FILE: optimizer.moments} if optimizer is not None else None
        save_adapter(scorer, record.adapter_dir(absolute), extra)
        elapsed = time.perf_counter() - started
        log.info("round %d/%d done (%.0f s)", absolute, federation.rounds, elapsed)
        return None

    strategy.start(
        grid=WaitingGrid(grid, round_offset=done),
        initial_arrays=initial,
        num_rounds=remaining,
        # the platforms charge and replay rounds per run (client/ledger.py)
        train_config=ConfigRecord({"run-id": record.run_id()}),
        evaluate_config=ConfigRecord(
            {"split": federation.eval_split, "max-cases": config.train.eval_max_cases}
        ),
        evaluate_fn=checkpoint,
    )
    return record.last_round()


def single_flower_log() -> None:
    """Opacus calls ``logging.basicConfig`` on import, so Flower's records, printed by its own
    handler, reached the root logger's too: ``fedfuse deploy run`` showed every line twice."""
    logging.getLogger("flwr").propagate = False


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run`` and the simulation engine."""
    single_flower_log()
    show_progress()  # under `flwr run` no CLI decides it: the same lines as `fedfuse simulate`
    settings = flower_run_config(dict(context.run_config))
    config = run_configuration(settings)
    run_dir = Path(str(settings.get("run-dir", "runs/flwr-run")))
    run_federation(grid, config, RunRecord(run_dir))
