"""``fedfuse compare``: cells, baselines, the report and its stated targets."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from client.ledger import LEDGER_FILE, PrivacyLedger
from client.popularity_prior import positive_counts
from common.adapters import trainable_arrays
from common.config import load_config, with_settings
from common.errors import ConfigError
from common.evaluation import CountScorer, evaluate
from common.sharing import seeded_arrays, shared_scorer
from common.task import Example, PlatformTask, RankingCase
from server.cli import main
from server.simulation.baselines import (
    Scoring,
    evaluation_clients,
    platform_private,
    pooled_client,
    pooled_item,
    pooled_task,
    train_local,
)
from server.simulation.compare import Cell, parse_levels, variant
from server.simulation.comparison_report import combine_runs, report, target_statements
from server.simulation.methods import FEDERATED
from tests.test_console import console_warnings, shown

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture
def config_file(tmp_path: Path, write_run_config) -> Path:
    return write_run_config(
        tmp_path / "run.toml",
        train={"learning_rate": 5e-3, "eval_max_cases": 5},
        dp={"delta": 1e-4},  # < 1/N of the pooled centralized baseline
    )


def test_levels_name_their_methods() -> None:
    cells = parse_levels(["8", "1:local,ffa", "inf:centralized", "1:ffa"])
    assert cells[:6] == [Cell(m, 8.0) for m in ("popularity", "local", "centralized")] + [
        Cell(m, 8.0) for m in ("fedavg", "ffa", "fedsa")
    ]
    assert cells[6:] == [Cell("local", 1.0), Cell("ffa", 1.0), Cell("centralized", math.inf)]
    assert Cell("ffa", math.inf).key == "ffa@nonprivate" and Cell("ffa", 1.0).key == "ffa@eps1"
    for bad in ["x", "0", "-1:local", "8:local,fedprox", "8:ffa*0", "8:ffa*two", "8:fedprox*2"]:
        with pytest.raises(ConfigError, match="--epsilon"):
            parse_levels([bad])


def test_a_cell_named_with_runs_repeats_under_its_own_keys() -> None:
    cells = parse_levels(["8:popularity,ffa*3", "8:ffa*2,local*2"])
    assert cells == [Cell("popularity", 8.0), *(Cell("ffa", 8.0, k) for k in (1, 2, 3))] + [
        Cell("local", 8.0, 1),
        Cell("local", 8.0, 2),
    ]
    # run 1 keeps the single run's key, so a cached cell counts as a comparison's first run
    assert [c.key for c in cells[1:4]] == ["ffa@eps8", "ffa@eps8-run2", "ffa@eps8-run3"]


def test_popularity_ranks_by_positive_train_counts() -> None:
    train = [Example("u", (), item, 1) for item in ["b", "b", "b", "c", "c"]]
    train += [Example("u", (), "a", 0)] * 5  # negatives do not count
    task = PlatformTask("p", train=train)
    task.test = [Example("v", (), "b", 1), Example("v", (), "a", 0)]
    task.test_ranking = [RankingCase("v", (), "c", ("a", "b", "d"))]
    metrics = evaluate(CountScorer(positive_counts(task)), None, task, "test")  # type: ignore[arg-type]
    assert metrics["mrr"] == pytest.approx(1 / 2)  # c (2 likes) ranks behind b (3 likes)
    assert metrics["auc"] == pytest.approx(1.0)


def test_pooled_task_keeps_platforms_items_apart(config_file: Path, tmp_path: Path) -> None:
    clients = evaluation_clients(load_config(config_file), tmp_path / "state")
    task, item_text = pooled_task(clients)
    assert len(task.train) == sum(len(c.task.train) for c in clients)
    assert len(item_text) == sum(len(c.featurizer.item_text) for c in clients)
    first = clients[0].task.train[0]
    pooled = task.train[0]
    assert item_text[pooled.candidate] == clients[0].featurizer.item_text[first.candidate]
    assert [item_text[i] for i in pooled.history] == [
        clients[0].featurizer.item_text[i] for i in first.history
    ]


def test_centralized_model_scores_each_platform_as_it_scores_the_pooled_data(
    config_file: Path, tmp_path: Path
) -> None:
    """Its private item factors move from pooled rows to each platform's own rows (copied
    as they were, a platform scored its items with other items' factors)."""
    config = with_settings(
        load_config(config_file),
        model={"private_factors": 4, "private_item_slots": 32},  # 30 items per platform
        prior={"enabled": False},  # a prior standardised per catalogue differs when pooled
    )
    clients = evaluation_clients(config, tmp_path / "state")
    pooled = pooled_client(config, clients, tmp_path / "state")
    assert pooled.config.model.private_item_slots == 60  # a row per pooled item
    generator = np.random.default_rng(0)
    private = {k: generator.normal(size=v.shape) for k, v in pooled.private.initial.items()}
    pooled.private.save({k: v.astype(np.float32) for k, v in private.items()})
    shared = trainable_arrays(pooled.scorer, pooled.shared)
    pooled._load(shared)
    examples = {c.identity.name: c.task.test[:20] for c in clients}
    expected = {
        c.identity.name: pooled.scorer.score_examples(
            pooled.featurizer,
            [
                Example(
                    e.user,
                    tuple(pooled_item(c.identity.name, i) for i in e.history),
                    pooled_item(c.identity.name, e.candidate),
                    e.label,
                )
                for e in examples[c.identity.name]
            ],
            16,
        )
        for c in clients
    }
    for client in clients:
        client.private.save(platform_private(pooled, client))
        client._load(shared)
        scores = client.scorer.score_examples(client.featurizer, examples[client.identity.name], 16)
        np.testing.assert_allclose(scores, expected[client.identity.name], rtol=1e-5, atol=1e-5)


