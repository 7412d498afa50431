"""``fedfuse audit`` on one real tiny run: clean as run, and each kind of tampering flagged."""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from client.ledger import EXAMPLE, LEDGER_FILE, PRIVACY_UNITS, USER, _digest
from client.platform_client import LastReply, PrivateTensors
from common.config import TaskConfig, load_config
from common.errors import FedFuseError
from common.platform_data import read_dataset
from common.task import build_task, training_units
from common.wire_log import WIRE_LOG_FILE
from server.audit.audit import (
    AUDIT_HTML,
    AUDIT_JSON,
    CANARY_FILE,
    LAST_REPLY_FILE,
    PRIVATE_ADAPTER_FILE,
    audit,
)
from server.cli import main
from server.federation.run_record import release
from server.simulation.simulation import prepare_run, simulate

LEAVE_LAST = TaskConfig(split="leave_last")  # the runs' split (tests/conftest.py's TINY_RUN)


@pytest.fixture(scope="module")
def run_dirs(tmp_path_factory: pytest.TempPathFactory, write_run_config) -> Callable[[str], Path]:
    """Real two-platform, two-round DP runs, one per privacy unit, each made when first asked
    for and shared by every test (each works on a copy)."""
    runs: dict[str, Path] = {}

    def run_dir(unit: str) -> Path:
        if unit not in runs:
            root = tmp_path_factory.mktemp(f"audit-{unit}")
            config = write_run_config(
                root / "run.toml", train={"eval_max_cases": 5}, dp={"unit": unit}
            )
            runs[unit] = simulate(prepare_run(load_config(config), root / "runs", "tiny"))
        return runs[unit]

    return run_dir


@pytest.fixture
def copy(run_dirs: Callable[[str], Path], tmp_path: Path) -> Path:
    return Path(shutil.copytree(run_dirs(EXAMPLE), tmp_path / "run"))


def _codes(report: dict[str, Any]) -> list[str]:
    return sorted({flag["code"] for flag in report["flags"]})


def _edit_ledger(run: Path, change: Callable[[dict[str, Any]], None], rechain: bool) -> None:
    """Change p0's ledger; with ``rechain`` recompute every hash, as a careful forger would."""
    path = run / "platform_state" / "p0" / LEDGER_FILE
    document = json.loads(path.read_text())
    change(document)
    if rechain:
        previous = _digest(document["header"])
        for entry in document["entries"]:
            entry["prev_hash"] = previous
            body = {k: v for k, v in entry.items() if k != "hash"}
            entry["hash"] = previous = _digest(body)
    path.write_text(json.dumps(document, indent=2))


def _edit_wire_log(path: Path, change: Callable[[list[dict[str, Any]]], None]) -> None:
    records = [json.loads(line) for line in path.read_text().splitlines()]
    change(records)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))


def _privacy_units(synthetic_dir: Path, unit: str) -> dict[str, int]:
    """N per platform: its training units, or its users with any."""
    sizes = {}
    for data in read_dataset(synthetic_dir):
        units = training_units(build_task(data, LEAVE_LAST).train, "softmax")
        sizes[data.name] = len({e.user for e in units}) if unit == USER else len(units)
    return sizes


@pytest.mark.parametrize("unit", [EXAMPLE, USER])
def test_a_real_run_audits_clean(
    run_dirs: Callable[[str], Path],
    synthetic_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    unit: str,
) -> None:
    """Either unit: ε recomputed, the unit stated (users counted, q over users), the white-box
    audit of the step in that unit, a person's ε about the unit."""
    copy = Path(shutil.copytree(run_dirs(unit), tmp_path / "run"))
    assert main(["audit", str(copy)]) == 0
    printed = capsys.readouterr().out
    assert "flags: 0 (audit clean)" in printed and "| p0 |" in printed and "| p1 |" in printed
    assert f"privacy unit: {PRIVACY_UNITS[unit]};" in printed
    report = json.loads((copy / AUDIT_JSON).read_text())
    assert report["flags"] == [] and report["dp_claimed"]
    sizes = _privacy_units(synthetic_dir, unit)
    expected = 4 if unit == USER else 32  # TINY_RUN: 32 training units, or 32 / k = 8 users
    for platform in report["platforms"]:
        assert platform["hash_chain_intact"] and platform["privacy_unit"] == PRIVACY_UNITS[unit]
        size = platform["dataset_size"]
        assert size == sizes[platform["platform"]]
        assert platform["rounds"][-1]["sample_rate"] == 1 / math.ceil(size / min(size, expected))
        # round 0: the popularity prior's one Gaussian release, composed into the same ledger
        assert [(r["round"], r["mechanism"]) for r in platform["rounds"]] == [
            (0, "gaussian-histogram"),
            (1, "dp-sgd"),
            (2, "dp-sgd"),
        ]
        last = platform["rounds"][-1]
        assert last["epsilon_prv"] == pytest.approx(last["epsilon_pld_recomputed"], rel=0.01)
        assert 0 < platform["epsilon_spent_prv"] <= platform["epsilon_budget"] == 4.0
        assert platform["budget_left"] == pytest.approx(4.0 - platform["epsilon_spent_prv"])
    # every message of both rounds is on both sides: 2 platforms × 2 rounds × train/evaluate × 2
    assert report["wire"]["server_messages"] == 16
    assert report["wire"]["platform_messages"] == {"p0": 8, "p1": 8}
    model = report["model"]
    for row in report["wire"]["bytes_per_round"]:
        assert 0 < row["largest_upload"] < model["full_model_bytes"]
        assert row["train_received"] == 2 * row["largest_upload"]
    assert model["full_model_bytes"] == model["backbone_bytes"] + model["adapter_bytes"]
    page = (copy / AUDIT_HTML).read_text()
    assert page.count("data:image/png;base64,") == 2 and "audit is clean" in page
    assert PRIVATE_ADAPTER_FILE == PrivateTensors.FILE and LAST_REPLY_FILE == LastReply.FILE
    assert {row["privacy_unit"] for row in report["white_box"]["rows"]} == {unit}
    about = "everything that person contributed" if unit == USER else "one training example"
    assert about in report["person_epsilon"]["rows"][-1]["bounds"]


