"""Flower's SuperNode that runs only the app bundles its platform pinned:
``python -m server.deployment.supernode_main --trust-app SHA256 … <flower-supernode args>``.

Flower 1.41's own app verification (``--trusted-entities``) accepts only bundles that carry a
Flower Hub signature and a licence record, which a bundle built by ``flwr run`` from a folder
never has: a SuperNode with it refuses FedFuse, one without it runs whatever app the caller
of the SuperLink's Control API sent, next to the platform's raw data. The platform instead
pins the SHA-256 of the bundle it trusts (``fedfuse deploy app-hash``), and this launcher
checks every bundle when the SuperNode fetches it, before it is stored or any of its code
runs. A bundle with another hash is answered as Flower answers an unverified one (error
``INVALID_FAB``); the SuperNode keeps serving the trusted runs.

When Flower's SuperNode gives up (the SuperLink unreachable for ``--max-wait-time``, a refused
key), Flower logs a multi-line exit message and exits 1; the launcher ends instead with one
``fedfuse: error:`` line that says what to check, and exit 2 (bad input, as every command).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import os
import re
import sys
from collections.abc import Callable
from typing import Any

import psutil

from common.processes import stop_processes

log = logging.getLogger("flwr.fedfuse.supernode")  # Flower's handlers: console and log file
SHA256 = re.compile(r"^[0-9a-f]{64}$")


# Flower's exit codes whose cause is this platform's settings, and what to check
HINTS = {
    305: "check --superlink, that the SuperLink's Fleet listener is open to this host "
    "(deploy superlink --fleet-address), --ca, or wait longer (--max-wait)",
}


class _FlowerExit(logging.Filter):
    """Holds back Flower's exit message (``Exit Code: N``, the reason, a help link) and keeps
    its code and reason for the launcher's one line."""

    def __init__(self) -> None:
        super().__init__()
        self.code: int | None = None
        self.reason = ""

    def filter(self, record: logging.LogRecord) -> bool:
        match = re.match(r"Exit Code: (\d+)\n(.*)", record.getMessage(), re.DOTALL)
        if match is None:
            return True
        self.code = int(match[1])
        self.reason = " ".join(match[2].split("\n\nFor more information")[0].split())
        return False

    def line(self) -> str:
        hint = HINTS.get(self.code or 0, "see Flower's exit code page for this code")
        return (
            f"fedfuse: error: the SuperNode stopped: {self.reason} "
            f"(Flower exit code {self.code}); {hint}"
        )


class UntrustedApp(Exception):
    """The SuperLink sent an app bundle whose hash the platform did not pin."""


def pinned(pull: Callable[..., int | None], trusted: frozenset[str]) -> Callable[..., int | None]:
    """Flower's ``_pull_and_store_message`` with its ``get_fab`` checked against ``trusted``."""
    from flwr.app import Error, Message
    from flwr.common.constant import ErrorCode
    from flwr.supernode import start_client_internal

    def pull_trusted(**kwargs: Any) -> int | None:
        received: list[Message] = []
        receive, get_fab = kwargs["receive"], kwargs["get_fab"]

        def remembering_receive() -> Any:
            got = receive()
            received[:] = [got[0]] if got else []
            return got

        def checked_get_fab(fab_hash: str, run_id: int) -> Any:
            fab = get_fab(fab_hash, run_id)
            digest = hashlib.sha256(fab.content).hexdigest()
            if digest not in trusted:
                raise UntrustedApp(f"run {run_id}: app bundle {digest} is not pinned here")
            return fab

        try:
            return pull(**kwargs | {"receive": remembering_receive, "get_fab": checked_get_fab})
        except UntrustedApp as err:
            log.error("refused: %s (trusted: %s)", err, ", ".join(sorted(trusted)))
            [message] = received
            reply = Message(Error(ErrorCode.INVALID_FAB, str(err)), reply_to=message)
            start_client_internal._insert_message(reply, kwargs["state"], kwargs["object_store"])
            return int(message.metadata.run_id)

    return pull_trusted


def app_digest(text: str) -> str:
    if not SHA256.match(text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a SHA-256 hex digest")
    return text


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Flower's SuperNode, pinned apps only (other arguments: flower-supernode)"
    )
    parser.add_argument("--trust-app", type=app_digest, action="append", required=True)
    ours, flower_args = parser.parse_known_args(argv)
    from flwr.supernode import start_client_internal
    from flwr.supernode.cli.flower_supernode import flower_supernode

    start_client_internal._pull_and_store_message = pinned(  # type: ignore[assignment]
        start_client_internal._pull_and_store_message, frozenset(ours.trust_app)
    )
    os.umask(0o077)  # the installed apps and Flower's files in the platform's state folder
    sys.argv = [sys.argv[0], *flower_args]
    exit_message = _FlowerExit()
    logging.getLogger("flwr").addFilter(exit_message)
    try:
        flower_supernode()
    except SystemExit as stop:
        if not stop.code or exit_message.code is None:
            raise
        # the SuperExec Flower started would otherwise retry this SuperNode for a while
        stop_processes(lambda: psutil.Process().children(recursive=True), timeout=5)
        print(exit_message.line(), file=sys.stderr, flush=True)
        # Flower's exit handlers have run; its force-exit timer would turn this into exit 1
        os._exit(2)


if __name__ == "__main__":
    main()
