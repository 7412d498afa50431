"""A round that waits on its platforms says so: a console line every ``WAIT_NOTICE_EVERY``
seconds until the replies are in, naming the platforms that answered.

The first round waits for each platform's start-up (noise calibration, minutes for a long run
at small ε, and item encoding). That work runs on the platform, whose log the server's console
does not show (a Ray actor's, or a SuperNode's on another machine), so without these lines a
healthy run looks stuck. Flower's own ``send_and_receive`` waits in silence; this one keeps its
rule (push, then pull until every reply or the timeout) and only adds the lines.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterable
from typing import Any

from flwr.app import Message
from flwr.serverapp import Grid

from server.federation.strategy import reply_platform

log = logging.getLogger(__name__)

WAIT_NOTICE_EVERY = 30.0  # seconds between two "still waiting" lines
PULL_INTERVAL = 3.0  # seconds between two pulls where the grid names none (Flower's gRPC grid)


class DelegatingGrid(Grid):
    """A Grid that hands every call to ``grid``: the base of wrappers that change one."""

    def __init__(self, grid: Grid) -> None:
        self.grid = grid

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        return self.grid.send_and_receive(messages, timeout=timeout)

    def set_run(self, run: Any) -> None:
        self.grid.set_run(run)

    @property
    def run(self) -> Any:
        return self.grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self.grid.create_message(*args, **kwargs)

    def get_node_ids(self) -> Iterable[int]:
        return self.grid.get_node_ids()

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self.grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self.grid.pull_messages(message_ids)


class WaitingGrid(DelegatingGrid):
    """``send_and_receive`` that logs, every ``every`` seconds while replies are missing, how
    many platforms answered and which (``round_offset``: rounds done before this run, so the
    lines number rounds as the rest of the console does)."""

    def __init__(self, grid: Grid, round_offset: int = 0, every: float = WAIT_NOTICE_EVERY) -> None:
        super().__init__(grid)
        self.round_offset = round_offset
        self.every = every

    def send_and_receive(
        self, messages: Iterable[Message], *, timeout: float | None = None
    ) -> Iterable[Message]:
        messages = list(messages)
        what = _what(messages, self.round_offset)
        pending = set(self.grid.push_messages(messages))
        del messages  # the uploads need not live through the wait
        total, replies = len(pending), []
        interval = float(getattr(self.grid, "pull_interval", PULL_INTERVAL))
        started = time.monotonic()
        notice = started + self.every
        while pending and (timeout is None or time.monotonic() - started < timeout):
            got = list(self.grid.pull_messages(pending))
            replies += got
            pending -= {reply.metadata.reply_to_message_id for reply in got}
            if pending and time.monotonic() >= notice:
                notice += self.every
                log.info(
                    "%s: %d of %d platforms answered after %.0f s%s; waiting for the others",
                    what,
                    total - len(pending),
                    total,
                    time.monotonic() - started,
                    _answered(replies),
                )
            if pending:
                time.sleep(interval)
        return replies


def _what(messages: list[Message], round_offset: int) -> str:
    """'round N train' for a Flower strategy's messages (group id = the round of this run)."""
    if not messages:
        return "round"
    metadata = messages[0].metadata
    group = metadata.group_id
    number = str(round_offset + int(group)) if group.isdigit() else group
    return f"round {number} {metadata.message_type}".strip()


def _answered(replies: list[Message]) -> str:
    """' (a, b)': the platforms among ``replies`` that named themselves."""
    names = sorted(name for name in map(reply_platform, replies) if name is not None)
    return f" ({', '.join(names)})" if names else ""
