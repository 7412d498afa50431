"""Cross-platform cold start (scripts/eval_cold_start.py) on a tiny finished run: every test
case is ranked, and the history a user brings from elsewhere is really from elsewhere and from
before the interaction it is tested on (no leak of the answer or of the future)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest

from common.config import RunConfig, load_config
from common.platform_data import PlatformData, federation_platforms, read_platform
from common.task import build_task

SCRIPT = Path(__file__).resolve().parents[1] / "scripts" / "eval_cold_start.py"


@pytest.fixture(scope="module")
def script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("eval_cold_start", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def config(finished_run: Path) -> RunConfig:
    return load_config(finished_run / "config.json")


@pytest.fixture(scope="module")
def platforms(config: RunConfig) -> list[PlatformData]:
    return [read_platform(folder, name) for name, folder in federation_platforms(config.data)]


def test_every_test_case_of_every_platform_is_ranked(
    script: ModuleType, finished_run: Path, config: RunConfig, platforms: list[PlatformData]
) -> None:
    rows = script.cold_start(finished_run)
    assert [row["platform"] for row in rows] == [data.name for data in platforms]
    for row, data in zip(rows, platforms, strict=True):
        assert row["cases"] == len(build_task(data, config.task).test_ranking) > 0
        assert 0 <= row["foreign_cases"] <= row["cases"]
        assert row["foreign_mean_length"] <= config.task.history_len
        for method in script.METHODS:
            metrics = row["all"][method]
            assert metrics["n"] == row["cases"]
            assert 0.0 <= metrics["ndcg@10"] <= 1.0 and 0.0 <= metrics["hr@10"] <= 1.0
    assert sum(row["foreign_cases"] for row in rows) > 0  # the cold start path was exercised


def test_foreign_history_is_from_other_platforms_and_before_the_test_interaction(
    script: ModuleType, config: RunConfig, platforms: list[PlatformData]
) -> None:
    by_name = {data.name: data for data in platforms}
    threshold = config.task.positive_threshold
    likes = script.likes_by_user(platforms, threshold)
    seen_empty = seen_later = False
    for data in platforms:
        task = build_task(data, config.task)
        cases = script.platform_cases(data, task, likes, config.task)
        assert [case for case, _ in cases] == task.test_ranking
        positive = data.positives(threshold)
        for case, foreign in cases:
            # the held-out interaction's time, read from the platform's own rows
            held_out = (data.users == case.user) & (data.items == case.positive) & positive
            tested_at = data.timestamps[held_out].max()
            assert len(foreign) <= config.task.history_len
            times = [like.timestamp for like in foreign]
            assert times == sorted(times, reverse=True)  # newest first
            for like in foreign:
                assert like.platform != data.name and like.item not in data.item_text
                assert like.timestamp < tested_at
                origin = by_name[like.platform]
                assert like.text == origin.item_text[like.item]
                rows = (origin.users == case.user) & (origin.items == like.item)
                assert np.any(
                    origin.positives(threshold)[rows] & (origin.timestamps[rows] == like.timestamp)
                )
            later = [
                like
                for like in likes.get(case.user, [])
                if like.platform != data.name and like.timestamp >= tested_at
            ]
            seen_empty |= not foreign
            seen_later |= bool(later)
    assert seen_empty and seen_later  # both the "nothing yet" and the time cut were exercised
