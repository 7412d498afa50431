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