def test_an_edited_ledger_entry_breaks_the_chain(copy: Path) -> None:
    _edit_ledger(copy, lambda d: d["entries"][1].update(steps=1), rechain=False)
    report = audit(copy)
    assert "broken-chain" in _codes(report)
    assert not next(p for p in report["platforms"] if p["platform"] == "p0")["hash_chain_intact"]


def test_a_ledger_cut_short_is_caught_by_the_wire_log(copy: Path) -> None:
    _edit_ledger(copy, lambda d: d["entries"].pop(), rechain=False)  # chain still intact
    report = audit(copy)
    assert _codes(report) == ["ledger-incomplete"]
    assert "round 2" in report["flags"][0]["message"]


def test_a_consistently_forged_sigma_is_caught_by_recomputation(copy: Path) -> None:
    _edit_ledger(copy, lambda d: d["entries"][0].update(noise_multiplier=5.0), rechain=True)
    # entry 0 is the popularity prior: its stored release still says σ = 10
    assert _codes(audit(copy)) == ["epsilon-mismatch", "prior-inconsistent"]


def test_a_spent_budget_is_flagged(copy: Path) -> None:
    _edit_ledger(copy, lambda d: d["header"].update(epsilon_budget=1.0), rechain=True)
    report = audit(copy)
    assert _codes(report) == ["budget-exceeded"]
    assert next(p for p in report["platforms"] if p["platform"] == "p0")["budget_left"] < 0


def test_zero_noise_under_dp_is_flagged(copy: Path) -> None:
    _edit_ledger(copy, lambda d: d["entries"][1].update(noise_multiplier=0.0), rechain=True)
    assert "zero-noise" in _codes(audit(copy))


def test_a_backbone_tensor_on_the_wire_is_flagged(copy: Path) -> None:
    def inject(records: list[dict[str, Any]]) -> None:
        upload = next(r for r in records if r.get("direction") == "sent" and r["type"] == "train")
        upload["tensors"].append(
            upload["tensors"][0] | {"name": "encoder.base_model.model.embeddings.word.weight"}
        )

    _edit_wire_log(copy / "platform_state" / "p1" / WIRE_LOG_FILE, inject)
    report = audit(copy)
    assert "foreign-tensor" in _codes(report)
    assert any("embeddings" in f["message"] for f in report["flags"])


@pytest.mark.parametrize("side", ["server", "platform"])
def test_server_and_platform_logs_must_agree(copy: Path, side: str) -> None:
    path = copy / (WIRE_LOG_FILE if side == "server" else f"platform_state/p0/{WIRE_LOG_FILE}")

    def tamper(records: list[dict[str, Any]]) -> None:
        messages = [r for r in records if r["kind"] == "message" and r["tensors"]]
        if side == "server":
            records.remove(messages[-1])  # a message the server never logged
        else:
            messages[0]["tensors"][0]["sha256"] = "0" * 64  # other bytes than the server saw

    _edit_wire_log(path, tamper)
    report = audit(copy)
    assert _codes(report) == ["wire-disagreement"]
    expected = "not in the server log" if side == "server" else "not in the platform's log"
    assert any(expected in f["message"] for f in report["flags"])


