"""A server that crashes mid-run, for the tests of resuming."""

from __future__ import annotations

import pytest

from server.federation import server_app
from server.federation.run_record import RunRecord
from server.simulation.simulation import simulate


def crash_before_checkpoint(
    record: RunRecord, server_round: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Simulate ``record``'s run until the server crashes saving round ``server_round``'s
    checkpoint (after the platforms trained it), then undo the crash for the resume."""
    real = server_app.save_adapter

    def crash(scorer, out, extra=None):  # type: ignore[no-untyped-def]
        if out.name == f"round_{server_round:03d}":
            raise RuntimeError("simulated crash")
        return real(scorer, out, extra)

    monkeypatch.setattr(server_app, "save_adapter", crash)
    with pytest.raises(RuntimeError, match="simulated crash"):
        simulate(record)
    monkeypatch.setattr(server_app, "save_adapter", real)
