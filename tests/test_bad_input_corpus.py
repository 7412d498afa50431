"""A corpus of bad inputs and faults across every command (issue 35): each must end in one
line on stderr, the exit code docs/exit-codes.md gives, no traceback, and nothing written.

Every case fails during argument, configuration or data checks, before any training, so the
whole corpus runs in seconds. ``{name}`` in an argument is a path from :func:`world`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from server.cli import main

# (argv, exit code, text the one line must contain)
CASES: dict[str, tuple[list[str], int, str]] = {
    # fedfuse data
    "data-no-action": (["data"], 2, "required"),
    "prepare-unknown-dataset": (["data", "prepare", "--dataset", "x", "--out", "{w}/d"], 2, "x"),
    "prepare-no-out": (["data", "prepare", "--dataset", "synthetic"], 2, "--out"),
    "prepare-out-under-file": (
        ["data", "prepare", "--dataset", "synthetic", "--out", "{file}/d"],
        2,
        "{file}",
    ),
    "prepare-out-in-proc": (
        ["data", "prepare", "--dataset", "synthetic", "--out", "/proc/fedfuse-d"],
        2,
        "/proc/fedfuse-d",
    ),
    "prepare-out-exists": (
        ["data", "prepare", "--dataset", "synthetic", "--out", "{empty}"],
        2,
        "",
    ),
    "prepare-zero-platforms": (
        ["data", "prepare", "--dataset", "synthetic", "--platforms", "0", "--out", "{w}/d"],
        2,
        "platforms",
    ),
    "prepare-negative-users": (
        ["data", "prepare", "--dataset", "synthetic", "--users", "-1", "--out", "{w}/d"],
        2,
        "users",
    ),
    "prepare-overlap-2": (
        ["data", "prepare", "--dataset", "synthetic", "--overlap", "2", "--out", "{w}/d"],
        2,
        "overlap",
    ),
    "prepare-users-not-a-number": (
        ["data", "prepare", "--dataset", "synthetic", "--users", "many", "--out", "{w}/d"],
        2,
        "many",
    ),
    "prepare-unknown-key": (
        ["data", "prepare", "--dataset", "synthetic", "--out", "{w}/d", "--set", "task.bogus=1"],
        2,
        "task.bogus",
    ),
    "check-missing": (["data", "check", "{w}/missing"], 2, "missing"),
    "check-a-file": (["data", "check", "{file}"], 2, "{file}"),
    "check-empty-folder": (["data", "check", "{empty}"], 2, "{empty}"),
    "check-bad-rows": (["data", "check", "{bad_rows}"], 2, "row"),
    "check-no-items": (["data", "check", "{no_items}"], 2, "{no_items}"),
    "check-no-evaluation-cases": (
        ["data", "check", "{one}", "--set", "federation.fraction_evaluate=1.0"],
        2,
        "no platform has a valid",
    ),
    "check-unknown-key": (["data", "check", "{data}", "--set", "task.bogus=1"], 2, "task.bogus"),
    "check-missing-config": (["data", "check", "{data}", "--config", "{w}/no.toml"], 2, "no.toml"),
    "check-broken-toml": (["data", "check", "{data}", "--config", "{bad_toml}"], 2, "bad.toml"),
    # fedfuse simulate
    "simulate-cpus-1000": (
        ["simulate", "--config", "{cfg}", "--cpus-per-client", "1000"],
        2,
        "CPUs",
    ),
    "simulate-cpus-0": (["simulate", "--config", "{cfg}", "--cpus-per-client", "0"], 2, "above 0"),
    "simulate-cpus-negative": (
        ["simulate", "--config", "{cfg}", "--cpus-per-client", "-1"],
        2,
        "above 0",
    ),
    "simulate-cpus-not-a-number": (
        ["simulate", "--config", "{cfg}", "--cpus-per-client", "all"],
        2,
        "all",
    ),
    "simulate-gpus-negative": (
        ["simulate", "--config", "{cfg}", "--gpus-per-client", "-1"],
        2,
        "--gpus-per-client",
    ),
    "simulate-gpus-fraction-above-1": (
        ["simulate", "--config", "{cfg}", "--gpus-per-client", "1.5"],
        2,
        "whole GPUs",
    ),
    "simulate-gpus-without-gpu": (
        ["simulate", "--config", "{cfg}", "--gpus-per-client", "1"],
        2,
        "CUDA GPU",
    ),
    "simulate-cuda-without-gpu": (
        ["simulate", "--config", "{cfg}", "--set", "train.device='cuda'"],
        2,
        "train.device = cuda",
    ),
    "simulate-device-unknown": (
        ["simulate", "--config", "{cfg}", "--set", "train.device='tpu'"],
        2,
        "train.device",
    ),
    "simulate-min-nodes-above-platforms": (
        ["simulate", "--config", "{cfg}", "--set", "federation.min_nodes=5"],
        2,
        "federation.min_nodes = 5",
    ),
    "simulate-zero-rounds": (
        ["simulate", "--config", "{cfg}", "--set", "federation.rounds=0"],
        2,
        "federation.rounds",
    ),
    "simulate-no-evaluation-cases": (
        ["simulate", "--config", "{cfg}", "--set", "data.path='{one}'"],
        2,
        "no platform has a valid",
    ),
    "simulate-missing-data": (
        ["simulate", "--config", "{cfg}", "--set", "data.path='{w}/nowhere'"],
        2,
        "nowhere",
    ),
    "simulate-missing-backbone": (
        ["simulate", "--config", "{cfg}", "--set", "model.backbone='{empty}'"],
        2,
        "{empty}",
    ),
    "simulate-override-without-dot": (
        ["simulate", "--config", "{cfg}", "--set", "x=1"],
        2,
        "x: unknown key",
    ),
    "simulate-missing-config": (["simulate", "--config", "{w}/no.toml"], 2, "no.toml"),
    "simulate-name-parent": (["simulate", "--config", "{cfg}", "--name", "../escape"], 2, "plain"),
    "simulate-name-absolute": (["simulate", "--config", "{cfg}", "--name", "{w}/abs"], 2, "plain"),
    "simulate-name-dot": (["simulate", "--config", "{cfg}", "--name", "."], 2, "plain"),
    "simulate-runs-is-a-file": (["simulate", "--config", "{cfg}", "--runs", "{file}"], 2, "{file}"),
    "simulate-runs-under-a-file": (
        ["simulate", "--config", "{cfg}", "--runs", "{file}/runs"],
        2,
        "{file}/runs",
    ),
    "simulate-runs-in-proc": (
        ["simulate", "--config", "{cfg}", "--runs", "/proc/fedfuse-runs"],
        2,
        "/proc/fedfuse-runs",
    ),
    "resume-missing": (["simulate", "--resume", "{w}/missing"], 2, "not a FedFuse run folder"),
    "resume-not-a-run": (["simulate", "--resume", "{empty}"], 2, "not a FedFuse run folder"),
    "resume-broken-config": (["simulate", "--resume", "{broken_run}"], 2, "invalid JSON"),
    "resume-more-rounds": (
        ["simulate", "--resume", "{pending}", "--set", "federation.rounds=9"],
        2,
        "federation.rounds cannot change on a resume",
    ),
    "resume-other-epsilon": (
        ["simulate", "--resume", "{pending}", "--set", "dp.target_epsilon=1.0"],
        2,
        "dp.target_epsilon cannot change",
    ),
    "resume-other-config": (
        ["simulate", "--resume", "{pending}", "--config", "{other_cfg}"],
        2,
        "train.learning_rate cannot change",
    ),
    "resume-move-ledgers": (
        ["simulate", "--resume", "{pending}", "--set", "dp.state_dir='{w}/ledgers'"],
        2,
        "dp.state_dir cannot change",
    ),
    "resume-with-name": (["simulate", "--resume", "{pending}", "--name", "x"], 2, "drop --name"),
    "resume-cpus-0": (
        ["simulate", "--resume", "{pending}", "--cpus-per-client", "0"],
        2,
        "above 0",
    ),
    # fedfuse compare and tune
    "compare-no-out": (["compare", "--epsilon", "8:popularity"], 2, "--out"),
    "compare-cpus-0": (["compare", "--out", "{w}/c", "--cpus-per-client", "0"], 2, "above 0"),
    "compare-cuda-without-gpu": (
        ["compare", "--out", "{w}/c", "--config", "{cfg}", "--set", "train.device='cuda'"],
        2,
        "cuda",
    ),
    "compare-out-under-a-file": (
        ["compare", "--out", "{file}/c", "--config", "{cfg}", "--split", "valid"],
        2,
        "{file}/c",
    ),
    "compare-bad-level": (["compare", "--out", "{w}/c", "--epsilon", "lots"], 2, "lots"),
    "compare-unknown-method": (["compare", "--out", "{w}/c", "--epsilon", "8:magic"], 2, "magic"),
    "compare-unknown-split": (["compare", "--out", "{w}/c", "--split", "train"], 2, "train"),
    "compare-runs-without-frozen": (["compare", "--out", "{w}/c", "--runs", "2"], 2, "--frozen"),
    "compare-frozen-with-set": (
        ["compare", "--out", "{w}/c", "--frozen", "{file}", "--set", "a.b=1"],
        2,
        "--set",
    ),
    "tune-missing-grid": (
        ["tune", "--grid", "{w}/no-grid.toml", "--methods", "fedavg", "--out", "{w}/t"],
        2,
        "no-grid.toml",
    ),
    "tune-cpus-0": (
        [
            "tune",
            "--grid",
            "{file}",
            "--methods",
            "fedavg",
            "--out",
            "{w}/t",
            "--cpus-per-client",
            "0",
        ],
        2,
        "above 0",
    ),
    # fedfuse audit
    "audit-missing": (["audit", "{w}/missing"], 2, "missing"),
    "audit-not-a-run": (["audit", "{empty}"], 2, "{empty}"),
    "audit-a-file": (["audit", "{file}"], 2, "{file}"),
    "audit-broken-config": (["audit", "{broken_run}"], 2, "invalid JSON"),
    # fedfuse recommend and serve
    "recommend-unfinished": (
        ["recommend", "{pending}", "--platform", "p0", "--user", "u0"],
        2,
        "the run is not finished",
    ),
    "recommend-missing": (
        ["recommend", "{w}/missing", "--platform", "p0", "--user", "u0"],
        2,
        "not a FedFuse run folder",
    ),
    "recommend-not-a-run": (
        ["recommend", "{empty}", "--platform", "p0", "--user", "u0"],
        2,
        "not a FedFuse run folder",
    ),
    "recommend-no-platform": (["recommend", "{pending}", "--user", "u0"], 2, "--platform"),
    "recommend-k-not-a-number": (
        ["recommend", "{pending}", "--platform", "p0", "--user", "u0", "--k", "ten"],
        2,
        "ten",
    ),
    "serve-unfinished": (["serve", "{pending}", "--platform", "p0"], 2, "not finished"),
    "serve-missing": (["serve", "{w}/missing", "--platform", "p0"], 2, "not a FedFuse run"),
    "serve-not-a-run": (["serve", "{empty}", "--platform", "p0"], 2, "not a FedFuse run"),
    "serve-port-not-a-number": (["serve", "{pending}", "--platform", "p0", "--port", "x"], 2, "x"),
    # fedfuse deploy
    "deploy-no-action": (["deploy"], 2, "required"),
    "certs-out-under-a-file": (
        ["deploy", "certs", "--out", "{file}/certs", "--host", "127.0.0.1"],
        2,
        "{file}/certs",
    ),
    "certs-out-in-proc": (
        ["deploy", "certs", "--out", "/proc/fedfuse-certs", "--host", "127.0.0.1"],
        2,
        "/proc/fedfuse-certs",
    ),
    "keys-out-under-a-file": (
        ["deploy", "keys", "--platform", "p0", "--out", "{file}/keys"],
        2,
        "{file}/keys",
    ),
    "keys-platform-path": (["deploy", "keys", "--platform", "../p0", "--out", "{w}/k"], 2, "../p0"),
    "superlink-missing-certs": (
        ["deploy", "superlink", "--certs", "{w}/no-certs", "--dry-run"],
        2,
        "no-certs",
    ),
    "supernode-run-setting": (
        ["deploy", "supernode", "--platform", "p0", "--data-dir", "{data}/p0"]
        + ["--state-dir", "{w}/s", "--key", "{file}", "--ca", "{file}", "--dry-run"]
        + ["--set", "federation.rounds=1"],
        2,
        "dp.KEY=VALUE",
    ),
    "supernode-missing-data": (
        ["deploy", "supernode", "--platform", "p0", "--data-dir", "{w}/no-data"]
        + ["--state-dir", "{w}/s", "--key", "{file}", "--ca", "{file}", "--dry-run"],
        2,
        "no-data",
    ),
    "register-missing-key": (
        ["deploy", "register", "--public-key", "{w}/p0.pub", "--ca", "{file}", "--dry-run"],
        2,
        "p0.pub",
    ),
    "deploy-run-name-path": (
        ["deploy", "run", "--config", "{cfg}", "--name", "../r", "--ca", "{file}", "--dry-run"],
        2,
        "../r",
    ),
    "deploy-run-missing-config": (
        ["deploy", "run", "--config", "{w}/no.toml", "--name", "r", "--ca", "{file}", "--dry-run"],
        2,
        "no.toml",
    ),
    # fedfuse config
    "config-unknown-key": (["config", "show", "--set", "bogus.key=1"], 2, "bogus"),
    "config-broken-toml": (["config", "show", "--config", "{bad_toml}"], 2, "bad.toml"),
    "unknown-command": (["train"], 2, "train"),
}


@pytest.fixture(scope="module")
def world(
    tmp_path_factory: pytest.TempPathFactory, write_run_config, synthetic_dir: Path
) -> dict[str, str]:
    """The files the cases point at, made once: good and broken data, configs and runs."""
    from common.config import load_config
    from common.platform_writer import write_dataset
    from common.synthetic import SyntheticConfig, generate
    from server.simulation.simulation import prepare_run

    w = tmp_path_factory.mktemp("world")
    (w / "empty").mkdir()
    (w / "a-file").write_text("not a folder\n")
    (w / "bad.toml").write_text("[train\nbatch_size = \n")
    bad_rows = w / "bad_rows" / "p0"
    bad_rows.mkdir(parents=True)
    (bad_rows / "items.tsv").write_text("item_id\ttitle\ni1\tA\n")
    (bad_rows / "interactions.tsv").write_text("user_id\titem_id\trating\ttimestamp\nu\ti1\tx\t1\n")
    no_items = w / "no_items" / "p0"
    no_items.mkdir(parents=True)
    (no_items / "interactions.tsv").write_text("user_id\titem_id\trating\ttimestamp\n")
    one = generate(
        SyntheticConfig(platforms=2, users=10, items=20, interactions_per_user=1, overlap=0)
    )
    write_dataset(w / "one", one)
    cfg = write_run_config(w / "run.toml")
    other = write_run_config(w / "other.toml", train={"learning_rate": 0.5})
    pending = prepare_run(load_config(cfg), w / "runs", "pending").root
    broken = w / "broken_run"
    broken.mkdir()
    (broken / "config.json").write_text("{not json")
    return {
        "w": str(w),
        "empty": str(w / "empty"),
        "file": str(w / "a-file"),
        "bad_toml": str(w / "bad.toml"),
        "bad_rows": str(w / "bad_rows"),
        "no_items": str(w / "no_items"),
        "one": str(w / "one"),
        "data": str(synthetic_dir),
        "cfg": str(cfg),
        "other_cfg": str(other),
        "pending": str(pending),
        "broken_run": str(broken),
    }


def _snapshot(root: Path) -> dict[str, float]:
    return {str(p): p.stat().st_mtime for p in sorted(root.rglob("*"))}


def test_the_corpus_is_large_enough() -> None:
    assert len(CASES) >= 60


@pytest.mark.parametrize("case", sorted(CASES))
def test_bad_input_ends_in_one_line(
    case: str, world: dict[str, str], capsys: pytest.CaptureFixture[str], monkeypatch
) -> None:
    argv, expected, needle = CASES[case]
    args = [arg.format(**world) for arg in argv]
    monkeypatch.chdir(world["w"])  # a default --runs/--out lands in the world, watched
    before = _snapshot(Path(world["w"]))
    pending_config = (Path(world["pending"]) / "config.json").read_text()
    try:
        code = main(args)
    except SystemExit as exit:  # argparse's usage errors
        code = exit.code
    err = capsys.readouterr().err
    assert code == expected, err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert lines[0].startswith("fedfuse: error: ")
    assert needle.format(**world) in lines[0]
    assert _snapshot(Path(world["w"])) == before  # nothing written, half or whole
    assert (Path(world["pending"]) / "config.json").read_text() == pending_config
    for outside in ("/proc/fedfuse-d", "/proc/fedfuse-runs", "/proc/fedfuse-certs"):
        assert not os.path.exists(outside)
    json.loads(pending_config)
