"""``fedfuse compare``: the federation against its baselines, one table per privacy level.

A comparison is a grid of cells, each a (method, privacy level) pair: ``popularity``,
``local``, ``centralized``, ``prior`` (the DP popularity prior alone; see
``server/simulation/baselines.py``), ``bpr_local``, ``bpr_pooled`` (BPR matrix factorisation,
``server/simulation/bpr.py``), a federated strategy (``fedavg``, ``ffa``, ``fedsa``, run with
``fedfuse simulate``) or an ablation of one (``fedavg_text``: the text model alone, no
prior and no private item factors; ``fedavg_shared``: no private item factors;
``fedavg_user``: user-level DP; likewise ``ffa_…`` and ``fedsa_…``), at a target ε or
non-private (``inf``).
``popularity`` and the BPR methods are never private: they ignore the level, their ε is ∞.
A level without names runs the first six. ``fedavg*3`` runs a cell three times: DP noise and
Poisson samples come from the OS' entropy, so runs of one cell differ, and a verdict per
platform needs the mean of several runs (the report shows it with its standard error, and
every run). Each run is its own experiment with its own ledgers and budget.
Every cell starts from the same seeded adapters, trains for the same rounds and local steps
and is scored on every platform's test split by the same code (``--split valid`` scores the
validation split instead, to choose a setting without looking at test). Finished cells are
cached in ``OUT/cells/``, so an interrupted comparison continues where it stopped.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetensors.numpy import load_file

from client.platform_client import PlatformClient
from common.atomic import atomic_write
from common.config import RunConfig, with_settings
from common.errors import ConfigError
from common.platform_data import federation_platforms
from common.sharing import seeded_arrays
from server.federation.run_record import CONFIG_FILE, RunRecord
from server.simulation.baselines import (
    Arrays,
    Metrics,
    Scoring,
    dp_prior,
    evaluation_clients,
    local_arrays,
    popularity,
    train_centralized,
    train_local,
)
from server.simulation.comparison_report import report, scored_split
from server.simulation.joining import (
    BLENDS,
    INHOUSE,
    INHOUSE_MODELS,
    blend,
    final_model,
    inhouse,
    spent,
)
from server.simulation.methods import DEFAULT_METHODS, METHODS, NONPRIVATE, VARIANTS
from server.simulation.simulation import INCOMPLETE, prepare_run, simulate


@dataclass(frozen=True)
class Cell:
    """One method at one privacy level (``math.inf``: DP off), run ``run`` of its repeats."""

    method: str
    epsilon: float
    run: int = 1

    @property
    def key(self) -> str:
        repeat = f"-run{self.run}" if self.run > 1 else ""
        return f"{self.method}@{level_name(self.epsilon)}{repeat}"


def level_name(epsilon: float) -> str:
    return "nonprivate" if math.isinf(epsilon) else f"eps{epsilon:g}"


def _repeats(spec: str, name: str) -> tuple[str, int]:
    """``ffa*3`` → (``ffa``, 3); ``ffa`` → (``ffa``, 1)."""
    method, star, count = name.partition("*")
    if not star:
        return method, 1
    if not count.isdigit() or int(count) < 1:
        raise ConfigError(f"--epsilon {spec!r}: {name!r}: runs must be a whole number ≥ 1")
    return method, int(count)


def parse_levels(specs: Sequence[str]) -> list[Cell]:
    """``8``, ``inf`` or ``1:local,ffa*3`` (a level and, optionally, its methods, each with
    its number of runs) → cells."""
    cells: list[Cell] = []
    for spec in specs:
        level, _, methods = spec.partition(":")
        try:
            epsilon = float(level)
        except ValueError:
            raise ConfigError(f"--epsilon {spec!r}: the level must be a number or inf") from None
        if epsilon <= 0:
            raise ConfigError(f"--epsilon {spec!r}: ε must be positive (or inf)")
        names = [m.strip() for m in methods.split(",")] if methods else list(DEFAULT_METHODS)
        repeats = [_repeats(spec, name) for name in names]
        unknown = sorted({method for method, _ in repeats} - set(METHODS))
        if unknown:
            raise ConfigError(f"--epsilon {spec!r}: unknown methods {unknown}; known: {METHODS}")
        for method, runs in repeats:
            new = [Cell(method, epsilon, run) for run in range(1, runs + 1)]
            cells += [cell for cell in new if cell not in cells]
    return cells


def at_level(config: RunConfig, epsilon: float) -> RunConfig:
    """``config`` with DP off (``inf``) or calibrated to reach ``epsilon`` after all rounds.
    Without DP there is no clip norm to bound what secure aggregation sums: it is off too."""
    if math.isinf(epsilon):
        return with_settings(
            config, dp={"enabled": False}, federation={"secure_aggregation": False}
        )
    return with_settings(config, dp={"enabled": True, "target_epsilon": epsilon})


def _fresh(folder: Path) -> Path:
    """An empty work folder: a half-done baseline restarts, its ledgers would refuse rounds."""
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


def variant(method: str, config: RunConfig) -> tuple[str, dict[str, dict[str, Any]]]:
    """A federated method's strategy and settings changed. An ablation without private item
    factors drops their share of the clip norm too (``dp.gradient_scales`` refuses a key that
    names no tensor)."""
    strategy, changes = VARIANTS.get(method, (method, {}))
    if changes.get("model", {}).get("private_factors") == 0:
        scales = config.dp.gradient_scales
        kept = {key: scale for key, scale in scales.items() if "private_items" not in key}
        changes = changes | {"dp": {"gradient_scales": kept}}
    return strategy, changes


def _federated(
    cell: Cell, config: RunConfig, runs: Path, scoring: Scoring, cpus_per_client: float
) -> tuple[dict[str, Metrics], dict[str, float], bool]:
    """Run (or resume, or reuse) the federation, then score its final adapters."""
    clients, arrays, epsilons, resumed = _federated_model(cell, config, runs, cpus_per_client)
    return scoring.adapters(clients, arrays), epsilons, resumed


def _federated_model(
    cell: Cell, config: RunConfig, runs: Path, cpus_per_client: float
) -> tuple[list[PlatformClient], Arrays, dict[str, float], bool]:
    """Run (or resume, or reuse) the federation; its evaluation clients, final shared tensors,
    each platform's ε and whether it was resumed."""
    final = runs / cell.key
    resumed = final.exists() or (runs / f"{cell.key}{INCOMPLETE}").exists()
    strategy, changes = variant(cell.method, config)
    if not final.exists():
        pending = runs / f"{cell.key}{INCOMPLETE}"
        config = with_settings(config, federation={"strategy": strategy}, **changes)
        record = RunRecord(pending) if pending.exists() else prepare_run(config, runs, cell.key)
        simulate(record, cpus_per_client)
    _, clients, arrays, epsilons = final_model(final)
    return clients, arrays, epsilons, resumed