def test_a_canary_bound_above_theory_is_flagged(
    copy: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def row(platform: str, bound: float) -> dict[str, Any]:
        return {
            "platform": platform,
            "canaries": 1000,
            "guesses": 100,
            "correct": 99,
            "epsilon_lower_bound": bound,
            "epsilon_theoretical": 4.0,
            "delta": 1e-3,
        }

    canary = {"confidence": 0.95, "platforms": [row("p0", 1.2), row("p1", 4.5)]}
    (copy / CANARY_FILE).write_text(json.dumps(canary))
    with pytest.raises(SystemExit) as stopped:
        main(["audit", str(copy)])
    assert stopped.value.code == 1
    report = json.loads((copy / AUDIT_JSON).read_text())
    assert [(f["code"], f["platform"]) for f in report["flags"]] == [
        ("canary-exceeds-theory", "p1")
    ]
    assert "!! 1" in capsys.readouterr().out
    assert '<li class="flag">[canary-exceeds-theory]' in (copy / AUDIT_HTML).read_text()


def test_a_partial_deployment_audit_notes_what_it_could_not_compare(copy: Path) -> None:
    report = audit(copy, [copy / "platform_state" / "p0"])
    assert report["flags"] == [] and [p["platform"] for p in report["platforms"]] == ["p0"]
    assert len(report["notes"]) == 1 and "(p1)" in report["notes"][0]


def test_a_supernode_state_folder_with_flowers_home_audits(copy: Path) -> None:
    """A deployed SuperNode's state folder holds Flower's own ``flwr-home/`` (issue 11)."""
    state = copy / "platform_state" / "p0"
    (state / "flwr-home").mkdir()
    (state / "flwr-home" / "config.toml").write_text("[superlink]\n")
    report = audit(copy, [state])
    assert report["flags"] == [] and [p["platform"] for p in report["platforms"]] == ["p0"]
    (state / "flwr-home.txt").write_text("not Flower's")  # only the folder is Flower's
    with pytest.raises(FedFuseError, match="foreign file"):
        audit(copy, [state])


@pytest.mark.parametrize(
    ("damage", "named"),
    [
        (lambda run: _truncate(run / "platform_state/p0" / LEDGER_FILE), LEDGER_FILE),
        (lambda run: (run / "platform_state/p1" / LEDGER_FILE).unlink(), LEDGER_FILE),
        (lambda run: (run / WIRE_LOG_FILE).unlink(), WIRE_LOG_FILE),
        (lambda run: _truncate(run / "platform_state/p1" / WIRE_LOG_FILE), WIRE_LOG_FILE),
        (lambda run: (run / "platform_state/p0/notes.txt").write_text("x"), "notes.txt"),
        (lambda run: (run / "config.json").unlink(), "config.json"),
    ],
    ids=[
        "truncated-ledger",
        "missing-ledger",
        "missing-wire-log",
        "truncated-wire-log",
        "foreign-file",
        "not-a-run",
    ],
)
def test_an_unauditable_folder_is_a_one_line_error(
    copy: Path, capsys: pytest.CaptureFixture[str], damage: Callable[[Path], None], named: str
) -> None:
    damage(copy)
    assert main(["audit", str(copy)]) == 2
    error = capsys.readouterr().err
    assert error.startswith("fedfuse: error: ") and named in error and error.count("\n") == 1
    assert not (copy / AUDIT_JSON).exists() and not (copy / AUDIT_HTML).exists()


def _truncate(path: Path) -> None:
    """Cut the file inside its last line, as an interrupted copy would."""
    text = path.read_text()
    path.write_text(text[:-10])


def test_the_operator_names_the_release_every_platform_must_have_run(
    run_dirs: Callable[[str], Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--release installed``: the code this audit runs from, which the run also ran; a
    library version no platform ran is flagged on every platform; a malformed one is one
    line, exit 2."""
    copy = Path(shutil.copytree(run_dirs(EXAMPLE), tmp_path / "run"))
    assert main(["audit", str(copy), "--no-white-box", "--release", "installed"]) == 0
    capsys.readouterr()
    with pytest.raises(SystemExit) as flagged:
        main(["audit", str(copy), "--no-white-box", "--release", "torch=0.0.0"])
    assert flagged.value.code == 1
    flags = json.loads((copy / AUDIT_JSON).read_text())["flags"]
    assert {(f["code"], f["platform"]) for f in flags} == {
        ("code-identity-not-release", "p0"),
        ("code-identity-not-release", "p1"),
    }
    capsys.readouterr()
    assert main(["audit", str(copy), "--release", "torch"]) == 2
    assert "--release 'torch': expected KEY=VALUE" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("made", "named"),
    [(None, "a FedFuse release that did not record itself"), ("0.1.0", "FedFuse 0.1.0")],
    ids=["unrecorded", "older"],
)
def test_a_folder_an_older_release_wrote_names_the_release_and_audits_without_the_dp_step(
    copy: Path, capsys: pytest.CaptureFixture[str], made: str | None, named: str
) -> None:
    """run.json records the release that made the run; settings this release retired (the
    two_tower scorer) stop only the white-box audit, whose one-line error names both releases
    and the way to audit everything else here."""
    identity = json.loads((copy / "run.json").read_text())
    assert identity["fedfuse"] == release()
    if made is None:
        del identity["fedfuse"]
    else:
        identity["fedfuse"] = made
    (copy / "run.json").write_text(json.dumps(identity))
    settings = json.loads((copy / "config.json").read_text())
    settings["model"]["scorer"] = "two_tower"
    (copy / "config.json").write_text(json.dumps(settings))

    assert main(["audit", str(copy)]) == 2
    error = capsys.readouterr().err
    assert error.count("\n") == 1 and "model.scorer" in error
    assert f"written by {named} and this is FedFuse {release()}" in error
    assert "--no-white-box" in error and not (copy / AUDIT_JSON).exists()
    assert main(["audit", str(copy), "--no-white-box"]) == 0
    assert json.loads((copy / AUDIT_JSON).read_text())["flags"] == []
