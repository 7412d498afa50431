"""Human-readable summaries of a federation's platforms (the tables `fedfuse data` prints)."""

from __future__ import annotations

from collections.abc import Sequence

from common.config import TaskConfig
from common.platform_data import PlatformData, distinct_codes
from common.task import SplitSizes, split_sizes


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def distinct_users(data: PlatformData) -> set[str]:
    return set(distinct_codes(data.users)[1])


def platform_table(
    platforms: Sequence[PlatformData], sizes: Sequence[SplitSizes], threshold: float
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
    for data, size in zip(platforms, sizes, strict=True):
        users = distinct_users(data)
        positives = int(data.positives(threshold).sum())
        counts = [size.train, size.valid, size.test, size.test_cases]
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
    users = [distinct_users(p) for p in platforms]
    names = [p.name for p in platforms]
    rows = [[name, *(len(a & b) for b in users)] for name, a in zip(names, users, strict=True)]
    return markdown_table(["shared users", *names], rows)


def overlap_line(platforms: Sequence[PlatformData]) -> str:
    counts: dict[str, int] = {}
    for platform in platforms:
        for user in distinct_users(platform):
            counts[user] = counts.get(user, 0) + 1
    multi = sum(1 for c in counts.values() if c >= 2)
    share = 100 * multi / max(len(counts), 1)
    return f"users on 2+ platforms: {multi} of {len(counts)} ({share:.1f} %)"


def describe(platforms: Sequence[PlatformData], config: TaskConfig) -> str:
    """The full printed summary: per-platform table, overlap matrix and overlap share."""
    sizes = [split_sizes(p, config) for p in platforms]
    return "\n\n".join(
        [
            platform_table(platforms, sizes, config.positive_threshold),
            overlap_table(platforms),
            overlap_line(platforms),
        ]
    )
