"""``fedfuse tune`` and ``compare --frozen``: settings chosen on validation with equal effort,
frozen with a hash, scored on test once."""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest

from client.ledger import LEDGER_FILE, PrivacyLedger
from common.config import load_config
from common.errors import ConfigError
from server.cli import main
from server.simulation import bpr, compare, joining, sasrec, tuning
from server.simulation.frozen import UNFROZEN, WARNING, load_frozen, sidecar_path, with_inhouse
from server.simulation.joining import INHOUSE_MODELS
from server.simulation.tuning import read_grid


@pytest.fixture
def config_file(tmp_path: Path, write_run_config) -> Path:
    return write_run_config(tmp_path / "run.toml", train={"eval_max_cases": 5})


def _grid(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "grid.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _error(capsys: pytest.CaptureFixture[str]) -> str:
    """The CLI's stderr, which must be exactly one line."""
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ('[[fedprox]]\n"train.learning_rate" = 1e-3\n', r"grid\.toml: fedprox: unknown method"),
        ("fedavg = 3\n", r"grid\.toml: fedavg: expected a list of tables"),
        ("fedavg = []\n", r"grid\.toml: fedavg: no configurations"),
        ("[[fedavg]]\ntrain.learning_rate = 1e-3\n", r"fedavg\[1\]: key 'train': expected a"),
        ('[[fedavg]]\n"learning_rate" = 1e-3\n', r"fedavg\[1\]: key 'learning_rate'"),
        (
            '[[fedavg]]\n"train.learning_rate" = 1e-3\n[[fedavg]]\n"train.learnin_rate" = 1\n',
            r"grid\.toml: fedavg\[2\]: .*train\.learnin_rate: unknown key",
        ),
        ('[[fedavg]]\n"train.learning_rate" = -1\n', r"fedavg\[1\]: .*train\.learning_rate"),
        ('[[common]]\n"dp.target_epsilon" = 2\n', r"common\[1\]: key 'dp.target_epsilon'.*--eps"),
        ("[[fedavg]\n", r"grid\.toml: invalid TOML"),
    ],
)
def test_a_bad_grid_is_refused_naming_file_and_key(
    tmp_path: Path, config_file: Path, text: str, message: str
) -> None:
    with pytest.raises(ConfigError, match=message):
        read_grid(_grid(tmp_path, text), ["fedavg", "popularity"], config_file)


