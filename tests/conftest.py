"""Shared fixtures: a tiny random BERT folder and a small synthetic federation."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from common.tiny_model import write_tiny_model

    return write_tiny_model(tmp_path_factory.mktemp("tiny-bert"), "bert")


@pytest.fixture(scope="session")
def synthetic_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from common.platform_data import write_dataset
    from common.synthetic import SyntheticConfig, generate

    out = tmp_path_factory.mktemp("synthetic") / "data"
    return write_dataset(out, generate(SyntheticConfig(platforms=2, users=12, items=30, seed=3)))
