"""A run's summary: a Markdown table and PNG plots (metric and ε per round, per platform)."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.ticker import MaxNLocator  # noqa: E402

from common.atomic import atomic_write  # noqa: E402
from common.dataset_summary import markdown_table  # noqa: E402
from server.federation.run_record import RunRecord  # noqa: E402

SUMMARY_FILE = "summary.md"
METRIC_COLUMNS = ("hr@10", "ndcg@10", "mrr", "auc", "prior-ndcg@10")


def _series(events: list[dict[str, Any]], kind: str, key: str) -> dict[str, dict[int, float]]:
    """platform -> round -> value of ``key`` in successful ``kind`` replies."""
    out: dict[str, dict[int, float]] = defaultdict(dict)
    for event in events:
        if event.get("event") == kind and event.get("status") == "ok" and key in event:
            out[str(event.get("platform"))][int(event["round"])] = float(event[key])
    return out


def _fmt(value: float | None, digits: int = 4) -> str:
    return "–" if value is None or math.isnan(value) else f"{value:.{digits}f}"


def ledger_spent(record: RunRecord) -> dict[str, float]:
    """Each platform's ε as its ledger holds it (PRV), for the platforms whose state folder is
    here: with rounds charged but never answered (a kill after the charge), which the replies
    in metrics.jsonl cannot show."""
    from client.ledger import LEDGER_FILE, PrivacyLedger

    state = Path(str(record.read_config().get("dp", {}).get("state_dir", "")))
    ledgers = sorted(state.glob(f"*/{LEDGER_FILE}")) if state.is_dir() else []
    return {path.parent.name: PrivacyLedger.load(path).spent() for path in ledgers}


def summary_table(events: list[dict[str, Any]], ledgers: dict[str, float] | None = None) -> str:
    """Last evaluated round per platform, its ε, failures, and the mean over platforms. ε is
    the ledger's (``ledgers``) where there is one, else the platform's last reply's."""
    evaluated = {key: _series(events, "evaluate", key) for key in METRIC_COLUMNS}
    replied = _series(events, "train", "epsilon")
    spent = {p: series[max(series)] for p, series in replied.items()} | (ledgers or {})
    failures: dict[str, int] = defaultdict(int)
    for event in events:
        if event.get("status") == "error":
            failures[str(event.get("node"))] += 1
    platforms = sorted(set(evaluated["ndcg@10"]) | set(replied))
    rows, means = [], defaultdict(list)
    for platform in platforms:
        series = evaluated["ndcg@10"].get(platform, {})
        last = max(series, default=None)
        values = [
            evaluated[key].get(platform, {}).get(last) if last else None for key in METRIC_COLUMNS
        ]
        for key, value in zip(METRIC_COLUMNS, values, strict=True):
            if value is not None and not math.isnan(value):
                means[key].append(value)
        rows.append(
            [platform, last or "–", *(_fmt(v) for v in values), _fmt(spent.get(platform), 3)]
        )
    rows.append(
        [
            "**mean**",
            "",
            *(_fmt(sum(means[k]) / len(means[k]) if means[k] else None) for k in METRIC_COLUMNS),
            "",
        ]
    )
    header = ["platform", "round", "HR@10", "NDCG@10", "MRR", "AUC", "DP prior NDCG@10", "ε spent"]
    table = markdown_table(header, rows)
    if failures:
        table += "\n\nfailed replies by node: " + ", ".join(
            f"{n}: {c}" for n, c in failures.items()
        )
    return table


def _plot(series: dict[str, dict[int, float]], ylabel: str, path: Path) -> None:
    figure, axes = plt.subplots(figsize=(6, 4))
    for platform, values in sorted(series.items()):
        rounds = sorted(values)
        axes.plot(rounds, [values[r] for r in rounds], marker="o", label=platform)
    axes.set_xlabel("round")
    axes.xaxis.set_major_locator(MaxNLocator(integer=True))
    axes.set_ylabel(ylabel)
    axes.grid(alpha=0.3)
    if series:
        axes.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=120)
    plt.close(figure)


def run_table(record: RunRecord) -> str:
    """The run's summary table (:func:`summary_table` of its events and ledgers)."""
    return summary_table(record.events(), ledger_spent(record))


def write_report(record: RunRecord) -> str:
    """Write summary.md, ndcg_per_round.png and epsilon_per_round.png; return the table."""
    events = record.events()
    table = summary_table(events, ledger_spent(record))
    atomic_write(
        record.root / SUMMARY_FILE,
        "# Run summary\n\n" + table + "\n\n"
        "![NDCG@10 per round](ndcg_per_round.png)\n![ε per round](epsilon_per_round.png)\n",
    )
    _plot(
        _series(events, "evaluate", "ndcg@10"),
        "NDCG@10 (evaluation split)",
        record.root / "ndcg_per_round.png",
    )
    _plot(
        _series(events, "train", "epsilon"),
        "cumulative ε (PRV)",
        record.root / "epsilon_per_round.png",
    )
    return table
