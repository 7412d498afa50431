"""The frozen configurations whose test scores docs/results.md reports stay loadable: a setting
removed or renamed in the code must not orphan a published choice (``compare --frozen`` would
refuse it, and the reported numbers could no longer be reproduced)."""

from __future__ import annotations

from pathlib import Path

import pytest

from server.simulation.frozen import load_frozen, sidecar_path

FROZEN = sorted(
    p
    for p in (Path(__file__).parent.parent / "simulations" / "frozen").glob("*/*.json")
    if not p.name.endswith(".tested.json")
)


def test_results_name_committed_frozen_files() -> None:
    assert FROZEN, "simulations/frozen/ holds no frozen configuration"


@pytest.mark.parametrize("path", FROZEN, ids=[f"{p.parent.name}/{p.name}" for p in FROZEN])
def test_a_committed_frozen_file_loads_and_keeps_its_hash(path: Path) -> None:
    frozen = load_frozen(path)
    assert path.stem == f"{frozen.method}@{frozen.document['level']}"
    dumped = frozen.config.model_dump(mode="json")
    for section, values in frozen.document["config"].items():
        # every recorded setting still exists with the recorded value (new settings may be added)
        assert {k: dumped[section][k] for k in values} == values, section
    if sidecar_path(path).exists():  # a test scoring was recorded for exactly this hash
        assert frozen.sha256 in sidecar_path(path).read_text(encoding="utf-8")
