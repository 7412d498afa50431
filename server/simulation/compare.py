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

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from client.ledger import LEDGER_FILE, PrivacyLedger  # noqa: E402
from common.adapters import load_adapter, trainable_arrays  # noqa: E402
from common.atomic import atomic_write  # noqa: E402
from common.config import RunConfig, load_config, with_settings  # noqa: E402
from common.dataset_summary import markdown_table  # noqa: E402
from common.errors import ConfigError  # noqa: E402
from common.sharing import seeded_arrays, shared_scorer  # noqa: E402
from server.federation.run_record import CONFIG_FILE, RunRecord  # noqa: E402
from server.simulation.baselines import (  # noqa: E402
    Arrays,
    Metrics,
    Scoring,
    dp_prior,
    evaluation_clients,
    popularity,
    train_centralized,
    train_local,
)
from server.simulation.bpr import bpr_local, bpr_pooled  # noqa: E402
from server.simulation.simulation import INCOMPLETE, prepare_run, simulate  # noqa: E402

FEDERATED = ("fedavg", "ffa", "fedsa")
# Ablations of a federation, named STRATEGY_ABLATION (``fedavg_text``): the settings changed.
ABLATIONS: dict[str, dict[str, dict[str, Any]]] = {
    # the text model alone: no prior, nothing private but the mixing weights
    "text": {"prior": {"enabled": False}, "model": {"private_factors": 0}},
    "shared": {"model": {"private_factors": 0}},  # no private item factors
    "user": {"dp": {"unit": "user"}},  # user-level DP instead of per example
}
VARIANTS = {
    f"{strategy}_{name}": (strategy, changes)
    for strategy in FEDERATED
    for name, changes in ABLATIONS.items()
}
DEFAULT_METHODS = ("popularity", "local", "centralized", *FEDERATED)  # a level without names
BPR = {"bpr_local": bpr_local, "bpr_pooled": bpr_pooled}  # non-private, tuned on valid
METHODS = (*DEFAULT_METHODS, "prior", *VARIANTS, *BPR)
COLUMNS = {"hr@10": "HR@10", "ndcg@10": "NDCG@10", "mrr": "MRR", "auc": "AUC"}
TARGET_SHARE = 0.9  # non-private: of the same model centralized, and of pooled BPR
POPULARITY_GAIN = 1.10  # at ε = 8: mean NDCG@10 over popularity's
LOW_EPSILON_SHARE = 0.95  # at lower ε: of popularity, on every platform


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
    """``config`` with DP off (``inf``) or calibrated to reach ``epsilon`` after all rounds."""
    dp = {"enabled": False} if math.isinf(epsilon) else {"enabled": True, "target_epsilon": epsilon}
    return with_settings(config, dp=dp)


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
    final = runs / cell.key
    resumed = final.exists() or (runs / f"{cell.key}{INCOMPLETE}").exists()
    strategy, changes = variant(cell.method, config)
    if not final.exists():
        pending = runs / f"{cell.key}{INCOMPLETE}"
        config = with_settings(config, federation={"strategy": strategy}, **changes)
        record = RunRecord(pending) if pending.exists() else prepare_run(config, runs, cell.key)
        simulate(record, cpus_per_client)
    config = load_config(final / CONFIG_FILE)
    state = final / "platform_state"
    clients = evaluation_clients(config, state)
    scorer, _ = shared_scorer(config.model, config.lora, strategy)
    load_adapter(scorer, RunRecord(final).adapter_dir(config.federation.rounds))
    metrics = scoring.adapters(clients, trainable_arrays(scorer, clients[0].shared))
    epsilons = {
        name: PrivacyLedger.load(state / name / LEDGER_FILE).spent()
        if config.dp.enabled
        else math.inf
        for name in metrics
    }
    return metrics, epsilons, resumed


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
    elif cell.method in BPR:
        metrics, extra["tuning"] = BPR[cell.method](config, _fresh(work), scoring)
        epsilons = dict.fromkeys(metrics, math.inf)  # plain BPR: no DP mechanism at all
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


def _mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else math.nan


def _error(values: Sequence[float]) -> float:
    """The standard error of the mean of ``values`` (∞ with fewer than two)."""
    return statistics.stdev(values) / math.sqrt(len(values)) if len(values) > 1 else math.inf


