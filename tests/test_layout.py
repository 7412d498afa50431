"""Imports run one way — common <- client <- server — and each server job has its own folder."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BELOW = {"common": {"client", "server"}, "client": {"server"}}


def _imported_packages(path: Path) -> set[str]:
    """Top-level packages a module imports, lazy imports inside functions included."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found.add(node.module.split(".")[0])
    return found


@pytest.mark.parametrize("package", sorted(BELOW))
def test_lower_layers_never_import_higher_ones(package: str) -> None:
    offenders = {
        str(path.relative_to(REPO)): sorted(_imported_packages(path) & BELOW[package])
        for path in sorted((REPO / package).rglob("*.py"))
        if _imported_packages(path) & BELOW[package]
    }
    assert offenders == {}


def test_server_jobs_each_have_a_folder() -> None:
    jobs = {p.name for p in (REPO / "server").iterdir() if (p / "__init__.py").is_file()}
    assert jobs == {"federation", "simulation", "audit", "deployment", "serving"}
    loose = {p.name for p in (REPO / "server").glob("*.py")}
    assert loose == {"__init__.py", "cli.py"}  # the command line over all jobs


# Where print stays: the command line's own output (each a process's front door).
PRINTS = {
    "server/cli.py": "the command line decides what reaches the console",
    "server/audit/command.py": "fedfuse audit's own output: the summary, files written",
    "server/serving/commands.py": "fedfuse recommend's and serve's own output",
    "server/simulation/commands.py": "fedfuse simulate's, compare's and tune's own output",
    "server/deployment/deploy.py": "fedfuse deploy's own output: commands, files, run ids",
    "server/deployment/supernode_main.py": "the SuperNode launcher's one fedfuse: error line",
}


def _prints(path: Path) -> int:
    tree = ast.parse(path.read_text(encoding="utf-8"))
    return sum(
        isinstance(node, ast.Call) and isinstance(node.func, ast.Name) and node.func.id == "print"
        for node in ast.walk(tree)
    )


def test_library_code_logs_instead_of_printing() -> None:
    printing = {
        str(path.relative_to(REPO))
        for package in ("common", "client", "server")
        for path in sorted((REPO / package).rglob("*.py"))
        if _prints(path)
    }
    assert printing == set(PRINTS)  # a module that stopped printing leaves the list too


def test_no_module_holds_more_than_450_lines() -> None:
    """One home per job: a module past 450 lines holds several (issue 36's measure)."""
    long = {
        str(path.relative_to(REPO)): count
        for package in ("common", "client", "server")
        for path in sorted((REPO / package).rglob("*.py"))
        if (count := len(path.read_text(encoding="utf-8").splitlines())) > 450
    }
    assert long == {}