def test_local_baseline_trains_each_platform_within_its_budget(
    config_file: Path, tmp_path: Path
) -> None:
    config = load_config(config_file)
    scorer, _ = shared_scorer(config.model, config.lora, "fedavg")
    initial = seeded_arrays(config.model, config.lora, "fedavg")
    metrics, epsilons = train_local(config, initial, tmp_path / "state", Scoring())
    assert sorted(metrics) == sorted(epsilons) == ["p0", "p1"]
    for platform, spent in epsilons.items():
        ledger = PrivacyLedger.load(tmp_path / "state" / platform / LEDGER_FILE)
        assert [e["server_round"] for e in ledger.entries] == [0, 1, 2]  # 0: the prior
        assert spent == pytest.approx(ledger.spent()) and spent <= config.dp.target_epsilon
    trained = {n: p.detach().numpy() for n, p in scorer.named_parameters() if p.requires_grad}
    assert any(not np.allclose(trained[n], initial[n]) for n in initial)
    for platform_metrics in metrics.values():
        values = [v for k, v in platform_metrics.items() if k != "cases"]
        assert np.isfinite(values).all()
        assert len(platform_metrics["cases"]["user"]) == platform_metrics["num-examples"]


def test_compare_writes_one_report_and_resumes_from_cached_cells(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "cmp"
    args = ["compare", "--config", str(config_file), "--out", str(out), "--test-cases", "6"]
    levels = ["--epsilon", "4:popularity,local,centralized,fedsa", "--epsilon", "inf:centralized"]
    with console_warnings() as caught:  # DP training in this process: Opacus', torch's
        assert main([*args, *levels]) == 0
    assert shown(caught) == []
    results = json.loads((out / "comparison.json").read_text())
    assert [(r["method"], r["target_epsilon"]) for r in results] == [
        ("popularity", 4.0),
        ("local", 4.0),
        ("centralized", 4.0),
        ("fedsa", 4.0),
        ("centralized", math.inf),
    ]
    for result in results:
        assert sorted(result["platforms"]) == ["p0", "p1"]
        for metrics in result["platforms"].values():
            assert metrics["num-examples"] == 6
    by_key = {(r["method"], r["target_epsilon"]): r for r in results}
    assert max(by_key["fedsa", 4.0]["epsilon"].values()) <= 4.0
    pooled = PrivacyLedger.load(out / "runs" / "centralized@eps4" / "centralized" / LEDGER_FILE)
    clients = evaluation_clients(load_config(config_file), tmp_path / "state")
    assert pooled.header["dataset_size"] == sum(c.num_examples for c in clients)
    # the pooled prior's one release, then local_steps × platforms per round
    assert [e["steps"] for e in pooled.entries] == [1, 2 * 2, 2 * 2]
    report = (out / "comparison.md").read_text()
    assert "## ε = 4" in report and "## non-private" in report
    assert "fedsa at ε = 4 ≥ local-only on every platform" in report
    assert (out / "ndcg_at_10.png").stat().st_size > 1000
    # the local baseline's progress is logged and the command shows it like its own lines
    assert "[fedfuse] p0: round 2/2, ε = " in capsys.readouterr().out

    assert main([*args, *levels]) == 0  # every cell cached: nothing retrains
    assert capsys.readouterr().out.count(": cached") == 5

    assert main([*args, "--set", "train.local_steps=3", *levels]) == 2
    assert "compares another configuration" in capsys.readouterr().err


def test_a_comparison_on_the_validation_split_never_scores_test(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--split valid`` (choosing a setting) scores every method on the validation users,
    says so in the report, and cannot be mixed with cells scored on test."""
    out = tmp_path / "cmp"
    args = ["compare", "--config", str(config_file), "--out", str(out), "--epsilon", "4:popularity"]
    assert main([*args, "--split", "valid"]) == 0
    [result] = json.loads((out / "comparison.json").read_text())
    assert result["split"] == "valid"
    for client in evaluation_clients(load_config(config_file), tmp_path / "state"):
        counts = CountScorer(positive_counts(client.task))
        expected = client.score(counts, "valid", 0)  # type: ignore[arg-type]
        assert result["platforms"][client.identity.name] == expected
        assert expected != client.score(counts, "test", 0)  # type: ignore[arg-type]
    assert "NDCG@10 on the valid split" in (out / "comparison.md").read_text()
    capsys.readouterr()
    other = [*args[:-1], "4:prior"]  # another cell, scored on test, into the same folder
    assert main(other) == 2
    assert "scored on valid; use a new --out" in capsys.readouterr().err
    assert not (out / "cells" / "prior@eps4.json").exists()  # refused before any training


def _result(method: str, epsilon: float, ndcg: dict[str, float]) -> dict[str, object]:
    return {
        "method": method,
        "target_epsilon": epsilon,
        "platforms": {p: {"ndcg@10": v} for p, v in ndcg.items()},
    }


def test_targets_are_stated_against_the_measured_numbers() -> None:
    results = [
        _result("popularity", 8.0, {"a": 0.20, "b": 0.25}),
        _result("local", 8.0, {"a": 0.10, "b": 0.20}),
        _result("ffa", 8.0, {"a": 0.15, "b": 0.19}),
        _result("fedavg", 8.0, {"a": 0.30, "b": 0.31}),
        _result("local", 1.0, {"a": 0.10, "b": 0.20}),
        _result("ffa", 1.0, {"a": 0.19, "b": 0.20}),
        _result("centralized", math.inf, {"a": 0.30, "b": 0.30}),
        _result("bpr_pooled", math.inf, {"a": 0.40, "b": 0.40}),
        _result("ffa", math.inf, {"a": 0.28, "b": 0.29}),
    ]
    lines = target_statements(results)
    assert (
        "- fedavg at ε = 8: mean 1.356 × popularity (0.3050 vs 0.2250; target ≥ 1.10×): **met**"
        in lines
    )
    assert (
        "- ffa at ε = 8: mean 0.756 × popularity (0.1700 vs 0.2250; target ≥ 1.10×): **missed**"
        in lines
    )
    assert "- ffa at ε = 8 ≥ popularity on every platform: **missed on a, b**" in lines
    assert "- fedavg at ε = 8 ≥ popularity on every platform: **met**" in lines
    assert "- ffa at ε = 8 ≥ local-only on every platform: **missed on b**" in lines
    # gains +0.05 and -0.01: mean +0.02, standard error 0.03
    assert (
        "- ffa at ε = 8: mean gain over local +0.0200 vs its standard error over the "
        "platforms 0.0300: **missed**" in lines
    )
    assert "- ffa at ε = 1 ≥ 0.95 × popularity on every platform: **missed on b**" in lines
    assert (
        "- ffa, no DP: 95.0% of the same model centralized (0.2850 vs 0.3000; "
        "target ≥ 90%): **met**" in lines
    )
    assert "- ffa, no DP: 71.2% of pooled BPR (0.2850 vs 0.4000; target ≥ 90%): **missed**" in lines


def _runs(method: str, values: list[dict[str, float]]) -> list[dict[str, object]]:
    """One record per run, as ``run_cell`` writes it (every metric equal to NDCG@10)."""
    return [
        {
            "method": method,
            "target_epsilon": 8.0,
            "run": k,
            "platforms": {
                p: dict.fromkeys(("hr@10", "ndcg@10", "mrr", "auc"), v) for p, v in ndcg.items()
            },
            "epsilon": dict.fromkeys(ndcg, 7.9),
            "wall_s": 10,
        }
        for k, ndcg in enumerate(values, start=1)
    ]


def test_repeated_cells_count_with_their_mean_and_its_standard_error() -> None:
    results = [
        *_runs("popularity", [{"a": 0.20, "b": 0.20}]),
        *_runs("ffa", [{"a": 0.30, "b": 0.20}, {"a": 0.34, "b": 0.22}]),
        *_runs("local", [{"a": 0.31, "b": 0.30}, {"a": 0.31, "b": 0.26}]),
    ]
    combined = {r["method"]: r for r in combine_runs(results)}
    ffa = combined["ffa"]
    assert ffa["runs"] == 2 and ffa["wall_s"] == 20 and "run" not in ffa
    assert ffa["platforms"]["a"]["ndcg@10"] == pytest.approx(0.32)
    assert ffa["ndcg_se"]["a"] == pytest.approx(0.02)  # stdev 0.0283 / √2
    assert "ndcg_se" not in combined["popularity"] and combined["popularity"]["runs"] == 1
    lines = target_statements(results)
    assert "- ffa at ε = 8 ≥ local-only on every platform: **missed on b**" in lines
    assert "  - gain per platform, 2 runs vs 2 runs:" in lines
    assert "    - a: +0.0100 ± 0.0200" in lines  # √(0.02² + 0²)
    assert "    - b: -0.0700 ± 0.0224" in lines  # √(0.01² + 0.02²)


def test_the_report_shows_each_cells_mean_and_every_run(tmp_path: Path) -> None:
    results = [
        *_runs("popularity", [{"a": 0.20, "b": 0.20}]),
        *_runs("ffa", [{"a": 0.30, "b": 0.20}, {"a": 0.34, "b": 0.22}]),
    ]
    text = report(results, tmp_path, "fedfuse compare")
    assert "| ffa (mean of 2 runs) | 0.3200 ± 0.0200 | 0.2100 ± 0.0100 | 0.2650 | 20 |" in text
    assert "| ffa run 2 | 0.3400 | 0.2200 | 0.2800 | 10 |" in text
    assert "popularity run 1" not in text  # a cell run once has no list of runs
    assert len(json.loads((tmp_path / "comparison.json").read_text())) == 3  # every run kept
    assert (tmp_path / "ndcg_at_10.png").stat().st_size > 1000


def test_an_ablation_without_item_factors_drops_their_share_of_the_clip_norm() -> None:
    """The default run scales the item factors' gradient; ``fedavg_shared`` has none, so its
    scale goes (``dp.gradient_scales`` would refuse it) and the other parts keep theirs; every
    strategy has the same ablations."""
    config = load_config(REPO / "simulations/ml100k_default.toml")
    assert "head.private_items." in config.dp.gradient_scales
    for name in FEDERATED:
        strategy, changes = variant(f"{name}_shared", config)
        assert strategy == name and changes["model"] == {"private_factors": 0}
        kept = changes["dp"]["gradient_scales"]
        assert kept == {k: v for k, v in config.dp.gradient_scales.items() if "private" not in k}
        assert kept and variant(name, config) == (name, {})
    assert variant("ffa_text", config)[1]["prior"] == {"enabled": False}


def test_blend_cells_reuse_their_partners_model_and_fit_the_weight_on_validation(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``inhouse`` is each platform's better own model; ``inhouse+local`` blends it with the
    very tensors the ``local`` cell trained (no second training, no second charge)."""
    out = tmp_path / "cmp"
    fast = ["--set", "baselines.sasrec_max_epochs=2", "--set", "baselines.sasrec_eval_every=1"]
    args = ["compare", "--config", str(config_file), "--out", str(out), *fast]
    assert main([*args, "--epsilon", "4:local,inhouse,inhouse+local"]) == 0
    results = {r["method"]: r for r in json.loads((out / "comparison.json").read_text())}
    for platform in ("p0", "p1"):
        chosen = results["inhouse"]["inhouse"][platform]
        assert chosen["model"] in ("bpr_local", "sasrec_local")
        fitted = results["inhouse+local"]["blend"][platform]
        assert 0.0 <= fitted["weight"] <= 1.0
        assert fitted["valid_ndcg@10"] >= max(  # the fit never loses to either part alone
            fitted["dp_alone_valid_ndcg@10"], fitted["inhouse_valid_ndcg@10"] - 1e-9
        )
        ledger = PrivacyLedger.load(out / "runs" / "local@eps4" / platform / LEDGER_FILE)
        assert [e["server_round"] for e in ledger.entries] == [0, 1, 2]  # trained once
        assert results["inhouse+local"]["epsilon"][platform] == pytest.approx(ledger.spent())
        assert math.isinf(results["inhouse"]["epsilon"][platform])
    report = (out / "comparison.md").read_text()
    assert "inhouse+local (ε = 4, 1 run) over inhouse (no DP, 1 run)" in report
    capsys.readouterr()
