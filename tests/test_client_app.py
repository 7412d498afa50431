"""The Flower ClientApp, called with hand-built messages (no server): what goes out, errors."""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, Metadata, RecordDict
from safetensors.numpy import load_file as load_numpy

import common.sharing as sharing
from client import client_app
from client.client_app import BUDGET_EXHAUSTED, INVALID_INPUT, ROUND_ALREADY_CHARGED, app
from client.ledger import LEDGER_FILE
from client.platform_client import LastReply
from common.adapters import trainable_arrays
from common.backbone import load_backbone
from common.config import load_config
from common.model import build_scorer
from common.sharing import private_names, shared_names


@pytest.fixture
def run_config(tmp_path: Path, write_run_config) -> dict[str, object]:
    config = write_run_config(
        tmp_path / "run.toml",
        model={"max_length": 40},
        dp={"target_epsilon": 3.0, "state_dir": str(tmp_path / "state")},
        federation={"rounds": 3},
    )
    client_app._clients.clear()
    return {"config-file": str(config)}


def _context(run_config: dict[str, object], node_config: dict[str, object]) -> Context:
    return Context(
        run_id=1, node_id=7, node_config=node_config, state=RecordDict(), run_config=run_config
    )


def _message(kind: str, arrays: dict[str, np.ndarray], config: dict[str, object]) -> Message:
    metadata = Metadata(
        run_id=1,
        message_id=f"m-{kind}",
        src_node_id=0,
        dst_node_id=7,
        reply_to_message_id="",
        group_id="1",
        created_at=time.time(),
        ttl=3600.0,
        message_type=kind,
    )
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in arrays.items()}),
            "config": ConfigRecord(config),
        }
    )
    return Message(content=content, metadata=metadata)


def _initial_arrays(run_config: dict[str, object]) -> dict[str, np.ndarray]:
    """What the server sends in round 1: the seeded tensors its strategy shares."""
    config = load_config(run_config["config-file"])
    backbone, _ = load_backbone(config.model.backbone)
    arrays = trainable_arrays(build_scorer(backbone, config.model, config.lora))
    return {n: arrays[n] for n in shared_names(arrays, config.federation.strategy)}


def test_train_reply_holds_only_adapters_and_scalar_metrics(run_config) -> None:
    context = _context(run_config, {"partition-id": 0, "num-partitions": 2})
    initial = _initial_arrays(run_config)
    reply = app(_message("train", initial, {"server-round": 1}), context)
    assert not reply.has_error()
    assert set(reply.content.keys()) == {"arrays", "metrics", "platform"}
    assert dict(reply.content["platform"]) == {"name": "p0"}  # an identifier, no data
    arrays = {k: a.numpy() for k, a in reply.content["arrays"].items()}
    assert list(arrays) == list(initial)
    assert all("lora_" in name or name.startswith("head.") for name in arrays)
    assert any(not np.array_equal(arrays[n], initial[n]) for n in arrays)
    metrics = dict(reply.content["metrics"])
    assert all(isinstance(v, int | float) for v in metrics.values())
    assert metrics["num-examples"] > 0 and metrics["local-steps"] == 2
    assert "train-loss" not in metrics  # computed from private data outside the DP mechanism
    assert 0 < metrics["epsilon"] < 3.0 and metrics["epsilon-rdp"] >= metrics["epsilon"]
    assert metrics["epsilon-budget-left"] == pytest.approx(3.0 - metrics["epsilon"])

    second = app(_message("train", arrays, {"server-round": 2}), context)
    assert dict(second.content["metrics"])["epsilon"] > metrics["epsilon"]
    ledger = json.loads(
        (Path(load_config(run_config["config-file"]).dp.state_dir) / "p0" / LEDGER_FILE).read_text()
    )
    assert [e["server_round"] for e in ledger["entries"]] == [0, 1, 2]  # 0: the prior


def test_backbone_is_loaded_once_per_process(run_config, monkeypatch) -> None:
    calls = []
    real = sharing.load_backbone
    monkeypatch.setattr(sharing, "load_backbone", lambda b: calls.append(b) or real(b))
    sharing._built.cache_clear()  # a fresh process: nothing loaded yet
    initial = _initial_arrays(run_config)
    for node, server_round in [(0, 1), (1, 1), (0, 2)]:
        context = _context(run_config, {"partition-id": node, "num-partitions": 2})
        assert not app(
            _message("train", initial, {"server-round": server_round}), context
        ).has_error()
    assert len(calls) == 1


