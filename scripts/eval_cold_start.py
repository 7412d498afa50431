"""Cross-platform cold start (issue 13): rank a platform's test users with only what they liked
on the other platforms, sent as text with the request, against the same users' own history.

Usage: python scripts/eval_cold_start.py RUN_DIR [--max-cases N] [--out FILE.json]

For every test ranking case of every platform B of a finished run, the same candidates (the
held-out positive and its 99 unseen items) are ranked five ways:

- ``on_platform``: the case's own history on B, as catalogue items, through the Recommender;
- ``cold_start``: the user's positives on the other platforms strictly before the test
  interaction (newest first, at most ``task.history_len``), as text only (``Liked(row=None)``),
  the way a person new to B would send them; a user with none is ranked with an empty history
  (prior + text + bias) and counted in ``foreign_cases`` as not having one;
- ``no_history``: the Recommender with an empty history (prior + text + bias): the control
  that says how much either history adds to what the model scores without one;
- ``popularity``: B's exact positive train counts;
- ``prior``: B's DP-released prior alone, as the run's platform state holds it.

Prints a Markdown table (per platform and the mean over platforms) and the paired difference
of per-case NDCG@10 between cold start and each other ranking over all cases; writes JSON.
"""

from __future__ import annotations

import argparse
import json
import time
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from client.popularity_prior import positive_counts
from common.config import TaskConfig, load_config
from common.dataset_summary import markdown_table
from common.evaluation import CountScorer, sample_cases
from common.metrics import case_metrics, ranking_metrics, tie_counts
from common.platform_data import PlatformData, federation_platforms, read_platform
from common.task import PlatformTask, RankingCase, build_task
from server.federation.run_record import CONFIG_FILE, RunRecord
from server.serving.recommender import Liked, Recommender

METHODS = ("on_platform", "cold_start", "no_history", "popularity", "prior")
K = 10


@dataclass(frozen=True)
class ForeignLike:
    """A positive interaction of a user on some platform, as another platform would get it."""

    platform: str
    item: str
    text: str  # what ``platform`` shows for the item: all the receiving platform sees
    timestamp: float


def likes_by_user(
    platforms: Sequence[PlatformData], threshold: float
) -> dict[str, list[ForeignLike]]:
    """Every user's positives on every platform, oldest first (ties: platform, then file order),
    so that one pass per case picks the newest ones before a given time."""
    likes: dict[str, list[ForeignLike]] = defaultdict(list)
    for data in platforms:
        for row in np.flatnonzero(data.positives(threshold)):
            item = str(data.items[row])
            likes[str(data.users[row])].append(
                ForeignLike(data.name, item, data.item_text[item], float(data.timestamps[row]))
            )
    for user_likes in likes.values():
        user_likes.sort(key=lambda like: like.timestamp)  # stable: keeps platform and file order
    return dict(likes)


def foreign_history(
    likes: Sequence[ForeignLike], platform: str, before: float, limit: int
) -> list[ForeignLike]:
    """The newest ``limit`` likes from platforms other than ``platform``, strictly before
    ``before``: what the person could bring to ``platform`` at the time of its test interaction."""
    earlier = [like for like in likes if like.platform != platform and like.timestamp < before]
    return earlier[::-1][:limit]


def held_out_times(data: PlatformData, threshold: float) -> dict[str, float]:
    """Each user's test interaction time on the platform: ``build_task`` holds out the last
    positive in time order, so it is the latest time of the user's positives."""
    times: dict[str, float] = {}
    positive = data.positives(threshold)
    for user, timestamp in zip(data.users[positive], data.timestamps[positive], strict=True):
        times[str(user)] = max(float(timestamp), times.get(str(user), -np.inf))
    return times


def platform_cases(
    data: PlatformData,
    task: PlatformTask,
    likes: dict[str, list[ForeignLike]],
    config: TaskConfig,
    max_cases: int = 0,
) -> list[tuple[RankingCase, list[ForeignLike]]]:
    """The platform's test ranking cases (all, or the fixed sample evaluation uses), each with
    the user's foreign history at the time of its test interaction."""
    times = held_out_times(data, config.positive_threshold)
    return [
        (
            case,
            foreign_history(
                likes.get(case.user, []), data.name, times[case.user], config.history_len
            ),
        )
        for case in sample_cases(task.test_ranking, max_cases)
    ]


