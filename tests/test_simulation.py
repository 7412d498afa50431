"""Integration: Flower's Simulation Engine (Ray actors) runs FedFuse end to end, and resumes."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from peft import PeftModel
from safetensors.torch import load_file
from transformers import AutoModel

from client.ledger import LEDGER_FILE
from common.config import RUN_CONFIG_ENV, RunConfig, load_config
from common.platform_data import federation_platforms, read_platform
from common.task import build_task, training_units
from server.cli import main
from server.federation.run_record import RunRecord
from server.federation.server_optimizer import MOMENTS_FILE
from server.federation.strategy import FedFuseStrategy
from server.simulation.simulation import prepare_run, simulate


@pytest.fixture
def config_file(tmp_path: Path, write_run_config) -> Path:
    return write_run_config(
        tmp_path / "run.toml", train={"eval_max_cases": 5}, dp={"epsilon_budget": 8.0}
    )


def _lora(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {n: p.detach() for n, p in model.named_parameters() if "lora_" in n}


def _train_examples(config: RunConfig) -> dict[str, int]:
    """Each platform's number of training units (its liked train examples under the ranking
    objective), counted here from its data folder."""
    return {
        name: len(
            training_units(
                build_task(read_platform(folder, name), config.task).train, config.objective
            )
        )
        for name, folder in federation_platforms(config.data)
    }


@pytest.mark.parametrize("strategy", ["fedavg", "ffa", "fedsa"])
@pytest.mark.ray
def test_two_rounds_of_each_strategy(
    tmp_path: Path, config_file: Path, tiny_bert_dir: Path, strategy: str, monkeypatch
) -> None:
    config = load_config(config_file, [f"federation.strategy='{strategy}'"])
    aggregations = []  # what the ServerApp (in this process) received and produced per round
    real_aggregate = FedFuseStrategy.aggregate_train

    def recording(self, server_round, replies):
        replies = list(replies)
        result = real_aggregate(self, server_round, replies)
        aggregations.append((replies, result[0]))
        return result

    monkeypatch.setattr(FedFuseStrategy, "aggregate_train", recording)
    run = simulate(prepare_run(config, tmp_path / "runs", strategy))
    # the exact rule: Σ n_k x_k / Σ n_k per tensor, with n_k counted independently
    examples = _train_examples(config)
    assert len(aggregations) == 2 and len(set(examples.values())) > 1  # unequal weights
    for server_round, (replies, aggregate) in enumerate(aggregations, start=1):
        weights = [examples[str(r.content["platform"]["name"])] for r in replies]
        assert sorted(weights) == sorted(examples.values())
        checkpoint = run / "adapters" / f"round_{server_round:03d}"
        saved = load_file(checkpoint / "adapter_model.safetensors")
        for name, array in aggregate.items():
            uploads = [r.content["arrays"][name].numpy() for r in replies]
            expected = sum(w * u for w, u in zip(weights, uploads, strict=True)) / sum(weights)
            np.testing.assert_allclose(array.numpy(), expected, rtol=1e-6, atol=1e-7)
            if ".lora_" in name:  # the checkpoint holds exactly this round's aggregate
                peft_name = name.removeprefix("encoder.").replace(".default", "")
                np.testing.assert_allclose(saved[peft_name].numpy(), expected, rtol=1e-6, atol=1e-7)
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
        assert [e["server_round"] for e in ledger["entries"]] == [0, 1, 2]  # 0: the prior
        assert ledger["entries"][-1]["epsilon_prv"] <= 4.0
    assert (run / "summary.md").is_file() and (run / "ndcg_per_round.png").stat().st_size > 1000
    assert RUN_CONFIG_ENV not in os.environ


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        ("model.backbone={empty}", "is not a local Hugging Face model folder (no config.json)"),
        ("data.path={empty}/nowhere", "nowhere"),
        ('dp.gradient_scales={{"head.mixx." = 2.0}}', "'head.mixx.' names no trainable tensor"),
    ],
)
def test_a_run_that_cannot_start_fails_before_ray_and_leaves_nothing(
    tmp_path: Path,
    config_file: Path,
    capsys: pytest.CaptureFixture[str],
    setting: str,
    message: str,
) -> None:
    """Such errors used to surface after ~30 s of Ray start-up, leaving NAME.incomplete/."""

    empty = tmp_path / "empty"
    empty.mkdir()
    runs = tmp_path / "runs"
    override = setting.format(empty=empty)
    args = ["simulate", "--config", str(config_file), "--set", override, "--runs", str(runs)]
    assert main(args) == 2
    error = capsys.readouterr().err.strip().splitlines()
    assert len(error) == 1 and error[0].startswith("fedfuse: error: ") and message in error[0]
    assert not runs.exists()


@pytest.mark.parametrize("command", ["simulate", "compare"])
def test_one_actor_gets_every_core_by_default(command: str) -> None:
    """On 2 cores one actor with both threads beat two one-core actors (README, Scaling)."""
    from server.cli import build_parser

    extra = ["--out", "x"] if command == "compare" else []
    args = build_parser().parse_args([command, *extra])
    assert args.cpus_per_client == float(os.cpu_count() or 1)
    args = build_parser().parse_args([command, *extra, "--cpus-per-client", "0.5"])
    assert args.cpus_per_client == 0.5


def test_a_configured_state_dir_is_honoured(tmp_path: Path, config_file: Path) -> None:
    """`--set dp.state_dir=…` was silently replaced by the run folder's platform_state."""
    state = tmp_path / "ledgers"
    config = load_config(config_file, [f"dp.state_dir={state}"])
    record = prepare_run(config, tmp_path / "runs", "kept")
    assert load_config(record.root / "config.json").dp.state_dir == str(state.resolve())
    default = prepare_run(load_config(config_file), tmp_path / "runs", "inside")
    assert load_config(default.root / "config.json").dp.state_dir == str(
        (default.root / "platform_state").resolve()
    )


@pytest.mark.ray
def test_a_lockstep_run_charges_only_the_steps_taken_and_audits_clean(
    tmp_path: Path, write_run_config, capsys: pytest.CaptureFixture[str]
) -> None:
    """Lockstep, DP: 2 planned steps over 3 rounds (rounds 2 and 3), every platform's noised
    gradient averaged by the server's AdamW; round 1 uploads nothing and charges nothing, and
    `fedfuse audit` recomputes every ε and raises no flag."""
    config = write_run_config(
        tmp_path / "run.toml",
        train={"local_steps": 2, "eval_max_cases": 5, "adapter_every": 2},
        federation={"rounds": 3, "min_nodes": 2, "schedule": "lockstep"},
    )
    run = simulate(prepare_run(load_config(config), tmp_path / "runs", "lockstep"))
    assert RunRecord(run).last_round() == 3
    for platform in ("p0", "p1"):
        ledger = json.loads((run / "platform_state" / platform / LEDGER_FILE).read_text())
        assert [(e["server_round"], e["steps"]) for e in ledger["entries"][1:]] == [(2, 1), (3, 1)]
    uploads = [
        json.loads(line)
        for line in (run / "wire_log.jsonl").read_text().splitlines()
        if '"received"' in line and '"train"' in line
    ]
    assert sorted((r["round"], bool(r["tensors"])) for r in uploads) == [
        (1, False),
        (1, False),
        (2, True),
        (2, True),
        (3, True),
        (3, True),
    ]
    assert (run / "adapters" / "round_003" / MOMENTS_FILE).is_file()
    assert main(["audit", str(run)]) == 0
    assert "flags: 0 (audit clean)" in capsys.readouterr().out