def test_exhausted_budget_gives_an_error_reply_and_no_training(run_config) -> None:
    context = _context(run_config, {"partition-id": 0, "num-partitions": 2})
    arrays = _initial_arrays(run_config)
    for server_round in (1, 2, 3):  # the planned run fits the budget exactly
        reply = app(_message("train", arrays, {"server-round": server_round}), context)
        assert not reply.has_error()
    reply = app(_message("train", arrays, {"server-round": 4}), context)
    assert reply.has_error() and reply.error.code == BUDGET_EXHAUSTED
    assert "budget exhausted" in reply.error.reason
    ledger_dir = Path(load_config(run_config["config-file"]).dp.state_dir) / "p0"
    # the prior's release and the three rounds; nothing for round 4
    assert len(json.loads((ledger_dir / LEDGER_FILE).read_text())["entries"]) == 4


def test_a_replayed_round_is_answered_again_never_retrained(run_config, monkeypatch) -> None:
    """After a SuperLink restart a platform trained and charged round 3 twice (issue 11): a
    round whose answer was stored is answered again; one whose answer was lost unsent is a
    new, charged attempt; an older round is refused."""
    context = _context(run_config, {"partition-id": 0, "num-partitions": 2})
    arrays = _initial_arrays(run_config)
    first = app(_message("train", arrays, {"server-round": 1}), context)
    client_app._clients.clear()  # the replay reaches a restarted node process
    trained = []
    monkeypatch.setattr(client_app.PlatformClient, "_load", lambda *args: trained.append(args))
    again = app(_message("train", arrays, {"server-round": 1}), context)
    assert not again.has_error() and not trained
    for name, array in first.content["arrays"].items():
        np.testing.assert_array_equal(again.content["arrays"][name].numpy(), array.numpy())
    assert dict(again.content["metrics"])["replayed"] == 1
    state = Path(load_config(run_config["config-file"]).dp.state_dir) / "p0"
    entries = json.loads((state / LEDGER_FILE).read_text())["entries"]
    assert [e["server_round"] for e in entries] == [0, 1]

    # charged but no answer kept (the node died, or its disk filled, before storing it: so
    # nothing was sent): trained again and charged again, as a second attempt with new noise
    (state / LastReply.FILE).unlink()
    retried = app(_message("train", arrays, {"server-round": 1}), context)
    assert not retried.has_error() and len(trained) == 1
    assert "replayed" not in dict(retried.content["metrics"])
    entries = json.loads((state / LEDGER_FILE).read_text())["entries"]
    attempts = [(e["server_round"], e.get("attempt")) for e in entries]
    assert attempts == [(0, None), (1, None), (1, 2)]
    assert entries[2]["epsilon_prv"] > entries[1]["epsilon_prv"]  # the retry costs its own ε

    # an older round than the latest charged one is never trained again
    app(_message("train", arrays, {"server-round": 2}), context)
    (state / LastReply.FILE).unlink()
    refused = app(_message("train", arrays, {"server-round": 1}), context)
    assert refused.has_error() and refused.error.code == ROUND_ALREADY_CHARGED
    assert "already spent round 1" in refused.error.reason and len(trained) == 2
    entries = json.loads((state / LEDGER_FILE).read_text())["entries"]
    assert [e["server_round"] for e in entries] == [0, 1, 1, 2]


def test_bad_data_folder_gives_an_error_reply_not_a_crash(run_config, tmp_path: Path) -> None:
    context = _context(run_config, {"platform": "shop", "data-dir": str(tmp_path / "missing")})
    reply = app(_message("train", _initial_arrays(run_config), {"server-round": 1}), context)
    assert reply.has_error() and reply.error.code == INVALID_INPUT
    assert "missing" in reply.error.reason and "does not exist" in reply.error.reason


def test_node_config_sets_the_platform_and_its_dp_policy(
    run_config, synthetic_dir: Path, tmp_path: Path
) -> None:
    node = {
        "platform": "shop",
        "data-dir": str(synthetic_dir / "p1"),
        "state-dir": str(tmp_path / "shop-state"),
        "dp.target_epsilon": 1.5,
    }
    reply = app(
        _message("train", _initial_arrays(run_config), {"server-round": 1}),
        _context(run_config, node),
    )
    assert not reply.has_error()
    ledger = json.loads((tmp_path / "shop-state" / LEDGER_FILE).read_text())
    assert ledger["header"]["platform"] == "shop" and ledger["header"]["epsilon_budget"] == 1.5


def test_evaluate_reply_has_the_protocol_metrics(run_config) -> None:
    run_config = run_config | {"train.eval_max_cases": 0}  # every case: full metrics too
    context = _context(run_config, {"partition-id": 1, "num-partitions": 2})
    reply = app(_message("evaluate", _initial_arrays(run_config), {"split": "test"}), context)
    metrics = dict(reply.content["metrics"])
    assert set(metrics) == {
        *("num-examples", "hr@10", "ndcg@10", "mrr", "auc", "logloss"),
        *("full-ndcg@10", "full-recall@20"),  # every case scored: the whole catalogue too
        "prior-ndcg@10",  # the platform's DP popularity prior alone, on the same users
    }
    assert metrics["num-examples"] > 0 and 0 <= metrics["ndcg@10"] <= metrics["hr@10"] <= 1


