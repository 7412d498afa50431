"""How ``fedfuse serve`` listens: the socket bound before the run is loaded (a wrong port is
one line, not uvicorn's traceback), and uvicorn with what it lacks for a public service — a
deadline for a whole request to arrive, a cap on an unfinished request head and on open
connections, no server header and no request line in any log. What the service answers is
``http_app.py``'s."""

from __future__ import annotations

import ipaddress
import socket
from typing import TYPE_CHECKING, Any

import h11

from common.errors import ConfigError

if TYPE_CHECKING:
    import uvicorn
    from fastapi import FastAPI

REQUEST_READ_TIMEOUT_S = 10.0  # for a whole request (head and body) to arrive
MAX_HEAD = 16 * 1024  # bytes of request line and headers
MAX_CONNECTIONS = 256  # open at once; more are closed on arrival (the file limit is finite)


def is_loopback(host: str) -> bool:
    """Whether ``host`` names only this machine (a name is resolved, every address checked)."""
    try:
        infos = socket.getaddrinfo(host, None)
    except OSError:
        return False
    return all(ipaddress.ip_address(info[4][0]).is_loopback for info in infos)


def listen(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port``, checked before the run is loaded so a wrong port
    fails in a second and as one line (uvicorn would wrap 70000 to 4464, and log a bind
    failure as a traceback with exit 1)."""
    if not 1 <= port <= 65535:
        raise ConfigError(f"port {port}: give one from 1 to 65535")
    try:
        family, kind, proto, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except OSError as err:
        raise ConfigError(f"cannot listen on {host}: {err.strerror or err}") from None
    sock = socket.socket(family, kind, proto)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(address)
    except OSError as err:
        sock.close()
        raise ConfigError(f"cannot listen on {host}:{port} ({err.strerror or err})") from None
    return sock


def _guarded_protocol() -> type:
    """uvicorn's h11 protocol with what it lacks: a deadline for a whole request to arrive.

    uvicorn times out only idle keep-alive connections, so a client dripping its headers a
    byte at a time (slow loris), or connecting and sending nothing, held its connection
    forever; and its default parser (httptools) has no header size limit. Here a request
    must arrive within :data:`REQUEST_READ_TIMEOUT_S` of the connection or of the previous
    response, h11 caps an unfinished head at :data:`MAX_HEAD`, connections beyond
    :data:`MAX_CONNECTIONS` are closed as they arrive, and no request line is ever logged.
    """
    import asyncio

    from uvicorn.protocols.http.h11_impl import H11Protocol

    class GuardedH11Protocol(H11Protocol):
        _deadline: asyncio.TimerHandle | None = None

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            # uvicorn logs request lines whenever its access logger has a handler anywhere
            # up the tree, whatever access_log says; these lines carry client addresses.
            self.access_log = False

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            if len(self.connections) > MAX_CONNECTIONS:
                transport.abort()
                return
            self._arm()

        def _arm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            self._deadline = self.loop.call_later(REQUEST_READ_TIMEOUT_S, self._expire)

        def _expire(self) -> None:
            """Close unless the request has fully arrived (then the app is answering it)."""
            if self.conn.their_state is not h11.DONE and not self.transport.is_closing():
                self.transport.close()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
            super().connection_lost(exc)

    return GuardedH11Protocol


def server_config(app: FastAPI) -> uvicorn.Config:
    """uvicorn's settings for the service: the guarded protocol, bounded connections, and
    nothing that names the server or logs a request line."""
    import uvicorn

    return uvicorn.Config(
        app,
        http=_guarded_protocol(),
        h11_max_incomplete_event_size=MAX_HEAD,
        timeout_keep_alive=5,
        limit_concurrency=MAX_CONNECTIONS // 2,
        server_header=False,  # no "Server: uvicorn"
        access_log=False,  # its lines carry client addresses (and once carried user ids)
        lifespan="off",
        log_level="info",
    )


def serve(app: FastAPI, sock: socket.socket) -> None:
    """Serve on the bound ``sock`` until interrupted (Ctrl-C or SIGTERM end it cleanly).

    torch gets one thread: a ranking is one small matrix product, and one thread per
    request leaves the other cores to concurrent requests (on 2 busy cores a top-10 took
    66 ms with two threads against 1 ms with one, as the threads waited on each other).
    """
    import torch
    import uvicorn

    torch.set_num_threads(1)
    uvicorn.Server(server_config(app)).run(sockets=[sock])
