"""``fedfuse tune``: choose each method's settings on the validation split, with equal effort.

A grid (TOML, ``docs/protocol.md``) lists configurations per method — each a table of
dotted-key overrides with ``--set``'s meaning — or under ``[[common]]`` for every method
that lists none of its own. Every (method, configuration, run) is a compare cell scored on
the validation split only; test is never read here. Per method and level the configuration
with the best mean validation NDCG@10 over its runs wins (ties: the first declared) and is
frozen (``server/simulation/frozen.py``) for ``fedfuse compare --frozen`` to score on test
once. Equal effort: a method's chance to look good grows with the settings it may try, so
every method gets the same budget, configurations × runs, or the grid is refused.
"""

from __future__ import annotations

import json
import logging
import math
import tomllib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from common.atomic import atomic_write
from common.config import RunConfig, load_config
from common.dataset_summary import markdown_table
from common.errors import ConfigError
from common.sharing import seeded_arrays
from server.simulation import compare as comparison
from server.simulation.baselines import Scoring
from server.simulation.frozen import freeze, load_frozen, sidecar_path
from server.simulation.methods import LEVELLESS, METHODS

logger = logging.getLogger(__name__)

COMMON = "common"  # the grid's configurations for every method that lists none
LEVEL_KEYS = ("dp.enabled", "dp.target_epsilon")  # the level comes from --epsilon
METRIC = "ndcg@10"


def toml_value(value: Any) -> str:
    """A TOML literal of ``value``, so a grid entry becomes a ``--set`` override verbatim."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float) and not math.isfinite(value):
        return "nan" if math.isnan(value) else "inf" if value > 0 else "-inf"
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, list):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = (f"{json.dumps(k)} = {toml_value(v)}" for k, v in value.items())
        return "{" + ", ".join(items) + "}"
    return str(value)  # TOML dates and times print as TOML


@dataclass(frozen=True)
class GridPoint:
    """One configuration of one method: its place in the grid and its resolved settings."""

    method: str
    index: int  # 1-based, in declaration order (ties go to the lower)
    overrides: dict[str, Any]
    config: RunConfig = field(compare=False)
    inherited: bool = False  # listed under [[common]]

    @property
    def name(self) -> str:
        return f"{self.method}[{self.index}]"

    @property
    def folder(self) -> str:
        return f"{self.method}-c{self.index}"

    def settings(self) -> list[str]:
        return [f"{key}={toml_value(value)}" for key, value in self.overrides.items()]


@dataclass(frozen=True)
class Grid:
    """A validated grid: every tuned method's configurations, resolved against the base."""

    path: Path
    points: dict[str, list[GridPoint]]

    def budget(self, runs: int) -> dict[str, tuple[int, int]]:
        """Configurations and runs per method (a deterministic baseline counts the same)."""
        return {method: (len(points), runs) for method, points in self.points.items()}


def _configurations(path: Path, name: str, value: Any) -> list[dict[str, Any]]:
    """A grid entry's list of override tables, checked key by key."""
    if not isinstance(value, list) or not all(isinstance(v, dict) for v in value):
        raise ConfigError(f"{path}: {name}: expected a list of tables ([[{name}]] blocks)")
    if not value:
        raise ConfigError(f"{path}: {name}: no configurations")
    for index, table in enumerate(value, start=1):
        for key in table:
            parts = key.split(".")
            if len(parts) < 2 or not all(parts):
                raise ConfigError(
                    f'{path}: {name}[{index}]: key {key!r}: expected a quoted "section.key", '
                    f'e.g. "train.learning_rate" = 3e-3'
                )
            if key in LEVEL_KEYS:
                raise ConfigError(
                    f"{path}: {name}[{index}]: key {key!r}: the privacy level is set by --epsilon"
                )
    return value


