"""The main job's closing table: in-house alone, the federated model and their blend."""

from __future__ import annotations

import re
from pathlib import Path

from server.simulation.joining import SIDE_BY_SIDE_FILE, side_by_side


def test_the_side_by_side_table_scores_three_models_per_platform(finished_run: Path) -> None:
    text = side_by_side(finished_run, "valid")
    assert (finished_run / SIDE_BY_SIDE_FILE).read_text() == text + "\n"
    rows = [line for line in text.splitlines() if re.match(r"\| p\d ", line)]
    assert [row.split("|")[1].strip() for row in rows] == ["p0", "p1"]
    for row in rows:
        own, fused, mixed = (float(v) for v in re.findall(r"\| (\d\.\d{4})", row)[:3])
        assert min(own, fused, mixed) >= 0 and max(own, fused, mixed) <= 1
        assert re.search(r"\((bpr|sasrec)_local\)", row) and re.search(r"w = \d\.\d\d", row)
    assert "**mean**" in text and "on the valid split" in text