@pytest.mark.parametrize("strategy", ["ffa", "fedsa"])
def test_strategies_send_only_their_shared_tensors(run_config, strategy: str) -> None:
    run_config = run_config | {"federation.strategy": strategy}
    everything = _initial_arrays(run_config)
    sent = {n: everything[n] for n in shared_names(everything, strategy)}
    context = _context(run_config, {"partition-id": 0, "num-partitions": 2})
    reply = app(_message("train", sent, {"server-round": 1}), context)
    back = {k: a.numpy() for k, a in reply.content["arrays"].items()}
    assert list(back) == list(sent)
    lora_a = [n for n in everything if ".lora_A." in n]
    if strategy == "ffa":  # B and head only; A frozen at the shared seeded init
        assert not any(n in back for n in lora_a) and "head.user_down.weight" in back
        client = client_app._clients[next(iter(client_app._clients))]
        for name, param in client.scorer.named_parameters():
            if name in lora_a:
                np.testing.assert_array_equal(param.detach().numpy(), everything[name])
    else:  # A only; B and head stay in the platform's state folder
        assert set(back) == set(lora_a)
        state = Path(load_config(run_config["config-file"]).dp.state_dir) / "p0"
        assert (state / "private_adapter.safetensors").is_file()
        private = private_names(everything, strategy)
        assert private and not any(n in lora_a for n in private)


def test_a_platform_built_after_another_trained_starts_from_the_seeded_private_part(
    run_config,
) -> None:
    """One process serves several platforms (a Ray actor, compare's baselines) with one shared
    scorer: the second platform's private part must start from the seeded values, not from
    the first platform's trained ones the scorer still holds."""
    run_config = run_config | {"federation.strategy": "fedsa"}
    config = load_config(run_config["config-file"])
    backbone, _ = load_backbone(config.model.backbone)
    seeded = trainable_arrays(build_scorer(backbone, config.model, config.lora))
    private = private_names(seeded, "fedsa")
    sent = {n: seeded[n] for n in shared_names(seeded, "fedsa")}
    first = _context(run_config, {"partition-id": 0, "num-partitions": 2})
    app(_message("train", sent, {"server-round": 1}), first)
    trained = trainable_arrays(client_app.platform_client(first).scorer, private)
    assert any(not np.array_equal(trained[n], seeded[n]) for n in private)
    second = client_app.platform_client(_context(run_config, {"partition-id": 1}))
    assert set(second.private.initial) == set(private)
    for name in private:
        np.testing.assert_array_equal(second.private.initial[name], seeded[name])


def test_under_lockstep_a_platform_steps_and_is_charged_only_in_its_due_rounds(
    tmp_path: Path, write_run_config
) -> None:
    """3 planned steps over 5 rounds: steps in rounds 2, 4 and 5 (⌊3r/5⌋ grows), one DP step
    each, the noised gradients sent; rounds 1 and 3 send nothing and charge nothing, and the
    run ends within the target ε the noise was calibrated for (the prior included)."""
    config_file = write_run_config(
        tmp_path / "run.toml",
        model={"max_length": 40, "private_factors": 4},
        train={"local_steps": 3},
        dp={"target_epsilon": 3.0, "state_dir": str(tmp_path / "state")},
        federation={"rounds": 5, "schedule": "lockstep"},
    )
    client_app._clients.clear()
    run_config = {"config-file": str(config_file)}
    context = _context(run_config, {"partition-id": 0, "num-partitions": 2})
    initial = _initial_arrays(run_config)
    stepped = []
    for server_round in range(1, 6):
        reply = app(_message("train", initial, {"server-round": server_round}), context)
        assert not reply.has_error()
        metrics = dict(reply.content["metrics"])
        gradients = {k: a.numpy() for k, a in reply.content["arrays"].items()}
        if metrics["local-steps"]:
            stepped.append(server_round)
            assert set(gradients) == set(initial)  # the shared tensors' gradients, no values
            assert not any(np.allclose(gradients[n], initial[n]) for n in gradients)
        else:
            assert gradients == {} and "noise-multiplier" not in metrics
    assert stepped == [2, 4, 5]
    state = Path(load_config(config_file).dp.state_dir) / "p0"
    entries = json.loads((state / LEDGER_FILE).read_text())["entries"]
    assert [e["server_round"] for e in entries] == [0, 2, 4, 5]  # 0: the prior
    assert [e["steps"] for e in entries[1:]] == [1, 1, 1]
    assert 2.9 < entries[-1]["epsilon_prv"] <= 3.0
    private = load_numpy(state / "private_adapter.safetensors")
    assert any(key.startswith("moment::head.mix.") for key in private)
    assert not any(key.startswith("moment::") and "lora_" in key for key in private)