def read_grid(
    path: Path | str,
    methods: Sequence[str],
    config_path: Path | str | None = None,
    overrides: Sequence[str] = (),
) -> Grid:
    """Read and validate a grid for ``methods``; every configuration is resolved now (the base
    file, ``--set``, then the grid point's overrides), so a typo fails before any training."""
    path = Path(path)
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        raise ConfigError(f"--methods: unknown {unknown or 'none given'}; known: {METHODS}")
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: grid file not found") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: invalid TOML: {err}") from None
    for name in raw:
        if name != COMMON and name not in METHODS:
            raise ConfigError(f"{path}: {name}: unknown method; known: {COMMON}, {METHODS}")
    declared = {name: _configurations(path, name, value) for name, value in raw.items()}
    for name in sorted(set(declared) - {COMMON} - set(methods)):
        logger.info("%s: %s is not in --methods; its configurations are not tuned", path, name)
    points: dict[str, list[GridPoint]] = {}
    for method in methods:
        own = method in declared
        tables = declared.get(method, declared.get(COMMON, [{}]))  # none: the base alone
        points[method] = []
        for index, table in enumerate(tables, start=1):
            settings = [f"{k}={toml_value(v)}" for k, v in table.items()]
            try:
                config = load_config(config_path, [*overrides, *settings])
            except ConfigError as err:
                where = method if own else f"{COMMON} (for {method})"
                raise ConfigError(f"{path}: {where}[{index}]: {err}") from None
            point = GridPoint(method, index, dict(table), config, inherited=not own)
            if any(p.overrides == point.overrides for p in points[method]):
                logger.warning("%s: %s repeats an earlier configuration", path, point.name)
            points[method].append(point)
    return Grid(path, points)


def check_effort(grid: Grid, runs: int, allow_unequal: bool) -> list[str]:
    """The budget per method, as lines to print; unequal budgets are refused unless allowed."""
    budget = grid.budget(runs)
    lines = [
        f"{method}: {configs} configuration{'s' * (configs != 1)} × {runs} run"
        f"{'s' * (runs != 1)} = {configs * runs} cells per level"
        for method, (configs, runs) in budget.items()
    ]
    counts = {configs for configs, _ in budget.values()}
    if len(counts) > 1 and not allow_unequal:
        listed = ", ".join(f"{m} {c}" for m, (c, _) in budget.items())
        raise ConfigError(
            f"{grid.path}: unequal effort: configurations per method {listed}; give every "
            "method the same number (or pass --allow-unequal)"
        )
    return lines


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _score(result: dict[str, Any]) -> float:
    """A run's validation number: NDCG@10, the mean over platforms."""
    return _mean([m[METRIC] for m in result["platforms"].values()])


def _point_folder(out: Path, point: GridPoint) -> Path:
    """The grid point's compare folder; a resumed tune must resolve it the same way."""
    folder = out / "grid" / point.folder
    settings = json.dumps(point.config.model_dump(mode="json"), indent=2) + "\n"
    recorded = folder / "config.json"
    if recorded.exists() and recorded.read_text(encoding="utf-8") != settings:
        raise ConfigError(f"{recorded}: {point.name} resolves differently now; use a new --out")
    atomic_write(recorded, settings)
    atomic_write(folder / "overrides.json", json.dumps(point.overrides, indent=2) + "\n")
    return folder


def _run_point(
    point: GridPoint,
    epsilon: float,
    runs: int,
    out: Path,
    scoring: Scoring,
    cpus_per_client: float,
    progress: Callable[[str], None],
) -> list[dict[str, Any]]:
    """Every run of one grid point at one level, cached per cell, scored on validation."""
    folder = _point_folder(out, point)
    results = []
    for run in range(1, runs + 1):
        cell = comparison.Cell(point.method, epsilon, run)
        path = folder / "cells" / f"{cell.key}.json"
        where = f"[fedfuse] tune {point.name} {cell.key}"
        if path.exists():
            progress(f"{where}: cached")
            results.append(json.loads(path.read_text(encoding="utf-8")))
            continue
        progress(f"{where}: started")
        initial = seeded_arrays(point.config.model, point.config.lora, "fedavg")
        result = comparison.run_cell(cell, point.config, initial, folder, scoring, cpus_per_client)
        result["grid_point"] = point.name
        atomic_write(path, json.dumps(result, indent=2) + "\n")
        progress(f"{where}: valid NDCG@10 {_score(result):.4f} in {result['wall_s']:.0f} s")
        results.append(result)
    return results


def choose(scores: Sequence[tuple[GridPoint, list[float]]]) -> int:
    """The index of the best mean; a tie keeps the first declared, a NaN mean never wins."""
    best, best_mean = 0, -math.inf
    for index, (_, values) in enumerate(scores):
        mean = _mean(values)
        if not math.isnan(mean) and mean > best_mean:
            best, best_mean = index, mean
    return best


