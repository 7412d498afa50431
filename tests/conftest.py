"""Shared fixtures: a tiny random BERT folder and a small synthetic federation."""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import pytest

# Session fixtures that run a simulation: a test using one needs Ray, if only the first time.
SIMULATING_FIXTURES = {"finished_run", "interrupted_run", "run_dirs"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if SIMULATING_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.ray)
        if any(item.get_closest_marker(name) for name in ("ray", "tls", "browser")):
            item.add_marker(pytest.mark.slow)


os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from common.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-bert"), "bert")


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from common.platform_writer import write_dataset
    from common.synthetic import SyntheticConfig, generate

    out = tmp_path_factory.mktemp("synthetic") / "data"
    return write_dataset(out, generate(SyntheticConfig(platforms=2, users=12, items=30, seed=3)))


# The small run every integration test starts from: tiny model, 2 rounds of 2 local DP steps
# (the `rounds` schedule, adapters on every step, no per-part clip shares; a test of the
# default lockstep recipe says so), each synthetic user's last positives held out.
TINY_RUN: dict[str, dict[str, object]] = {
    "task": {"split": "leave_last", "history_len": 5},
    "model": {"max_length": 32},
    "lora": {"rank": 4},
    "train": {"batch_size": 16, "local_steps": 2, "adapter_every": 1},
    "dp": {"target_epsilon": 4.0, "delta": 1e-3, "expected_batch_size": 32, "gradient_scales": {}},
    "federation": {"rounds": 2, "min_nodes": 2, "schedule": "rounds"},
}


@pytest.fixture(scope="session")
def write_run_config(tiny_bert_dir: Path, synthetic_dir: Path) -> Callable[..., Path]:
    """Writes TINY_RUN on the tiny BERT and synthetic data, with ``sections`` merged in (a key
    set to None is left out), as a run TOML at ``path``."""

    def write(path: Path, **sections: dict[str, object]) -> Path:
        merged: dict[str, dict[str, object]] = {
            "data": {"path": str(synthetic_dir)},
            "model": {"backbone": str(tiny_bert_dir)},
        }
        for name, values in [*TINY_RUN.items(), *sections.items()]:
            merged.setdefault(name, {}).update(values)
        lines = []
        for name, values in merged.items():
            lines.append(f"[{name}]")
            lines += [f"{key} = {json.dumps(v)}" for key, v in values.items() if v is not None]
        path.write_text("\n".join(lines) + "\n", encoding="utf-8")
        return path

    return write


@pytest.fixture(scope="session")
def finished_run(tmp_path_factory: pytest.TempPathFactory, write_run_config) -> Path:
    """One finished tiny run (FFA, item tower with private item factors) for the tests that
    read a run's results: recommendations, the service, cold start."""
    from common.config import load_config
    from server.simulation.simulation import prepare_run, simulate

    root = tmp_path_factory.mktemp("finished")
    config = write_run_config(
        root / "run.toml",
        model={"max_length": 32, "private_factors": 8},
        train={"batch_size": 16, "local_steps": 2, "eval_max_cases": 5},
        federation={"rounds": 2, "min_nodes": 2, "strategy": "ffa"},
        baselines={"sasrec_max_epochs": 4, "sasrec_eval_every": 2},  # the in-house models
    )
    return simulate(prepare_run(load_config(config), root / "runs", "tiny"))


@pytest.fixture(scope="session")
def interrupted_run(tmp_path_factory: pytest.TempPathFactory, write_run_config) -> Path:
    """A two-round DP run whose server crashed saving round 2's checkpoint, after the
    platforms trained round 2 (round 1 checkpointed): the resume tests work on copies."""
    from common.config import load_config
    from server.simulation.simulation import prepare_run
    from tests.crash import crash_before_checkpoint

    root = tmp_path_factory.mktemp("interrupted")
    config = write_run_config(root / "run.toml", train={"eval_max_cases": 5})
    record = prepare_run(load_config(config), root / "runs", "cut")
    with pytest.MonkeyPatch.context() as patch:
        crash_before_checkpoint(record, 2, patch)
    return record.root
