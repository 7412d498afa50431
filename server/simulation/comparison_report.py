"""``fedfuse compare``'s report: tables, stated targets, intervals and a plot, from cell records.

A cell run several times counts with its mean over runs; ``ndcg_se`` is its standard error
over the runs. Gains come with 95 % intervals over users and runs (intervals.py).
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from common.atomic import atomic_write  # noqa: E402
from common.dataset_summary import markdown_table  # noqa: E402
from server.simulation.intervals import gain_lines  # noqa: E402
from server.simulation.joining import BLENDS  # noqa: E402
from server.simulation.methods import FEDERATED, VARIANTS, YARDSTICKS  # noqa: E402

COLUMNS = {
    "hr@10": "HR@10",
    "ndcg@10": "NDCG@10",
    "mrr": "MRR",
    "auc": "AUC",
    "full-ndcg@10": "full NDCG@10",
    "full-recall@20": "full Recall@20",
}
TARGET_SHARE = 0.9  # non-private: of the same model centralized, and of pooled BPR
POPULARITY_GAIN = 1.10  # at ε = 8: mean NDCG@10 over popularity's
LOW_EPSILON_SHARE = 0.95  # at lower ε: of popularity, on every platform


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
                p: {
                    k: _mean([r["platforms"][p][k] for r in runs])
                    for k in platforms[p]
                    if k != "cases"  # per-case columns: the intervals' input, not a metric
                }
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
                    *(_fmt(metrics.get(k, math.nan)) for k in COLUMNS),
                    _fmt(result["epsilon"][platform], 3),
                ]
            )
        means = [_mean([m.get(k, math.nan) for m in per_platform.values()]) for k in COLUMNS]
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


def _without_cases(record: dict[str, Any]) -> dict[str, Any]:
    platforms = record["platforms"]
    kept = {p: {k: v for k, v in m.items() if k != "cases"} for p, m in platforms.items()}
    return record | {"platforms": kept}


def scored_split(record: dict[str, Any]) -> str:
    """The split a cell was scored on (cells from before ``--split`` existed: test)."""
    return record.get("split", "test")


def report(results: Sequence[dict[str, Any]], out: Path, command: str) -> str:
    """Write comparison.json (every run), comparison.md and ndcg_at_10.png (a cell run
    several times as its mean; the Markdown lists its runs too); return the Markdown."""
    combined = combine_runs(results)
    split = scored_split(results[0])
    levels = sorted({r["target_epsilon"] for r in results}, key=lambda e: (math.isinf(e), -e))
    sections = [
        "# FedFuse comparison\n",
        f"Command: `{command}`\n",
        f"Total wall time of the cells: {sum(r['wall_s'] for r in results) / 60:.1f} min.\n",
        "![NDCG@10 per platform and method](ndcg_at_10.png)\n",
        "## Targets\n",
        "\n".join(target_statements(results)) or "(no federated DP cell with its baselines)",
        "",
        "## Gains with 95 % intervals (test sampling over users and run to run)\n",
        "\n".join(
            line
            for metric in ("ndcg@10", "full-ndcg@10")
            for line in gain_lines(results, [*FEDERATED, *VARIANTS, *BLENDS], YARDSTICKS, metric)
        )
        or "(no pair of cells with per-case metrics)",
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
    runs = [_without_cases(r) for r in results]  # per-case columns stay in OUT/cells/
    atomic_write(out / "comparison.json", json.dumps(runs, indent=2) + "\n")
    atomic_write(out / "comparison.md", text)
    plot(results, out / "ndcg_at_10.png")
    return text