def combine_runs(results: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """One record per (method, level), in first-seen order: every metric is the mean over the
    cell's runs, ``runs`` counts them, ``ndcg_se`` is NDCG@10's standard error over the runs
    per platform (with two or more), ε the largest spent, wall time the sum."""
    groups: dict[tuple[str, float], list[dict[str, Any]]] = {}
    for result in results:
        groups.setdefault((result["method"], result["target_epsilon"]), []).append(result)
    combined = []
    for runs in groups.values():
        platforms = runs[0]["platforms"]
        record = dict(runs[0]) | {
            "runs": len(runs),
            "platforms": {
                p: {k: _mean([r["platforms"][p][k] for r in runs]) for k in platforms[p]}
                for p in platforms
            },
        }
        record.pop("run", None)
        if "epsilon" in record:
            record["epsilon"] = {p: max(r["epsilon"][p] for r in runs) for p in platforms}
        if "wall_s" in record:
            record["wall_s"] = sum(r["wall_s"] for r in runs)
            record["resumed"] = any(r.get("resumed") for r in runs)
        if len(runs) > 1:
            record["ndcg_se"] = {
                p: _error([r["platforms"][p]["ndcg@10"] for r in runs]) for p in platforms
            }
        combined.append(record)
    return combined


def _fmt(value: float, digits: int = 4) -> str:
    return "∞" if math.isinf(value) else "–" if math.isnan(value) else f"{value:.{digits}f}"


def level_table(results: Sequence[dict[str, Any]]) -> str:
    """One level's cells: a row per (method, platform) and the mean over platforms."""
    rows = []
    for result in results:
        per_platform = result["platforms"]
        for platform, metrics in sorted(per_platform.items()):
            rows.append(
                [
                    result["method"],
                    platform,
                    *(_fmt(metrics[k]) for k in COLUMNS),
                    _fmt(result["epsilon"][platform], 3),
                ]
            )
        means = [_mean([m[k] for m in per_platform.values()]) for k in COLUMNS]
        rows.append(
            [
                f"**{result['method']}**",
                "**mean**",
                *(f"**{_fmt(v)}**" for v in means),
                _fmt(max(result["epsilon"].values()), 3),
            ]
        )
    return markdown_table(["method", "platform", *COLUMNS.values(), "ε"], rows)


def _label(result: dict[str, Any]) -> str:
    """A row's method: ``ffa``, ``ffa (mean of 3 runs)`` or, for one run, ``ffa run 2``."""
    if "runs" not in result:  # one run, not yet combined
        return f"{result['method']} run {result.get('run', 1)}"
    runs = result["runs"]
    return result["method"] + (f" (mean of {runs} runs)" if runs > 1 else "")


def _ndcg_cell(result: dict[str, Any], platform: str) -> str:
    """NDCG@10 on ``platform``, ± its standard error over runs where there are several."""
    value = _fmt(result["platforms"].get(platform, {}).get("ndcg@10", math.nan))
    error = result.get("ndcg_se", {}).get(platform)
    return value if error is None else f"{value} ± {_fmt(error)}"


def ndcg_pivot(results: Sequence[dict[str, Any]]) -> str:
    """NDCG@10 by method (rows) and platform (columns): the table to read first."""
    platforms = sorted({p for r in results for p in r["platforms"]})
    rows = [
        [
            _label(r),
            *(_ndcg_cell(r, p) for p in platforms),
            _fmt(_mean([m["ndcg@10"] for m in r["platforms"].values()])),
            f"{r['wall_s']:.0f}" + (" (resumed)" if r.get("resumed") else ""),
        ]
        for r in results
    ]
    return markdown_table(["method", *platforms, "mean", "wall s"], rows)


def _ndcg(result: dict[str, Any]) -> dict[str, float]:
    return {p: m["ndcg@10"] for p, m in result["platforms"].items()}


def _runs(result: dict[str, Any]) -> str:
    runs = result.get("runs", 1)
    return f"{runs} run" + ("s" if runs > 1 else "")


def _gain(platform: str, ours: dict[str, Any], theirs: dict[str, Any]) -> str:
    """``platform: +0.0050 ± 0.0040``: the gain of the means and its standard error (the two
    cells' errors over their runs combined; a single run counts as none)."""
    gain = _ndcg(ours)[platform] - _ndcg(theirs)[platform]
    errors = [r.get("ndcg_se", {}).get(platform, 0.0) for r in (ours, theirs)]
    return f"- {platform}: {gain:+.4f} ± {math.hypot(*errors):.4f}"


def _verdict(failed: Sequence[str]) -> str:
    return "met" if not failed else f"missed on {', '.join(sorted(failed))}"


def _share(ours: dict[str, Any], theirs: dict[str, Any]) -> tuple[float, float, float]:
    mean, goal = _mean(list(_ndcg(ours).values())), _mean(list(_ndcg(theirs).values()))
    return (mean / goal if goal else math.nan), mean, goal


def target_statements(results: Sequence[dict[str, Any]]) -> list[str]:
    """The stated targets against the measured numbers (NDCG@10 on the split scored), for every
    federated cell whose yardsticks were measured too:

    - DP: mean ≥ 1.10 × popularity and ≥ popularity on every platform (ε ≥ 8); ≥ 0.95 ×
      popularity on every platform (lower ε); ≥ local-only at the same ε on every platform
      with the mean gain larger than its standard error over the platforms.
    - Non-private: mean ≥ 90 % of the same model centralized and of pooled BPR.

    A cell run several times counts with its mean over the runs; against local, each
    platform's gain then comes with its standard error over the runs.
    """
    results = combine_runs(results)
    found = {(r["method"], r["target_epsilon"]): r for r in results}
    by_method = {r["method"]: r for r in results}
    popular, bpr = by_method.get("popularity"), by_method.get("bpr_pooled")
    lines = []
    for (method, epsilon), result in sorted(found.items()):
        if method not in FEDERATED:
            continue
        ours = _ndcg(result)
        level = f"{method} at ε = {epsilon:g}" if not math.isinf(epsilon) else f"{method}, no DP"
        if popular and not math.isinf(epsilon):
            base = _ndcg(popular)
            if epsilon >= 8:
                share, mean, goal = _share(result, popular)
                verdict = "met" if share >= POPULARITY_GAIN else "missed"
                lines.append(
                    f"- {level}: mean {share:.3f} × popularity ({mean:.4f} vs {goal:.4f}; "
                    f"target ≥ {POPULARITY_GAIN:.2f}×): **{verdict}**"
                )
                failed = [p for p in ours if ours[p] < base[p]]
                lines.append(f"- {level} ≥ popularity on every platform: **{_verdict(failed)}**")
            else:
                failed = [p for p in ours if ours[p] < LOW_EPSILON_SHARE * base[p]]
                lines.append(
                    f"- {level} ≥ {LOW_EPSILON_SHARE:.2f} × popularity on every platform: "
                    f"**{_verdict(failed)}**"
                )
        local = found.get(("local", epsilon))
        if local and not math.isinf(epsilon):
            theirs = _ndcg(local)
            gains = [ours[p] - theirs[p] for p in ours]
            error = _error(gains)
            failed = [p for p in ours if ours[p] < theirs[p]]
            lines.append(f"- {level} ≥ local-only on every platform: **{_verdict(failed)}**")
            if "ndcg_se" in result or "ndcg_se" in local:
                lines.append(f"  - gain per platform, {_runs(result)} vs {_runs(local)}:")
                lines += [f"    {_gain(p, result, local)}" for p in sorted(ours)]
            verdict = "met" if _mean(gains) > error else "missed"
            lines.append(
                f"- {level}: mean gain over local {_mean(gains):+.4f} vs its standard error "
                f"over the platforms {error:.4f}: **{verdict}**"
            )
        if math.isinf(epsilon):
            for name, other in (
                ("the same model centralized", found.get(("centralized", math.inf))),
                ("pooled BPR", bpr),
            ):
                if other:
                    share, mean, goal = _share(result, other)
                    verdict = "met" if share >= TARGET_SHARE else "missed"
                    lines.append(
                        f"- {level}: {share:.1%} of {name} ({mean:.4f} vs {goal:.4f}; "
                        f"target ≥ {TARGET_SHARE:.0%}): **{verdict}**"
                    )
    return lines


def plot(results: Sequence[dict[str, Any]], path: Path) -> None:
    """Grouped bars: NDCG@10 per platform, one group per method, one panel per level; a cell
    run several times is its mean, with its standard error over the runs as an error bar."""
    results = combine_runs(results)
    levels = sorted({r["target_epsilon"] for r in results}, key=lambda e: (math.isinf(e), -e))
    figure, axes = plt.subplots(
        1, len(levels), figsize=(6 * len(levels), 4.2), squeeze=False, sharey=True
    )
    for axis, epsilon in zip(axes[0], levels, strict=True):
        chosen = [r for r in results if r["target_epsilon"] == epsilon]
        platforms = sorted({p for r in chosen for p in r["platforms"]})
        width = 0.8 / max(len(chosen), 1)
        for index, result in enumerate(chosen):
            values = [result["platforms"].get(p, {}).get("ndcg@10", math.nan) for p in platforms]
            errors = [result.get("ndcg_se", {}).get(p, 0.0) for p in platforms]
            positions = [k + index * width for k in range(len(platforms))]
            axis.bar(positions, values, width, yerr=errors, capsize=2, label=_label(result))
        axis.set_xticks([k + 0.4 - width / 2 for k in range(len(platforms))])
        axis.set_xticklabels(platforms, rotation=20, fontsize=8)
        axis.set_title("non-private" if math.isinf(epsilon) else f"ε = {epsilon:g}")
        axis.set_ylabel("NDCG@10 (test)")
        axis.grid(axis="y", alpha=0.3)
        axis.legend(fontsize=7)
    figure.tight_layout()
    temporary = path.with_name(f".{path.name}.tmp.png")
    figure.savefig(temporary, dpi=120)
    plt.close(figure)
    temporary.replace(path)


def _split(record: dict[str, Any]) -> str:
    """The split a cell was scored on (cells from before ``--split`` existed: test)."""
    return record.get("split", "test")


def report(results: Sequence[dict[str, Any]], out: Path, command: str) -> str:
    """Write comparison.json (every run), comparison.md and ndcg_at_10.png (a cell run
    several times as its mean; the Markdown lists its runs too); return the Markdown."""
    combined = combine_runs(results)
    split = _split(results[0])
    levels = sorted({r["target_epsilon"] for r in results}, key=lambda e: (math.isinf(e), -e))
    sections = [
        "# FedFuse comparison\n",
        f"Command: `{command}`\n",
        f"Total wall time of the cells: {sum(r['wall_s'] for r in results) / 60:.1f} min.\n",
        "![NDCG@10 per platform and method](ndcg_at_10.png)\n",
        "## Targets\n",
        "\n".join(target_statements(results)) or "(no federated DP cell with its baselines)",
        "",
    ]
    for epsilon in levels:
        chosen = [r for r in combined if r["target_epsilon"] == epsilon]
        title = "non-private" if math.isinf(epsilon) else f"ε = {epsilon:g}"
        sections += [
            f"## {title}\n",
            f"NDCG@10 on the {split} split (± the standard error over a cell's runs):\n",
            ndcg_pivot(chosen),
            "",
        ]
        repeated = {r["method"] for r in chosen if r["runs"] > 1}
        runs = [r for r in results if r["target_epsilon"] == epsilon and r["method"] in repeated]
        if runs:
            sections += ["Each run of the cells that ran more than once:\n", ndcg_pivot(runs), ""]
        sections += [
            "All metrics (a cell's mean over its runs), and the ε each platform spent:\n",
            level_table(chosen),
            "",
        ]
    text = "\n".join(sections)
    atomic_write(out / "comparison.json", json.dumps(list(results), indent=2) + "\n")
    atomic_write(out / "comparison.md", text)
    plot(results, out / "ndcg_at_10.png")
    return text


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
        scored = _split(json.loads(path.read_text(encoding="utf-8")))
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
        mean = _mean([m["ndcg@10"] for m in result["platforms"].values()])
        progress(
            f"[fedfuse] cell {index}/{len(cells)} {cell.key}: mean NDCG@10 {mean:.4f} "
            f"in {result['wall_s']:.0f} s"
        )
        results.append(result)
    return report(results, out, command)
