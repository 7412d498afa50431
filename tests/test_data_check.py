"""`fedfuse data check` on the fixture folders: one precise error line for every malformed case.

Each folder under ``tests/fixtures/malformed/`` is a realistic export mistake; ``expected.json``
names the file, row, column and message the operator must see. The CLI runs from the repository
root with a relative path, so the expected line is known exactly.
"""

from __future__ import annotations

import errno
import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import pytest

from common.config import load_config
from common.errors import DataError
from common.platform_data import read_dataset
from server.cli import main

REPO = Path(__file__).resolve().parents[1]
FIXTURES = Path("tests") / "fixtures"  # relative to REPO, as a user would type it
MALFORMED = FIXTURES / "malformed"
VALID = FIXTURES / "valid"
EXPECTED: dict[str, dict[str, object]] = json.loads(
    (REPO / MALFORMED / "expected.json").read_text(encoding="utf-8")
)
CASES = sorted(EXPECTED)
PREFIX = "fedfuse: error: "
PLATFORM_HEADER = (
    "| platform | ratings | users | items | positive % | train | valid | test | test cases |"
)


@pytest.fixture(autouse=True)
def in_repo(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(REPO)


def expected_line(case: str) -> str:
    """``PATH[, row N][, column 'x']: message`` exactly as DataError renders it."""
    spec = EXPECTED[case]
    path = MALFORMED / case
    if spec["file"]:
        path = path / str(spec["file"])
    where = [path.as_posix()]
    if spec["row"] is not None:
        where.append(f"row {spec['row']}")
    if spec["column"] is not None:
        where.append(f"column {spec['column']!r}")
    return f"{', '.join(where)}: {spec['message']}"


def check(
    path: Path | str, capsys: pytest.CaptureFixture[str], *settings: str
) -> tuple[int, str, str]:
    code = main(["data", "check", str(path), *(a for s in settings for a in ("--set", s))])
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------ the fixture catalogue


def test_every_malformed_folder_has_an_expectation_and_vice_versa():
    folders = {p.name for p in (REPO / MALFORMED).iterdir() if p.is_dir()}
    assert folders == set(EXPECTED)
    assert len(folders) >= 18


def test_expectations_are_complete():
    for case, spec in EXPECTED.items():
        assert set(spec) == {"file", "row", "column", "message"}, case
        assert spec["message"], case
        if spec["file"]:
            assert (REPO / MALFORMED / case / str(spec["file"])).is_file(), case


# ------------------------------------------------------------------ malformed: in process


@pytest.mark.parametrize("case", CASES)
def test_malformed_case_gives_one_exact_error_line(case: str, capsys: pytest.CaptureFixture[str]):
    code, out, err = check(MALFORMED / case, capsys)
    assert code == 2
    assert out == ""
    assert "Traceback" not in err
    assert err.endswith("\n")
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith(PREFIX)
    assert lines[0] == PREFIX + expected_line(case)


@pytest.mark.parametrize("case", CASES)
def test_malformed_case_locates_file_row_and_column(case: str):
    spec = EXPECTED[case]
    with pytest.raises(DataError) as caught:
        read_dataset(MALFORMED / case)
    error = caught.value
    if spec["file"]:
        assert error.path == MALFORMED / case / str(spec["file"])
        assert error.path.is_file()
    else:
        assert error.path == MALFORMED / case
    assert error.row == spec["row"]
    assert error.column == spec["column"]
    assert error.message == spec["message"]


def test_missing_path_is_one_line_error(capsys: pytest.CaptureFixture[str]):
    code, out, err = check(FIXTURES / "no_such_folder", capsys)
    assert (code, out) == (2, "")
    assert err == f"{PREFIX}{(FIXTURES / 'no_such_folder').as_posix()}: folder does not exist\n"


def test_folder_without_platforms_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
):
    code, _, err = check(tmp_path, capsys)
    assert code == 2
    assert err == (
        f"{PREFIX}{tmp_path}: neither a platform folder nor a folder of platforms "
        "(no interactions file)\n"
    )


# ------------------------------------------------------------------ malformed: real process


SUBPROCESS_CASES = ["non_utf8_bytes", "invalid_json_line", "missing_items_file"]


