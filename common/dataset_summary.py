"""Human-readable summaries of a federation's platforms (the tables `fedfuse data` prints)."""

from __future__ import annotations

from collections.abc import Sequence

from common.config import TaskConfig
from common.platform_data import PlatformData
from common.task import PlatformTask, build_task


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def platform_table(
    platforms: Sequence[PlatformData], tasks: Sequence[PlatformTask], threshold: float
) -> str:
    """Ratings, users, items, positives and split sizes per platform, with a total row."""
    header = [
        "platform",
        "ratings",
        "users",
        "items",
        "positive %",
        "train",
        "valid",
        "test",
        "test cases",
    ]
    rows = []
    totals = [0, set(), 0, 0, 0, 0, 0, 0]
    for data, task in zip(platforms, tasks, strict=True):
        users = set(data.users.tolist())
        positives = int(data.positives(threshold).sum())
        counts = [len(task.train), len(task.valid), len(task.test), len(task.test_ranking)]
        rows.append(
            [
                data.name,
                data.num_interactions,
                len(users),
                len(data.item_text),
                f"{100 * positives / data.num_interactions:.1f}",
                *counts,
            ]
        )
        totals[0] += data.num_interactions
        totals[1] |= users
        totals[2] += len(data.item_text)
        totals[3] += positives
        for k, count in enumerate(counts):
            totals[4 + k] += count
    rows.append(
        [
            "**all**",
            totals[0],
            len(totals[1]),
            totals[2],
            f"{100 * totals[3] / max(totals[0], 1):.1f}",
            *totals[4:],
        ]
    )
    return markdown_table(header, rows)


def overlap_table(platforms: Sequence[PlatformData]) -> str:
    """Users shared by each pair of platforms (diagonal: the platform's own user count)."""
    users = [set(p.users.tolist()) for p in platforms]
    names = [p.name for p in platforms]
    rows = [[name, *(len(a & b) for b in users)] for name, a in zip(names, users, strict=True)]
    return markdown_table(["shared users", *names], rows)


def overlap_line(platforms: Sequence[PlatformData]) -> str:
    counts: dict[str, int] = {}
    for platform in platforms:
        for user in set(platform.users.tolist()):
            counts[user] = counts.get(user, 0) + 1
    multi = sum(1 for c in counts.values() if c >= 2)
    share = 100 * multi / max(len(counts), 1)
    return f"users on 2+ platforms: {multi} of {len(counts)} ({share:.1f} %)"


def describe(platforms: Sequence[PlatformData], config: TaskConfig) -> str:
    """The full printed summary: per-platform table, overlap matrix and overlap share."""
    tasks = [build_task(p, config) for p in platforms]
    return "\n\n".join(
        [
            platform_table(platforms, tasks, config.positive_threshold),
            overlap_table(platforms),
            overlap_line(platforms),
        ]
    )