def _freeze(
    out: Path, grid: Grid, point: GridPoint, epsilon: float, results: list[dict], scoring: Scoring
) -> Path:
    """Write the winner's frozen file; an identical earlier freeze is kept (its time too),
    and one already scored on test is never replaced by another choice."""
    path = out / "frozen" / f"{comparison.Cell(point.method, epsilon).key}.json"
    if path.exists():
        try:
            earlier = load_frozen(path)
        except ConfigError:
            earlier = None
        if earlier is not None and earlier.config == point.config:
            return path
        if sidecar_path(path).exists():
            raise ConfigError(f"{path}: already scored on test; a new choice needs a new --out")
    freeze(
        path,
        point.method,
        epsilon,
        point.config,
        grid=str(grid.path),
        grid_point=point.name,
        overrides=point.overrides,
        validation={
            "split": "valid",
            "max_cases": scoring.max_cases,
            "metric": f"{METRIC}, mean over platforms",
            "mean": _mean([_score(r) for r in results]),
            "runs": [
                {
                    "run": r["run"],
                    METRIC: _score(r),
                    "platforms": {p: m[METRIC] for p, m in r["platforms"].items()},
                }
                for r in results
            ],
        },
        budget={"configurations": len(grid.points[point.method]), "runs": len(results)},
    )
    return path


def level_schedule(
    methods: Sequence[str], levels: Sequence[float]
) -> list[tuple[float, list[str]]]:
    """Which methods each level tunes: a DP method at every ``--epsilon`` level, a
    non-private one (:data:`LEVELLESS`) once, at ε = inf, whatever the levels asked."""
    private = [m for m in methods if m not in LEVELLESS]
    plain = [m for m in methods if m in LEVELLESS]
    schedule = [
        (epsilon, private + (plain if math.isinf(epsilon) else []))
        for epsilon in dict.fromkeys(levels)
    ]
    if plain and not any(math.isinf(epsilon) for epsilon in levels):
        schedule.append((math.inf, plain))
    return [(epsilon, names) for epsilon, names in schedule if names]


def tune(
    grid: Grid,
    levels: Sequence[float],
    runs: int,
    out: Path,
    command: str,
    max_cases: int = 0,
    cpus_per_client: float = 1.0,
    progress: Callable[[str], None] = print,
    allow_unequal: bool = False,
) -> str:
    """Run the grid on validation, freeze each method's winner per level, write tuning.md;
    returns its Markdown."""
    if runs < 1:
        raise ConfigError(f"--runs {runs}: runs must be a whole number ≥ 1")
    budget = check_effort(grid, runs, allow_unequal)
    for line in budget:
        progress(f"[fedfuse] budget {line}")
    scoring = Scoring("valid", max_cases)  # the only split tune ever scores
    tables, frozen = [], []
    for epsilon, methods in level_schedule(list(grid.points), levels):
        rows = []
        for method in methods:
            points, scores = grid.points[method], []
            for point in points:
                results = _run_point(point, epsilon, runs, out, scoring, cpus_per_client, progress)
                scores.append((point, [_score(r) for r in results], results))
            winner = choose([(p, values) for p, values, _ in scores])
            point, _, results = scores[winner]
            path = _freeze(out, grid, point, epsilon, results, scoring)
            frozen.append(path)
            for index, (candidate, values, _) in enumerate(scores):
                rows.append(
                    [
                        method,
                        candidate.name + (" (common)" if candidate.inherited else ""),
                        ", ".join(candidate.settings()) or "(base)",
                        f"{_mean(values):.4f}",
                        ", ".join(f"{v:.4f}" for v in values),
                        f"**winner** → `frozen/{path.name}`" if index == winner else "",
                    ]
                )
        title = "non-private" if math.isinf(epsilon) else f"ε = {epsilon:g}"
        header = ["method", "configuration", "overrides", "valid NDCG@10", "per run", ""]
        tables += [f"## {title}\n", markdown_table(header, rows), ""]
    equal = len({len(p) for p in grid.points.values()}) == 1
    text = "\n".join(
        [
            "# FedFuse tuning\n",
            f"Command: `{command}`\n",
            f"Grid: `{grid.path}`. Scored on the validation split only (test never read); "
            f"users per platform: {max_cases or 'all'}. The winner per method: the best mean "
            "NDCG@10 over its runs (each run: the mean over platforms); ties go to the first "
            "declared.\n",
            ("Equal effort" if equal else "**Unequal effort (--allow-unequal)**")
            + ": "
            + "; ".join(budget)
            + ".\n",
            *tables,
            "Frozen: " + ", ".join(f"`{p.relative_to(out)}`" for p in frozen) + "\n",
        ]
    )
    atomic_write(out / "tuning.md", text)
    return text
