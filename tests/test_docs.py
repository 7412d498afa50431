"""README is a manual and the docs hold together: lengths, links, commands, what they cite."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
# What a user reads; docs/research-log.md is the dated record and may cite old runs and commits.
USER_DOCS = [README, REPO / "CHANGELOG.md"] + sorted(
    p for p in (REPO / "docs").glob("*.md") if p.name != "research-log.md"
)
ALL_DOCS = [README, REPO / "CHANGELOG.md", *sorted((REPO / "docs").glob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)


def _prose(path: Path) -> str:
    """The file without its fenced code blocks (links and headings live outside them)."""
    return FENCE.sub("", path.read_text(encoding="utf-8"))


def _anchor(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(path: Path) -> set[str]:
    return {
        _anchor(line.lstrip("#"))
        for line in _prose(path).splitlines()
        if re.match(r"#{1,6} ", line)
    }


def test_readme_and_results_stay_short() -> None:
    assert len(README.read_text(encoding="utf-8").splitlines()) <= 250
    assert len((REPO / "docs" / "results.md").read_text(encoding="utf-8").splitlines()) <= 250


@pytest.mark.parametrize("path", ALL_DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_every_relative_link_resolves(path: Path) -> None:
    broken = []
    for target in LINK.findall(_prose(path)):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        file, _, anchor = target.partition("#")
        resolved = (path.parent / file).resolve() if file else path
        missing_anchor = anchor and resolved.suffix == ".md" and anchor not in _anchors(resolved)
        if not resolved.exists() or missing_anchor:
            broken.append(target)
    assert broken == []


@pytest.mark.parametrize("path", USER_DOCS, ids=lambda p: str(p.relative_to(REPO)))
def test_user_docs_cite_no_commit_and_no_run_they_do_not_make(path: Path) -> None:
    """A result a reader cannot open is reproduced by a command they can run: a `runs/NAME`
    folder is named only where the same page shows the command that writes it."""
    text = path.read_text(encoding="utf-8")
    hashes = {
        word
        for word in re.findall(r"\b[0-9a-f]{7,40}\b", text)
        if re.search(r"[a-f]", word) and re.search(r"[0-9]", word)
    }
    assert hashes == set()
    made = set(re.findall(r"--out runs/([\w.@-]+)", text))
    made |= set(re.findall(r"--name ([\w.@-]+)", text))
    cited = set(re.findall(r"(?<![\w/.])runs/([\w.@-]+)", text))
    placeholders = {"NAME", "NAME.incomplete", ".flwr-home"}
    # `fedfuse simulate` without --name: the strategy and the time
    default_names = {c for c in cited if re.fullmatch(r"\w+-\d{8}-\d{6}(\.incomplete)?", c)}
    assert cited - made - placeholders - default_names == set()


def _readme_commands() -> list[str]:
    """Each command of README's bash blocks, continuation lines joined, `&&` chains split."""
    commands = []
    text = README.read_text(encoding="utf-8")
    for block in re.findall(r"^```bash\n(.*?)^```", text, re.S | re.M):
        for line in block.replace("\\\n", " ").splitlines():
            commands += [part.strip() for part in line.split("&&") if part.strip()]
    return commands


def test_readme_shows_the_two_commands_and_ci_runs_the_second() -> None:
    commands = _readme_commands()
    assert "bash scripts/setup.sh" in commands
    assert ".venv/bin/fedfuse data prepare --dataset ml100k --out data/ml100k --force" in commands
    assert ".venv/bin/fedfuse simulate --config simulations/ml100k_default.toml" in commands
    assert "bash scripts/test.sh" in commands
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text(encoding="utf-8")


def test_every_fedfuse_command_in_readme_parses() -> None:
    from server.cli import build_parser

    parser = build_parser()
    shown = [c for c in _readme_commands() if c.startswith(".venv/bin/fedfuse ")]
    assert len(shown) >= 3
    for command in shown:
        parser.parse_args(shlex.split(command)[1:])  # exits 2 on an unknown flag
    jobs = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    table = set(re.findall(r"^\| `fedfuse (\w+)", README.read_text(encoding="utf-8"), re.M))
    assert table == set(jobs.choices)  # the commands table names every job, and only those