def _partner(
    cell: Cell, config: RunConfig, initial: Arrays, out: Path, scoring: Scoring, cpus: float
) -> tuple[list[PlatformClient], dict[str, Arrays], dict[str, float]]:
    """The DP model a blend cell mixes in: its partner cell's (same level and run) trained
    tensors, reused from that cell's folder or trained there now, as that cell trains them."""
    partner = Cell(cell.method.removeprefix(f"{INHOUSE}+"), cell.epsilon, cell.run)
    if partner.method != "local":
        clients, arrays, epsilons, _ = _federated_model(partner, config, out / "runs", cpus)
        return clients, {c.identity.name: arrays for c in clients}, epsilons
    work = out / "runs" / partner.key
    names = [name for name, _ in federation_platforms(config.data)]
    if not all(local_arrays(work / name).exists() for name in names):
        train_local(config, initial, _fresh(work), scoring)
    kept = {name: load_file(str(local_arrays(work / name))) for name in names}
    return evaluation_clients(config, work), kept, spent(config, work, names)


def run_cell(
    cell: Cell,
    config: RunConfig,
    initial: Arrays,
    out: Path,
    scoring: Scoring,
    cpus_per_client: float,
) -> dict[str, Any]:
    """Train and score one cell; returns its record (also cached in ``OUT/cells/``)."""
    started = time.perf_counter()
    config = at_level(config, cell.epsilon)
    work = out / "runs" / cell.key
    resumed = False  # baselines restart from scratch; a federation may continue a run
    extra: dict[str, Any] = {}
    if cell.method == "popularity":
        metrics = popularity(config, _fresh(work), scoring)
        epsilons = dict.fromkeys(metrics, math.inf)  # raw counts: no DP mechanism at all
    elif cell.method == "prior":
        metrics, epsilons = dp_prior(config, _fresh(work), scoring)
    elif cell.method in NONPRIVATE:
        metrics, extra["tuning"] = NONPRIVATE[cell.method](config, _fresh(work), scoring)
        epsilons = dict.fromkeys(metrics, math.inf)  # plain BPR: no DP mechanism at all
    elif cell.method == INHOUSE:
        clients = evaluation_clients(config, _fresh(work))
        metrics, extra = inhouse(config, clients, scoring, out / INHOUSE_MODELS)
        epsilons = dict.fromkeys(metrics, math.inf)  # the platform's own non-private model
    elif cell.method in BLENDS:
        clients, arrays, epsilons = _partner(cell, config, initial, out, scoring, cpus_per_client)
        metrics, extra = blend(config, clients, arrays, scoring, out / INHOUSE_MODELS)
    elif cell.method == "local":
        metrics, epsilons = train_local(config, initial, _fresh(work), scoring)
    elif cell.method == "centralized":
        metrics, epsilons = train_centralized(config, initial, _fresh(work), scoring)
    else:
        metrics, epsilons, resumed = _federated(
            cell, config, out / "runs", scoring, cpus_per_client
        )
    return {
        "method": cell.method,
        "target_epsilon": cell.epsilon,
        "run": cell.run,
        "split": scoring.split,
        "platforms": metrics,
        "epsilon": epsilons,
        "wall_s": round(time.perf_counter() - started, 1),
        "resumed": resumed,  # then wall_s misses the earlier part of the run
    } | extra


