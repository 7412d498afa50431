"""Integration: Flower's Simulation Engine (Ray actors) runs FedFuse end to end, and resumes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from transformers import AutoModel

from client.ledger import LEDGER_FILE
from common.config import RUN_CONFIG_ENV, load_config
from server import server_app
from server.run_record import RunRecord
from server.simulation import prepare_run, simulate


@pytest.fixture
def config_file(tmp_path: Path, write_run_config) -> Path:
    return write_run_config(
        tmp_path / "run.toml", train={"eval_max_cases": 5}, dp={"epsilon_budget": 8.0}
    )


def _lora(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}


@pytest.mark.parametrize("strategy", ["fedavg", "ffa", "fedsa"])
def test_two_rounds_of_each_strategy(
    tmp_path: Path, config_file: Path, tiny_bert_dir: Path, strategy: str
) -> None:
    config = load_config(config_file, [f"federation.strategy='{strategy}'"])
    run = simulate(prepare_run(config, tmp_path / "runs", strategy))
    assert run == tmp_path / "runs" / strategy and run.is_dir()
    assert not list((tmp_path / "runs").glob("*.incomplete"))
    record = RunRecord(run)
    assert record.last_round() == 2
    events = record.events()
    for kind in ("train", "evaluate"):
        seen = {
            (e["platform"], e["round"])
            for e in events
            if e["event"] == kind and e["status"] == "ok"
        }
        assert seen == {(p, r) for p in ("p0", "p1") for r in (1, 2)}
    # each round's checkpoint loads with peft on the bare backbone
    first = _lora(
        PeftModel.from_pretrained(
            AutoModel.from_pretrained(tiny_bert_dir), run / "adapters" / "round_001"
        )
    )
    second = _lora(
        PeftModel.from_pretrained(
            AutoModel.from_pretrained(tiny_bert_dir), run / "adapters" / "round_002"
        )
    )
    a_changed = any(not torch.equal(first[n], second[n]) for n in first if "lora_A" in n)
    b_changed = any(not torch.equal(first[n], second[n]) for n in first if "lora_B" in n)
    assert a_changed == (strategy != "ffa")  # FFA-LoRA keeps A frozen
    assert b_changed == (strategy != "fedsa")  # FedSA keeps B on the platforms
    for platform in ("p0", "p1"):
        ledger = json.loads((run / "platform_state" / platform / LEDGER_FILE).read_text())
        assert [e["server_round"] for e in ledger["entries"]] == [1, 2]
        assert ledger["entries"][-1]["epsilon_prv"] <= 4.0
    assert (run / "summary.md").is_file() and (run / "ndcg_per_round.png").stat().st_size > 1000
    assert RUN_CONFIG_ENV not in os.environ


def test_an_interrupted_run_resumes_from_its_last_checkpoint(
    tmp_path: Path, config_file: Path, monkeypatch
) -> None:
    record = prepare_run(load_config(config_file), tmp_path / "runs", "resumed")
    real = server_app.save_adapter

    def crash_at_round_two(scorer, out):
        if out.name == "round_002":
            raise RuntimeError("simulated crash")
        return real(scorer, out)

    monkeypatch.setattr(server_app, "save_adapter", crash_at_round_two)
    with pytest.raises(RuntimeError, match="simulated crash"):
        simulate(record)
    assert record.last_round() == 1 and record.root.name == "resumed.incomplete"

    monkeypatch.setattr(server_app, "save_adapter", real)
    run = simulate(RunRecord(record.root))
    assert run.name == "resumed" and RunRecord(run).last_round() == 2
    rounds = sorted({e["round"] for e in RunRecord(run).events() if e["event"] == "train"})
    assert rounds == [1, 2]
    ledger = json.loads((run / "platform_state" / "p0" / LEDGER_FILE).read_text())
    # the interrupted round really trained: its privacy cost stays on the ledger
    assert [e["server_round"] for e in ledger["entries"]] == [1, 2, 2]
    assert np.isfinite(ledger["entries"][-1]["epsilon_prv"])
