"""Stopping a set of processes for certain: SIGTERM first, SIGKILL for what is left."""

from __future__ import annotations

import contextlib
import signal
from collections.abc import Callable

import psutil


def stop_processes(find: Callable[[], list[psutil.Process]], timeout: float = 10) -> None:
    """Signal what ``find`` returns, re-finding before each signal: processes started while
    the first ones stop (Ray respawning workers, say) are caught too."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = find()
        for process in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                process.send_signal(sig)
        _, alive = psutil.wait_procs(alive, timeout=timeout)
        if not alive:
            break