@pytest.fixture(scope="module")
def subprocess_results() -> dict[str, tuple[int, str, str]]:
    """Run the CLI as real processes, all at once (each pays the full import time)."""
    processes = {
        case: subprocess.Popen(
            [sys.executable, "-m", "server.cli", "data", "check", str(MALFORMED / case)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for case in SUBPROCESS_CASES
    }
    results = {}
    for case, process in processes.items():
        out, err = process.communicate(timeout=120)
        results[case] = (process.returncode, out, err)
    return results


@pytest.mark.parametrize("case", SUBPROCESS_CASES)
def test_cli_subprocess_exit_code_and_one_line_stderr(
    case: str, subprocess_results: dict[str, tuple[int, str, str]]
):
    code, out, err = subprocess_results[case]
    assert code == 2, err
    assert out == ""
    assert "Traceback" not in err
    assert err.splitlines() == [PREFIX + expected_line(case)]


# ------------------------------------------------------------------ valid fixtures


def test_valid_csv_platform_prints_summary(capsys: pytest.CaptureFixture[str]):
    code, out, err = check(VALID / "csv_ratings", capsys, "task.split=leave_last")
    assert code == 0
    assert err == ""
    lines = out.splitlines()
    assert lines[0] == f"ok: 1 platform(s) valid under {(VALID / 'csv_ratings').as_posix()}"
    assert PLATFORM_HEADER in lines
    # 8 ratings, 6 of them >= 4; u1 (4 positives) is held out, u2 and u3 are train-only.
    # train: 8 - 2 held out + 3 negatives for each of u1's 2 train positives (6 items minus the
    # 3 u1 touched before validation) + 4 for u2's and u3's one positive each
    assert "| csv_ratings | 8 | 3 | 6 | 75.0 | 20 | 1 | 1 | 1 |" in lines
    assert "| **all** | 8 | 3 | 6 | 75.0 | 20 | 1 | 1 | 1 |" in lines
    assert "users on 2+ platforms: 0 of 3 (0.0 %)" in lines


def test_without_a_configuration_the_summary_cuts_the_data_at_its_own_quantiles(
    capsys: pytest.CaptureFixture[str],
):
    """The defaults' cut dates are ML-100K's: for any other data the summary cuts at the
    data's own 0.7/0.85 interaction quantiles, as if those cuts had been configured."""
    code, out, _ = check(VALID / "csv_ratings", capsys)
    assert code == 0
    cuts = re.search(r"task\.valid_from=(\d+).*task\.test_from=(\d+)", out)
    assert cuts is not None and int(cuts[1]) < int(cuts[2])
    given = ("task.split=global_time", f"task.valid_from={cuts[1]}", f"task.test_from={cuts[2]}")
    assert check(VALID / "csv_ratings", capsys, *given)[1] == out
    default_cuts = load_config(None, []).task
    assert (
        check(VALID / "csv_ratings", capsys, *given)[1]
        != check(
            VALID / "csv_ratings",
            capsys,
            f"task.valid_from={default_cuts.valid_from}",
            f"task.test_from={default_cuts.test_from}",
        )[1]
    )


def test_valid_jsonl_label_platform_prints_summary(capsys: pytest.CaptureFixture[str]):
    code, out, err = check(
        VALID / "jsonl_labels",
        capsys,
        "task.split=leave_last",
        "federation.fraction_evaluate=0",  # no test case: a run would refuse it, the summary not
    )
    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[0] == f"ok: 1 platform(s) valid under {(VALID / 'jsonl_labels').as_posix()}"
    assert PLATFORM_HEADER in lines
    # train: 3 + 2 negatives for 7's train positive (items 7 did not touch in training) + 3
    assert "| jsonl_labels | 5 | 2 | 4 | 80.0 | 8 | 1 | 1 | 0 |" in lines


def test_long_description_loads_with_truncation_warning(capsys: pytest.CaptureFixture[str]):
    code, out, err = check(VALID / "long_description", capsys)
    assert code == 0
    assert "Traceback" not in err
    items = (VALID / "long_description" / "items.tsv").as_posix()
    assert err.splitlines() == [
        f"warning: {items}, row 2, column 'description': text of 1739 characters truncated to 1000",
        f"warning: {VALID / 'long_description'}: no platform has a valid ranking case: the "
        "valid split needs a user with at least 3 positive interactions; a run on the split "
        "below would refuse this data",  # 3 ratings: valid files, nothing to evaluate
    ]
    assert out.startswith("ok: 1 platform(s) valid under ")
    assert "| long_description | 3 | 2 | 2 |" in out


def test_folder_of_valid_platforms(capsys: pytest.CaptureFixture[str]):
    code, out, err = check(VALID, capsys)
    assert code == 0
    truncated, unscorable = err.splitlines()  # nothing else
    assert "truncated to 1000" in truncated and "no platform has a valid" in unscorable
    assert out.splitlines()[0] == f"ok: 3 platform(s) valid under {VALID.as_posix()}"
    assert "| shared users | csv_ratings | jsonl_labels | long_description |" in out
    assert "| **all** | 16 | 7 | 12 |" in out


# ------------------------------------------------------------------ folders the user may not use


@pytest.fixture
def deny(
    monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Callable[[Path, int], None]:
    """Give a folder mode 0o000 (unreadable) or 0o555 (read-only). Root ignores modes, so there
    the first call a user would see refused (stat, or mkdir, under the folder) fails as it
    would for them."""

    def apply(folder: Path, mode: int) -> None:
        if os.geteuid() != 0:
            folder.chmod(mode)
            request.addfinalizer(lambda: folder.chmod(0o755))
            return
        name = "stat" if mode == 0o000 else "mkdir"
        real = getattr(os, name)

        def refused(path: object, *args: object, **kwargs: object) -> object:
            if isinstance(path, str | os.PathLike) and folder in Path(path).parents:
                raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), os.fspath(path))
            return real(path, *args, **kwargs)

        monkeypatch.setattr(os, name, refused)

    return apply


def test_unreadable_folder_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], deny: Callable[[Path, int], None]
):
    folder = tmp_path / "locked"
    folder.mkdir()
    (folder / "interactions.csv").write_text("user_id,item_id,rating,timestamp\n", encoding="utf-8")
    deny(folder, 0o000)
    code, out, err = check(folder, capsys)
    assert (code, out) == (2, "")
    assert err == (
        f"{PREFIX}{folder}: cannot read (Permission denied: {folder / 'interactions.csv'})\n"
    )


def test_prepare_into_read_only_folder_is_one_line_error(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], deny: Callable[[Path, int], None]
):
    deny(tmp_path, 0o555)
    out = tmp_path / "out"
    code = main(
        ["data", "prepare", "--dataset", "synthetic", "--platforms", "1", "--out", str(out)]
    )
    stdout, err = capsys.readouterr()
    assert (code, stdout) == (2, "")
    staging = re.escape(str(tmp_path / ".out.")) + r"\w+"  # write_dataset's temporary folder
    expected = rf"{re.escape(f'{PREFIX}{out}')}: cannot write \(Permission denied: {staging}\)\n"
    assert re.fullmatch(expected, err), err
    assert list(tmp_path.iterdir()) == []
