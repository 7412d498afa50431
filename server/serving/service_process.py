"""``fedfuse serve`` as a child process, for the tests, the benchmark and the screenshot: all
three need a real service (its own process, a real port) and must never leave one behind."""

from __future__ import annotations

import contextlib
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[2]


@contextlib.contextmanager
def running_service(
    run_dir: Path, platform: str, timeout: float = 300, options: Sequence[str] = ()
) -> Iterator[str]:
    """``fedfuse serve`` (with ``options``, e.g. ``--token-file``) in a subprocess on a free
    port; yields its base URL once /health answers, and stops it on the way out (its log is
    in the error if it never came up)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = ["-m", "server.cli", "serve", str(run_dir), "--platform", platform, *options]
    with tempfile.TemporaryFile() as log:
        process = subprocess.Popen(
            [sys.executable, *command, "--port", str(port)],
            cwd=REPO,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        url = f"http://127.0.0.1:{port}"
        try:
            deadline = time.monotonic() + timeout
            while not _healthy(url):
                if process.poll() is not None or time.monotonic() > deadline:
                    log.seek(0)
                    tail = log.read().decode(errors="replace")[-3000:]
                    raise RuntimeError(f"fedfuse serve did not come up:\n{tail}")
                time.sleep(0.2)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


def _healthy(url: str) -> bool:
    try:
        return httpx.get(f"{url}/health", timeout=2).status_code == 200
    except httpx.TransportError:
        return False
