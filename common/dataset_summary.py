"""Human-readable summaries of a federation's platforms (the tables `fedfuse data` prints)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import UTC, datetime

from common.config import TaskConfig
from common.platform_data import PlatformData, distinct_codes
from common.task import SplitSizes, split_sizes, time_cuts

TIME_QUANTILES = (0.7, 0.85)  # where the suggested global time split cuts


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(cell) for cell in row) + " |" for row in rows]
    return "\n".join(lines)


def platform_table(
    platforms: Sequence[PlatformData],
    users: Sequence[set[str]],
    sizes: Sequence[SplitSizes],
    threshold: float,
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
    totals = [0, 0, 0, 0, 0, 0, 0]  # interactions, items, positives, then counts' columns
    all_users: set[str] = set()
    for data, platform_users, size in zip(platforms, users, sizes, strict=True):
        positives = int(data.positives(threshold).sum())
        counts = [size.train, size.valid, size.test, size.test_cases]
        rows.append(
            [
                data.name,
                data.num_interactions,
                len(platform_users),
                len(data.item_text),
                f"{100 * positives / data.num_interactions:.1f}",
                *counts,
            ]
        )
        totals[0] += data.num_interactions
        all_users |= platform_users
        totals[1] += len(data.item_text)
        totals[2] += positives
        for k, count in enumerate(counts):
            totals[3 + k] += count
    rows.append(
        [
            "**all**",
            totals[0],
            len(all_users),
            totals[1],
            f"{100 * totals[2] / max(totals[0], 1):.1f}",
            *totals[3:],
        ]
    )
    return markdown_table(header, rows)


def overlap_table(platforms: Sequence[PlatformData], users: Sequence[set[str]]) -> str:
    """Users shared by each pair of platforms (diagonal: the platform's own user count)."""
    names = [p.name for p in platforms]
    rows = [[name, *(len(a & b) for b in users)] for name, a in zip(names, users, strict=True)]
    return markdown_table(["shared users", *names], rows)


def overlap_line(users: Sequence[set[str]]) -> str:
    counts: dict[str, int] = {}
    for platform_users in users:
        for user in platform_users:
            counts[user] = counts.get(user, 0) + 1
    multi = sum(1 for c in counts.values() if c >= 2)
    share = 100 * multi / max(len(counts), 1)
    return f"users on 2+ platforms: {multi} of {len(counts)} ({share:.1f} %)"


def _seconds(value: float) -> str:
    """A cut as a user can paste it into ``--set task.valid_from=...``, with its UTC date."""
    text = str(int(value)) if value.is_integer() else repr(value)
    try:
        when = datetime.fromtimestamp(value, UTC).strftime("%Y-%m-%d %H:%M")
    except (OverflowError, OSError, ValueError):  # synthetic timestamps far from the epoch
        return text
    return f"{text} ({when} UTC)"


def own_cuts(platforms: Sequence[PlatformData], config: TaskConfig) -> TaskConfig:
    """The split a summary shows when no run configuration names one: the default global time
    split, cut at this data's own :data:`TIME_QUANTILES` (the defaults' cut dates are
    ML-100K's, meaningless for other data), or leave-last when the data cannot be cut."""
    if config.split != "global_time" or not sum(p.num_interactions for p in platforms):
        return config
    valid_from, test_from = time_cuts(platforms, TIME_QUANTILES)
    if valid_from >= test_from:  # too many tied timestamps for a time split
        update: dict[str, object] = {"split": "leave_last", "valid_from": None, "test_from": None}
    else:
        update = {"valid_from": valid_from, "test_from": test_from}
    return TaskConfig.model_validate(config.model_dump() | update)


def time_split_summary(
    platforms: Sequence[PlatformData],
    config: TaskConfig,
    quantiles: tuple[float, float] = TIME_QUANTILES,
) -> str:
    """Where a global time split at ``quantiles`` of the federation's interaction times would
    cut, and how many users and ranking cases validation and test would then have per
    platform: the numbers to choose ``task.valid_from`` / ``task.test_from`` by, so that
    enough users stay in test."""
    if not sum(p.num_interactions for p in platforms):
        return "global time split: no interactions to cut"
    valid_from, test_from = time_cuts(platforms, quantiles)
    line = (
        f"global time split at quantiles {quantiles[0]:g}/{quantiles[1]:g}: "
        f"task.valid_from={_seconds(valid_from)}, task.test_from={_seconds(test_from)}"
    )
    if valid_from >= test_from:
        return f"{line}: the cuts coincide (too many tied timestamps for a time split)"
    at_cuts = TaskConfig.model_validate(
        config.model_dump()
        | {"split": "global_time", "valid_from": valid_from, "test_from": test_from}
    )
    sizes = [split_sizes(p, at_cuts) for p in platforms]
    header = ["platform", "valid users", "valid cases", "test users", "test cases"]
    rows: list[list[object]] = [
        [p.name, s.valid_users, s.valid_cases, s.test_users, s.test_cases]
        for p, s in zip(platforms, sizes, strict=True)
    ]
    rows.append(
        ["**all**", "", sum(s.valid_cases for s in sizes), "", sum(s.test_cases for s in sizes)]
    )
    return f"{line}\n\n{markdown_table(header, rows)}"


def describe(platforms: Sequence[PlatformData], config: TaskConfig) -> str:
    """The full printed summary: per-platform table under the configured split, overlap
    matrix and share, and what a global time split at the default quantiles would hold out."""
    sizes = [split_sizes(p, config) for p in platforms]
    # each platform's distinct users, once: hashing 10⁷ ids is the summary's costly part
    users = [set(distinct_codes(p.users)[1]) for p in platforms]
    return "\n\n".join(
        [
            platform_table(platforms, users, sizes, config.positive_threshold),
            overlap_table(platforms, users),
            overlap_line(users),
            time_split_summary(platforms, config),
        ]
    )