def test_a_bad_grid_ends_the_command_with_one_line(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    grid = _grid(tmp_path, '[[fedavg]]\n"train.nope" = 1\n')
    args = ["tune", "--config", str(config_file), "--grid", str(grid), "--out", str(tmp_path)]
    assert main([*args, "--methods", "fedavg"]) == 2
    error = _error(capsys)
    assert "grid.toml: fedavg[1]: " in error and "train.nope: unknown key" in error
    assert main([*args, "--methods", "fedavg,fedprox"]) == 2
    assert "--methods: unknown ['fedprox']" in _error(capsys)
    assert not (tmp_path / "frozen").exists()


def _fake_runs(monkeypatch: pytest.MonkeyPatch, ndcg: dict[tuple[str, float, int], float]):
    """Replace compare's run_cell with one returning ``ndcg[(method, learning rate, run)]`` on
    both platforms; records every call, and checks each is scored on validation."""
    calls: list[tuple[str, float, int, str]] = []

    def run_cell(cell, config, initial, out, scoring, cpus_per_client) -> dict[str, Any]:
        assert scoring.split == "valid"  # tune never scores test
        rate = config.train.learning_rate
        calls.append((cell.method, rate, cell.run, scoring.split))
        value = ndcg[cell.method, rate, cell.run]
        return {
            "method": cell.method,
            "target_epsilon": cell.epsilon,
            "run": cell.run,
            "split": scoring.split,
            "platforms": {p: {"ndcg@10": value, "hr@10": 2 * value} for p in ("p0", "p1")},
            "epsilon": {"p0": cell.epsilon, "p1": cell.epsilon},
            "wall_s": 0.0,
            "resumed": False,
        }

    monkeypatch.setattr(compare, "run_cell", run_cell)
    monkeypatch.setattr(tuning, "seeded_arrays", lambda *_: {})  # no model needed
    return calls


GRID = """
[[common]]
"train.learning_rate" = 1e-3
[[common]]
"train.learning_rate" = 3e-3
[[common]]
"train.learning_rate" = 1e-2

[[fedavg]]
"train.learning_rate" = 1e-3
"train.local_steps" = 3
[[fedavg]]
"train.learning_rate" = 3e-3
[[fedavg]]
"train.learning_rate" = 1e-2
"""
SCORES = {
    # fedavg: 3e-3 has the best mean; 1e-2 the best single run, but a worse mean
    ("fedavg", 1e-3, 1): 0.20,
    ("fedavg", 1e-3, 2): 0.22,
    ("fedavg", 3e-3, 1): 0.30,
    ("fedavg", 3e-3, 2): 0.32,
    ("fedavg", 1e-2, 1): 0.50,
    ("fedavg", 1e-2, 2): 0.00,
    # popularity ignores the learning rate: a tie, the first declared wins
    **{("popularity", rate, run): 0.25 for rate in (1e-3, 3e-3, 1e-2) for run in (1, 2)},
}


def _tune_args(config_file: Path, grid: Path, out: Path) -> list[str]:
    return [
        "tune",
        "--config",
        str(config_file),
        "--grid",
        str(grid),
        "--methods",
        "fedavg,popularity",
        "--epsilon",
        "4",
        "--runs",
        "2",
        "--out",
        str(out),
    ]


def test_the_winner_is_chosen_on_validation_by_its_mean_and_frozen(
    tmp_path: Path,
    config_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    calls = _fake_runs(monkeypatch, SCORES)
    out = tmp_path / "tune"
    before = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    assert main(_tune_args(config_file, _grid(tmp_path, GRID), out)) == 0
    printed = capsys.readouterr().out
    assert "budget fedavg: 3 configurations × 2 runs = 6 cells per level" in printed
    assert "budget popularity: 3 configurations × 2 runs = 6 cells per level" in printed
    assert len(calls) == 12 and {split for *_, split in calls} == {"valid"}

    fedavg = json.loads((out / "frozen" / "fedavg@eps4.json").read_text())
    assert (fedavg["method"], fedavg["level"], fedavg["epsilon"]) == ("fedavg", "eps4", 4.0)
    assert fedavg["grid_point"] == "fedavg[2]"
    assert fedavg["overrides"] == {"train.learning_rate": 3e-3}
    resolved = load_config(config_file, ["train.learning_rate=3e-3"]).model_dump(mode="json")
    assert fedavg["config"] == resolved
    assert fedavg["validation"]["split"] == "valid"
    assert fedavg["validation"]["mean"] == pytest.approx(0.31)
    assert [r["ndcg@10"] for r in fedavg["validation"]["runs"]] == pytest.approx([0.30, 0.32])
    assert fedavg["budget"] == {"configurations": 3, "runs": 2}
    assert before <= fedavg["frozen_at"] <= time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    canonical = json.dumps(
        {"method": "fedavg", "level": "eps4", "config": resolved},
        sort_keys=True,
        separators=(",", ":"),
        ensure_ascii=False,
    )
    assert fedavg["sha256"] == hashlib.sha256(canonical.encode()).hexdigest()

    # popularity ignores the level: tuned once, non-private, frozen at inf
    assert not (out / "frozen" / "popularity@eps4.json").exists()
    popularity = json.loads((out / "frozen" / "popularity@nonprivate.json").read_text())
    assert (popularity["level"], popularity["epsilon"]) == ("nonprivate", "inf")
    assert popularity["grid_point"] == "popularity[1]"  # a tie: the first declared
    assert popularity["config"]["train"]["learning_rate"] == 1e-3

    table = (out / "tuning.md").read_text()
    assert "Equal effort" in table and "validation split only" in table
    assert table.index("## ε = 4") < table.index("| fedavg |") < table.index("## non-private")
    assert table.index("## non-private") < table.index("| popularity |")
    assert "| fedavg | fedavg[2] | train.learning_rate=0.003 | 0.3100 | 0.3000, 0.3200 | " in table
    assert table.count("**winner**") == 2
    assert "| fedavg | fedavg[3] | train.learning_rate=0.01 | 0.2500 | 0.5000, 0.0000 |  |" in table

    calls.clear()  # a second tune resumes from the cached cells and keeps the frozen files
    assert main(_tune_args(config_file, _grid(tmp_path, GRID), out)) == 0
    assert calls == [] and capsys.readouterr().out.count(": cached") == 12
    assert json.loads((out / "frozen" / "fedavg@eps4.json").read_text()) == fedavg


def test_unequal_effort_is_refused_unless_allowed(
    tmp_path: Path,
    config_file: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    calls = _fake_runs(monkeypatch, SCORES)
    grid = _grid(tmp_path, GRID + '\n[[popularity]]\n"train.learning_rate" = 1e-3\n')
    args = _tune_args(config_file, grid, tmp_path / "tune")
    assert main(args) == 2
    error = _error(capsys)
    assert "unequal effort" in error and "fedavg 3, popularity 1" in error
    assert calls == [] and not (tmp_path / "tune" / "frozen").exists()

    assert main([*args, "--allow-unequal"]) == 0
    printed = capsys.readouterr().out
    assert "budget popularity: 1 configuration × 2 runs = 2 cells per level" in printed
    assert "Unequal effort (--allow-unequal)" in (tmp_path / "tune" / "tuning.md").read_text()
    assert len(calls) == 8


def _tune_popularity(tmp_path: Path, config_file: Path) -> Path:
    """A real (fast) tune of popularity on the tiny federation; returns its frozen file."""
    grid = _grid(tmp_path, '[[common]]\n"train.learning_rate" = 1e-3\n')
    args = ["tune", "--config", str(config_file), "--grid", str(grid), "--methods", "popularity"]
    assert main([*args, "--epsilon", "4", "--out", str(tmp_path / "tune")]) == 0
    return tmp_path / "tune" / "frozen" / "popularity@nonprivate.json"


def test_a_frozen_configuration_is_scored_on_test_once(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    frozen = _tune_popularity(tmp_path, config_file)
    document = json.loads(frozen.read_text())
    [cell] = (tmp_path / "tune" / "grid").glob("*/cells/*.json")
    assert json.loads(cell.read_text())["split"] == "valid"  # tune scored validation only
    first = tmp_path / "test1"
    args = ["compare", "--frozen", str(frozen)]
    assert main([*args, "--out", str(first)]) == 0
    assert WARNING not in capsys.readouterr().err
    [result] = json.loads((first / "comparison.json").read_text())
    assert (result["method"], result["split"]) == ("popularity", "test")
    assert result["frozen"]["sha256"] == document["sha256"] and not result["frozen"]["rescored"]
    report = (first / "comparison.md").read_text()
    assert "## Frozen configurations" in report and document["sha256"] in report
    assert document["frozen_at"] in report and UNFROZEN not in report
    [scoring] = json.loads(sidecar_path(frozen).read_text())["scorings"]
    assert scoring["sha256"] == document["sha256"] and scoring["split"] == "test"
    assert (
        scoring["out"] == str(first.resolve()) and scoring["finished_at"] >= scoring["started_at"]
    )

    assert main([*args, "--out", str(tmp_path / "test2")]) == 2
    assert "already scored on test" in _error(capsys)
    assert not (tmp_path / "test2" / "cells").exists()

    glob = [str(p) for p in sorted(frozen.parent.glob("*.json"))]  # frozen/*.json: sidecar too
    assert glob == [str(frozen), str(sidecar_path(frozen))]
    assert main(["compare", "--frozen", *glob, "--out", str(tmp_path / "test3"), "--rescore"]) == 0
    assert "Rescored with --rescore" in (tmp_path / "test3" / "comparison.md").read_text()
    [result] = json.loads((tmp_path / "test3" / "comparison.json").read_text())
    assert result["frozen"]["rescored"]
    scorings = json.loads(sidecar_path(frozen).read_text())["scorings"]
    assert [s["rescore"] for s in scorings] == [False, True]


def test_a_tampered_frozen_file_and_choosing_options_are_refused(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    frozen = _tune_popularity(tmp_path, config_file)
    capsys.readouterr()
    out = ["--out", str(tmp_path / "test")]
    assert main(["compare", "--frozen", str(frozen), "--epsilon", "8:popularity", *out]) == 2
    assert "--frozen: drop --epsilon" in _error(capsys)
    assert main(["compare", "--config", str(config_file), "--runs", "2", *out]) == 2
    assert "--runs, --rescore and --blend go with --frozen" in _error(capsys)

    document = json.loads(frozen.read_text())
    document["config"]["task"]["eval_negatives"] = 50
    frozen.write_text(json.dumps(document, indent=2))
    assert main(["compare", "--frozen", str(frozen), *out]) == 2
    assert "hash mismatch" in _error(capsys)
    assert not (tmp_path / "test" / "cells").exists() and not sidecar_path(frozen).exists()


def test_compare_on_test_without_frozen_warns_and_marks_the_report(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["compare", "--config", str(config_file), "--epsilon", "4:popularity"]
    assert main([*args, "--out", str(tmp_path / "test")]) == 0
    assert capsys.readouterr().err.count(WARNING) == 1 and "\n" not in WARNING
    assert f"**{UNFROZEN}**" in (tmp_path / "test" / "comparison.md").read_text()
    [result] = json.loads((tmp_path / "test" / "comparison.json").read_text())
    assert result["selection"] == UNFROZEN

    assert main([*args, "--out", str(tmp_path / "valid"), "--split", "valid"]) == 0
    assert WARNING not in capsys.readouterr().err  # choosing on validation: nothing to warn
    assert UNFROZEN not in (tmp_path / "valid" / "comparison.md").read_text()


def test_blends_are_derived_from_the_frozen_partners(
    tmp_path: Path,
    config_file: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """``--blend`` adds ``inhouse`` and ``inhouse+local`` with the frozen local's settings;
    the blend scores the very model the frozen cell trained (its ledger charged once)."""
    grid = _grid(
        tmp_path,
        '[[common]]\n"baselines.sasrec_max_epochs" = 2\n"baselines.sasrec_eval_every" = 1\n',
    )
    args = ["tune", "--config", str(config_file), "--grid", str(grid), "--methods", "local"]
    assert main([*args, "--epsilon", "4", "--out", str(tmp_path / "tune")]) == 0
    frozen = tmp_path / "tune" / "frozen" / "local@eps4.json"
    out = tmp_path / "test"
    assert main(["compare", "--frozen", str(frozen), "--blend", "--out", str(out)]) == 0
    results = json.loads((out / "comparison.json").read_text())
    assert [(r["method"], r["target_epsilon"]) for r in results] == [
        ("local", 4.0),
        ("popularity", math.inf),
        ("inhouse", math.inf),
        ("inhouse+local", 4.0),
    ]
    chosen = next(r for r in results if r["method"] == "inhouse")["inhouse"]["p0"]
    for model in ("bpr_local", "sasrec_local"):  # both candidates scored, the choice named
        assert 0 <= chosen[model]["ndcg@10"] <= 1 and "valid_ndcg@10" in chosen[model]
    assert chosen["model"] in ("bpr_local", "sasrec_local")
    sha = json.loads(frozen.read_text())["sha256"]
    assert all(r["frozen"]["sha256"] == sha for r in results)
    ledger = PrivacyLedger.load(out / "runs" / "local@eps4" / "p0" / LEDGER_FILE)
    assert [e["server_round"] for e in ledger.entries] == [0, 1, 2]

    # scored again in a new process, the blend cell's record gone: the kept in-house models
    # are reused (nothing trains again) and the blend scores as before
    kept = sorted(p.name.split("-")[0] for p in (out / INHOUSE_MODELS / "p0").glob("*.json"))
    assert kept == ["bpr_local", "sasrec_local"]
    [cell] = (out / "cells").glob("inhouse+local*.json")
    cell.unlink()
    monkeypatch.setattr(joining, "_trained", {})
    monkeypatch.setattr(sasrec, "_train_epoch", _never)
    monkeypatch.setattr(bpr.BPRModel, "loss", _never)
    assert (
        main(["compare", "--frozen", str(frozen), "--blend", "--rescore", "--out", str(out)]) == 0
    )
    again = json.loads((out / "comparison.json").read_text())
    assert [r["platforms"] for r in again] == [r["platforms"] for r in results]

    assert main(["compare", "--blend", "--out", str(tmp_path / "x")]) == 2
    assert "go with --frozen" in _error(capsys)


def _never(*_: object) -> None:
    raise AssertionError("trained again")


@pytest.mark.parametrize(
    ("methods", "levels", "expected"),
    [
        (["fedavg", "inhouse"], [8.0], [(8.0, ["fedavg"]), (math.inf, ["inhouse"])]),
        (
            ["fedavg", "bpr_local"],
            [8.0, math.inf],
            [(8.0, ["fedavg"]), (math.inf, ["fedavg", "bpr_local"])],
        ),
        (["popularity"], [1.0, 8.0], [(math.inf, ["popularity"])]),
        (["local"], [8.0, 8.0], [(8.0, ["local"])]),
    ],
)
def test_non_private_methods_are_tuned_once_at_inf(
    methods: list[str], levels: list[float], expected: list[tuple[float, list[str]]]
) -> None:
    assert tuning.level_schedule(methods, levels) == expected


def test_a_frozen_inhouse_model_is_the_one_every_blend_runs(
    tmp_path: Path, config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``inhouse`` is tuned like any method (its own ``[baselines]`` grid, frozen at inf); with
    its frozen file, ``--blend`` blends exactly that in-house model and scores it alone once."""
    grid = _grid(
        tmp_path,
        '[[local]]\n"baselines.sasrec_max_epochs" = 3\n"baselines.sasrec_eval_every" = 1\n'
        '[[inhouse]]\n"baselines.sasrec_max_epochs" = 1\n"baselines.sasrec_eval_every" = 1\n',
    )
    args = ["tune", "--config", str(config_file), "--grid", str(grid), "--methods", "local,inhouse"]
    assert main([*args, "--epsilon", "4", "--out", str(tmp_path / "tune")]) == 0
    local, own = (
        tmp_path / "tune" / "frozen" / f"{m}.json" for m in ("local@eps4", "inhouse@nonprivate")
    )
    out = tmp_path / "test"
    assert main(["compare", "--frozen", str(local), str(own), "--blend", "--out", str(out)]) == 0
    records = json.loads((out / "comparison.json").read_text())
    assert [r["method"] for r in records] == ["local", "inhouse", "popularity", "inhouse+local"]
    results = {r["method"]: r for r in records}
    alone = results["inhouse"]["inhouse"]["p0"]
    blended = results["inhouse+local"]["blend"]["p0"]
    assert blended["inhouse_valid_ndcg@10"] == alone["valid_ndcg@10"]  # the same training
    assert alone[alone["model"]]["valid_ndcg@10"] == alone["valid_ndcg@10"]
    shas = {json.loads(p.read_text())["sha256"] for p in (local, own)}
    assert results["inhouse"]["frozen"]["sha256"] in shas
    assert results["inhouse+local"]["frozen"]["sha256"] not in shas  # covers both choices

    other = load_config(config_file, ["task.seed=7"])
    frozen_local = load_frozen(local)
    moved = replace(load_frozen(own), config=other)
    with pytest.raises(ConfigError, match=r"inhouse@nonprivate\.json: \[task\] differs from"):
        with_inhouse(frozen_local, moved)
    carried = load_config(config_file, ["model.carried_history=true"])
    with pytest.raises(ConfigError, match=r"nonprivate\.json: model\.carried_history differs"):
        with_inhouse(frozen_local, replace(load_frozen(own), config=carried))
