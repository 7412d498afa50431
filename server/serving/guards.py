"""The ASGI wrappers every request and response of ``fedfuse serve`` passes (outermost
first): refusals sent late, security headers on every response, and the body limit before
anything is parsed. Apart from the API (``http_app.py``) because they know nothing of it."""

from __future__ import annotations

import asyncio

from fastapi.responses import JSONResponse
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

MAX_BODY = 64 * 1024  # bytes; a request is a user id or a few titles, far below this
# Seconds before a refusal (4xx, 503) is sent: a caller repeating refused requests gets at
# most 1/ERROR_PACE answers a second per connection (no valid request is ever refused).
ERROR_PACE = 0.25

SECURITY_HEADERS = {
    # only the page's own script and style, fetches to this origin, never inside a frame
    "content-security-policy": "default-src 'none'; script-src 'self'; style-src 'self'; "
    "connect-src 'self'; img-src 'self'; base-uri 'none'; form-action 'none'; "
    "frame-ancestors 'none'",
    "x-content-type-options": "nosniff",
    "x-frame-options": "DENY",
    "cache-control": "no-store",
    "referrer-policy": "no-referrer",
    "cross-origin-opener-policy": "same-origin",
    "cross-origin-resource-policy": "same-origin",
}


class BodyLimit:
    """Answers 413 to a body over ``limit`` bytes, by its Content-Length or, for a chunked or
    understated one, by the bytes that actually arrive; the app sees the body only when it
    fits, so nothing large is ever parsed."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and int(declared) > self.limit:  # the server checked it is one
            await self._too_large(scope, receive, send)
            return
        chunks: list[bytes] = []
        size, more = 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            if size > self.limit:
                await self._too_large(scope, receive, send)
                return
            more = message.get("more_body", False)
        pending: bytes | None = b"".join(chunks)

        async def replay() -> Message:
            nonlocal pending
            if pending is None:
                return await receive()  # after the body: the client's disconnect
            message: Message = {"type": "http.request", "body": pending, "more_body": False}
            pending = None
            return message

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, receive: Receive, send: Send) -> None:
        """The 413, built only for a request that gets it."""
        error = {"error": f"request body over {self.limit // 1024} KiB"}
        await JSONResponse(error, status_code=413)(scope, receive, send)


class SecurityHeaders:
    """Adds :data:`SECURITY_HEADERS` to every response, errors and rejections included."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in SECURITY_HEADERS.items():
                    headers[name] = value
            await send(message)

        await self.app(scope, receive, send_with_headers)


class PacedRefusals:
    """Sends every refusal (4xx, 503) ``pace`` seconds late, without holding a worker.

    A refusal is cheap for the service, but a client that sends refused requests as fast as
    it gets answers makes it answer hundreds a second, and the people asking valid requests
    wait behind them on the same event loop; answered late, such a client sends only
    1/``pace`` a second per connection. A valid request is never refused, so it never
    waits (a 429 or 503 waits too: it asks the caller to slow down)."""

    def __init__(self, app: ASGIApp, pace: float = ERROR_PACE) -> None:
        self.app = app
        self.pace = pace

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.pace <= 0:
            await self.app(scope, receive, send)
            return

        async def paced(message: Message) -> None:
            if message["type"] == "http.response.start" and _refusal(message["status"]):
                await asyncio.sleep(self.pace)
            await send(message)

        await self.app(scope, receive, paced)


def _refusal(status: int) -> bool:
    return 400 <= status < 500 or status == 503
