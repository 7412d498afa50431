"""Flower's SuperLink with one listener per API: ``python -m server.deployment.superlink_main``.

Flower 1.41 serves its Fleet, Control and Runtime (ServerApp) APIs from one FastAPI app on one
port, and its Control API authenticates nobody without the enterprise OIDC plugin: whoever
reaches the port can register SuperNode keys and start any app. This launcher builds that
very app with Flower's own parser and factory, and serves it on three sockets, each answering
only its own API's paths (any other path is a 404, Swagger and OpenAPI included):

- Fleet (``--fleet-address``, what platforms dial; loopback unless an address is given),
- Control (``--control-address``, the operator's ``flwr`` CLI; loopback by default),
- Runtime (Flower's ``--host/--port``, the ServerApp's API; loopback only).

TLS is Flower's certificate, restricted to TLS ≥ 1.2 with AEAD suites. Every file Flower
creates (state.db, logs, installed apps) is owner-only (umask 077).
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import socket
import ssl
import sys
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from common.errors import FedFuseError

log = logging.getLogger("flwr.fedfuse.superlink")  # Flower's handlers: console and log file

Scope = MutableMapping[str, Any]
Asgi = Callable[[Scope, Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]], Any]

# TLS 1.2 suites with authenticated encryption only (TLS 1.3's suites are all AEAD).
AEAD_CIPHERS = "ECDHE+AESGCM:ECDHE+CHACHA20"
FLEET_PATHS = ("/v1/fleet/", "/health")
CONTROL_PATHS = ("/v1/control/", "/health")
RUNTIME_PATHS = ("/v1/runtime/", "/health")


class ListenerGate:
    """Answers on each listening port only the paths of the API that port is for; the local
    port of a connection (ASGI ``scope["server"]``) says which listener it came in on."""

    def __init__(self, app: Asgi, paths_by_port: dict[int, tuple[str, ...]]) -> None:
        self.app = app
        self.paths_by_port = paths_by_port

    async def __call__(self, scope: Scope, receive: Any, send: Any) -> None:
        if scope["type"] in ("http", "websocket"):
            server = scope.get("server") or ("", 0)
            allowed = self.paths_by_port.get(int(server[1]), ())
            if not scope["path"].startswith(allowed):
                await _not_found(scope, send)
                return
        await self.app(scope, receive, send)


async def _not_found(scope: Scope, send: Any) -> None:
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1008})
        return
    body = b'{"detail":"Not Found"}'
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": 404, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def parse_address(text: str, what: str) -> tuple[str, int]:
    """``HOST:PORT`` or ``[V6]:PORT`` with a literal IP: a listener binds an address."""
    host, sep, port = text.rpartition(":")
    host = host.removeprefix("[").removesuffix("]")
    try:
        ipaddress.ip_address(host)
        number = int(port)
    except ValueError:
        number = -1
    if not sep or not 1 <= number <= 65535:
        raise FedFuseError(f"{what} {text!r}: expected IP:PORT, e.g. 127.0.0.1:9093")
    return host, number


def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        return socket.create_server((host, port), family=family, backlog=2048)
    except OSError as err:
        raise SystemExit(f"{host}:{port}: cannot listen ({err.strerror})") from None


def _harden(context: ssl.SSLContext) -> None:
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    context.set_ciphers(AEAD_CIPHERS)


def serve(fleet: tuple[str, int], control: tuple[str, int]) -> None:
    """Parse Flower's arguments (``sys.argv``), build its app, serve it on the three sockets."""
    import uvicorn
    from flwr.supercore.http_logging import get_uvicorn_log_config
    from flwr.supercore.logger import console_handler
    from flwr.superlink.cli.flower_superlink import (
        SuperLinkLifespan,
        _parse_superlink_lifespan_config,
    )
    from flwr.superlink.main import create_app

    config = _parse_superlink_lifespan_config()
    if config.ssl_certfile is None or config.ssl_keyfile is None:
        raise SystemExit("the SuperLink needs its TLS certificate and key (--ssl-*)")
    runtime = (config.host, config.port)
    if config.host != "localhost" and not ipaddress.ip_address(config.host).is_loopback:
        raise SystemExit(f"--host {config.host}: the Runtime API listens on loopback only")
    ports = [fleet[1], control[1], runtime[1]]
    if len(set(ports)) != 3:
        raise SystemExit(f"Fleet, Control and Runtime need three different ports (got {ports})")
    app = ListenerGate(
        create_app(config, SuperLinkLifespan),
        {fleet[1]: FLEET_PATHS, control[1]: CONTROL_PATHS, runtime[1]: RUNTIME_PATHS},
    )
    server_config = uvicorn.Config(
        app,
        host=config.host,
        port=config.port,
        access_log=True,
        log_config=get_uvicorn_log_config(console_handler.level),
        ssl_keyfile=config.ssl_keyfile,
        ssl_certfile=config.ssl_certfile,
        ssl_ciphers=AEAD_CIPHERS,
        server_header=False,
        workers=1,
    )
    server_config.load()
    if server_config.ssl is None:
        raise SystemExit("uvicorn did not load the TLS certificate")
    _harden(server_config.ssl)
    listeners = {"Fleet": fleet, "Control": control, "Runtime": runtime}
    for name, (host, port) in listeners.items():
        log.info("SuperLink %s API on https://%s:%d", name, host, port)
    sockets = [_listen(*address) for address in listeners.values()]
    uvicorn.Server(server_config).run(sockets=sockets)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description="Flower's SuperLink, one listener per API (other arguments: flower-superlink)"
    )
    parser.add_argument("--fleet-address", required=True, help="IP:PORT platforms dial")
    parser.add_argument("--control-address", required=True, help="IP:PORT of the operator CLI")
    ours, flower_args = parser.parse_known_args(argv)
    try:
        fleet = parse_address(ours.fleet_address, "--fleet-address")
        control = parse_address(ours.control_address, "--control-address")
    except FedFuseError as err:
        raise SystemExit(str(err)) from None
    # The gRPC Fleet and Control servers Flower can add would listen outside this gate.
    for name in ("FLWR_INTERNAL_GRPC_CONTROL_API", "FLWR_INTERNAL_GRPC_FLEET_API"):
        os.environ.pop(name, None)
    os.umask(0o077)
    for arg, value in zip(flower_args, flower_args[1:], strict=False):
        if arg in ("--database", "--log-file"):
            private_tree(Path(value).parent)
    sys.argv = [sys.argv[0], *flower_args]
    serve(fleet, control)


def private_tree(folder: Path) -> None:
    """``folder`` and all below it owner-only (0700 folders, 0600 files): the umask covers what
    Flower creates from now on, this what an earlier start left (0755/0644); owner bits stay."""
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    folder.chmod(0o700)
    for path in folder.rglob("*"):
        if not path.is_symlink():
            path.chmod(0o700 if path.is_dir() else path.stat().st_mode & 0o700)


if __name__ == "__main__":
    main()
