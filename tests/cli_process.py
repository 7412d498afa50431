"""``fedfuse`` as a child process, for the tests that signal it or read its console as it runs."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def cli_env(**extra: str) -> dict[str, str]:
    """This environment, with Flower's runtime install off and the console unbuffered."""
    return (
        os.environ
        | {
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
            "PYTHONUNBUFFERED": "1",
        }
        | extra
    )


def run_cli(*args: str, timeout: float, **env: str) -> subprocess.CompletedProcess[str]:
    """``python -m server.cli ARGS`` from the checkout to its end, stdout and stderr captured
    as text (``env``: variables added to :func:`cli_env`'s)."""
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env=cli_env(**env),
        timeout=timeout,
    )


def start_cli(*args: str) -> subprocess.Popen[str]:
    """``python -m server.cli ARGS`` from the checkout, its stdout and stderr piped as text.
    SIGINT is restored to its default in the child: a shell's background job ignores it, and a
    child inherits that, so a test's Ctrl-C would otherwise never arrive."""
    return subprocess.Popen(
        [sys.executable, "-m", "server.cli", *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=ROOT,
        env=cli_env(),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
