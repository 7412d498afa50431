"""The console of the commands shows FedFuse's own lines only: no library warning on stderr."""

from __future__ import annotations

import shutil
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from server.cli import main


@contextmanager
def console_warnings() -> Iterator[list[warnings.WarningMessage]]:
    """The warnings a console would print, recorded: Python's own default filters in place of
    pytest's, and the registries of warnings already shown cleared (by changing the filters)."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.resetwarnings()
        for category in (PendingDeprecationWarning, ImportWarning, ResourceWarning):
            warnings.simplefilter("ignore", category)
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("default", category=DeprecationWarning, module="__main__")
        yield caught


def shown(caught: list[warnings.WarningMessage]) -> list[str]:
    return [f"{w.category.__name__}: {w.message} ({w.filename})" for w in caught]


def test_recommend_and_audit_show_no_library_warning(
    finished_run: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run = Path(shutil.copytree(finished_run, tmp_path / "run"))
    user = _first_user(run)
    with console_warnings() as caught:
        assert main(["recommend", str(run), "--platform", "p0", "--user", user]) == 0
        assert main(["audit", str(run)]) == 0
    assert shown(caught) == []
    assert capsys.readouterr().err == ""


def _first_user(run: Path) -> str:
    from common.config import load_config
    from common.platform_data import federation_platforms, read_platform
    from server.federation.run_record import CONFIG_FILE

    config = load_config(run / CONFIG_FILE)
    (name, folder), *_ = federation_platforms(config.data)
    assert name == "p0"
    return str(read_platform(folder, name).users[0])