def compare(
    config: RunConfig,
    cells: Sequence[Cell],
    out: Path,
    scoring: Scoring,
    command: str,
    cpus_per_client: float = 1.0,
    progress: Callable[[str], None] = print,
) -> str:
    """Run every cell (reusing cached ones), then write the report; returns its Markdown."""
    cache = out / "cells"
    settings = json.dumps(config.model_dump(mode="json"), indent=2) + "\n"
    recorded = out / CONFIG_FILE
    if recorded.exists() and recorded.read_text(encoding="utf-8") != settings:
        raise ConfigError(f"{recorded}: {out} compares another configuration; use a new --out")
    for path in sorted(cache.glob("*.json")):  # one folder, one split: never a mixed report
        scored = scored_split(json.loads(path.read_text(encoding="utf-8")))
        if scored != scoring.split:
            raise ConfigError(f"{path}: scored on {scored}; use a new --out")
    atomic_write(recorded, settings)
    initial = seeded_arrays(config.model, config.lora, "fedavg")  # every method starts here
    results = []
    for index, cell in enumerate(cells, start=1):
        path = cache / f"{cell.key}.json"
        if path.exists():
            progress(f"[fedfuse] cell {index}/{len(cells)} {cell.key}: cached")
            results.append(json.loads(path.read_text(encoding="utf-8")))
            continue
        progress(f"[fedfuse] cell {index}/{len(cells)} {cell.key}: started")
        result = run_cell(cell, config, initial, out, scoring, cpus_per_client)
        atomic_write(path, json.dumps(result, indent=2) + "\n")
        mean = statistics.fmean(m["ndcg@10"] for m in result["platforms"].values())
        progress(
            f"[fedfuse] cell {index}/{len(cells)} {cell.key}: mean NDCG@10 {mean:.4f} "
            f"in {result['wall_s']:.0f} s"
        )
        results.append(result)
    return report(results, out, command)