def evaluate_platform(
    recommender: Recommender,
    cases: Sequence[tuple[RankingCase, list[ForeignLike]]],
    counts: dict[str, float],
) -> dict[str, Any]:
    """One platform's row: each ranking's metrics over all its cases, and over the cases
    that have a foreign history (the others are cold start with nothing to go on)."""
    featurizer = recommender.featurizer
    popularity = CountScorer(counts).score_cases(featurizer, [c for c, _ in cases], len(cases))
    counts: dict[str, list[tuple[int, int]]] = {method: [] for method in METHODS}
    for (case, foreign), popular in zip(cases, popularity, strict=True):
        candidates = list(case.candidates)
        own = recommender.resolve(list(case.history))  # ids of B's catalogue
        elsewhere = [Liked(like.item, like.text, None) for like in foreign]
        scores = {
            "on_platform": recommender.scores(own, candidates),
            "cold_start": recommender.scores(elsewhere, candidates),
            "no_history": recommender.scores([], candidates),
            "popularity": popular,
            "prior": featurizer.prior[[featurizer.item_row[i] for i in candidates]].numpy(),
        }
        for method, values in scores.items():
            counts[method].append(tie_counts(values[0], values[1:]))
    has_foreign = np.array([bool(foreign) for _, foreign in cases], dtype=bool)
    lengths = [len(foreign) for _, foreign in cases if foreign]
    return {
        "platform": recommender.platform,
        "cases": len(cases),
        "foreign_cases": int(has_foreign.sum()),
        "foreign_mean_length": float(np.mean(lengths)) if lengths else 0.0,
        "all": {m: ranking_metrics(*np.array(c).T, K) for m, c in counts.items()},
        "with_foreign": {
            m: ranking_metrics(*np.array(c)[has_foreign].T, K) for m, c in counts.items()
        },
        # per case, in case order: for paired comparisons
        "ndcg": {
            m: case_metrics(*np.array(c).T, K)[f"ndcg@{K}"].tolist() for m, c in counts.items()
        },
    }


def cold_start(run_dir: Path | str, max_cases: int = 0) -> list[dict[str, Any]]:
    """Every platform's row for the finished run in ``run_dir`` (see :func:`evaluate_platform`);
    one platform's model is held at a time."""
    config = load_config(RunRecord(run_dir).root / CONFIG_FILE)
    platforms = [read_platform(folder, name) for name, folder in federation_platforms(config.data)]
    likes = likes_by_user(platforms, config.task.positive_threshold)
    rows = []
    for data in platforms:
        task = build_task(data, config.task)
        cases = platform_cases(data, task, likes, config.task, max_cases)
        recommender = Recommender(run_dir, data.name)
        rows.append(evaluate_platform(recommender, cases, positive_counts(task)))
    return rows


def mean_row(rows: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Metrics averaged over platforms, unweighted (as docs/results.md reports means); cases
    and foreign history lengths pooled."""
    return {
        "platform": "mean",
        "cases": sum(row["cases"] for row in rows),
        "foreign_cases": sum(row["foreign_cases"] for row in rows),
        "foreign_mean_length": sum(r["foreign_mean_length"] * r["foreign_cases"] for r in rows)
        / max(1, sum(r["foreign_cases"] for r in rows)),
        **{
            subset: {
                method: {
                    key: float(np.mean([row[subset][method][key] for row in rows]))
                    for key in (f"ndcg@{K}", f"hr@{K}", "mrr")
                }
                for method in METHODS
            }
            for subset in ("all", "with_foreign")
        },
    }


def paired_difference(rows: Sequence[dict[str, Any]], method: str) -> dict[str, float]:
    """Mean and standard error of cold start's per-case NDCG@10 minus ``method``'s, over the
    cases of all ``rows``: both rank the same candidates, so the pairing removes case noise."""
    gains = [
        cold - other
        for row in rows
        for cold, other in zip(row["ndcg"]["cold_start"], row["ndcg"][method], strict=True)
    ]
    return {"mean": float(np.mean(gains)), "se": float(np.std(gains, ddof=1) / np.sqrt(len(gains)))}


LABELS = {
    "on_platform": "on-platform history",
    "cold_start": "cold start (foreign text)",
    "no_history": "no history",
    "popularity": "popularity (exact)",
    "prior": "DP prior alone",
}


def table(rows: Sequence[dict[str, Any]]) -> str:
    """NDCG@10 / HR@10 of each ranking per platform, with the case counts."""
    header = ["platform", "cases", "with foreign history", "mean foreign length"]
    header += [f"{LABELS[m]}: NDCG@{K} / HR@{K}" for m in METHODS]
    lines = []
    for row in rows:
        bold = "**" if row["platform"] == "mean" else ""
        cells = [f"{bold}{row['platform']}{bold}", row["cases"], row["foreign_cases"]]
        cells.append(f"{row['foreign_mean_length']:.2f}")
        metrics = row["all"]
        cells += [f"{metrics[m][f'ndcg@{K}']:.4f} / {metrics[m][f'hr@{K}']:.4f}" for m in METHODS]
        lines.append(cells)
    return markdown_table(header, lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", metavar="RUN_DIR", type=Path, help="a finished run folder")
    parser.add_argument("--max-cases", type=int, default=0, help="test cases per platform (0: all)")
    parser.add_argument("--out", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    start = time.perf_counter()
    rows = cold_start(args.run_dir, args.max_cases)
    paired = {m: paired_difference(rows, m) for m in METHODS if m != "cold_start"}
    rows.append(mean_row(rows))
    seconds = time.perf_counter() - start
    print(table(rows) + "\n")
    cases = rows[-1]["cases"]
    for method, gain in paired.items():
        print(
            f"cold start - {LABELS[method]}: NDCG@{K} {gain['mean']:+.4f} "
            f"± {gain['se']:.4f} (paired over {cases} cases)"
        )
    print(f"\n{seconds:.0f} s")
    if args.out:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        document = {"run": str(args.run_dir), "max_cases": args.max_cases, "seconds": seconds}
        document |= {"cold_start_minus": paired, "rows": rows}
        args.out.write_text(json.dumps(document, indent=1) + "\n")


if __name__ == "__main__":
    main()
