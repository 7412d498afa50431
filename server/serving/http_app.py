"""``fedfuse serve``: one platform's recommendations over HTTP, a JSON API and a small page.

The service is a thin shell over :class:`Recommender`: the run is loaded and the item vectors
computed once at start, and every request only ranks. Errors reach clients as one JSON line,
``{"error": "..."}``, with the status that says whose fault it is (404 unknown user, 413 body
too large, 422 bad request, 500 a bug, logged here and never shown); the service keeps serving.
"""

from __future__ import annotations

import threading
from pathlib import Path

from fastapi import FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse
from pydantic import BaseModel, ConfigDict, Field, model_validator
from starlette.datastructures import Headers
from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from common.errors import FedFuseError
from server.serving.recommender import Recommender, UnknownUser

MAX_BODY = 64 * 1024  # bytes; a request is a user id or a few titles, far below this
MAX_K = 100
PAGE = Path(__file__).with_name("page.html")


class RecommendRequest(BaseModel):
    """Who to recommend for: a user of the platform, or titles liked elsewhere (cold start)."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    user: str | None = Field(None, description="a user id of this platform")
    liked: list[str] | None = Field(
        None,
        description="liked items, newest first: ids or titles of this platform, or titles "
        "liked elsewhere (used as text, stored nowhere); [] means popularity only",
    )
    k: int = Field(10, ge=1, le=MAX_K, description="how many recommendations")

    @model_validator(mode="after")
    def _one_source(self) -> RecommendRequest:
        if (self.user is None) == (self.liked is None):
            raise ValueError("give either 'user' or 'liked', not both or neither")
        return self


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


def _one_line(error: RequestValidationError) -> str:
    """Pydantic's nested errors as one readable line (``k: Input should be less than ...``)."""
    parts = []
    for item in error.errors():
        if item["type"] == "json_invalid":
            parts.append(f"malformed JSON: {item['ctx']['error']} at character {item['loc'][-1]}")
            continue
        where = ".".join(str(p) for p in item["loc"][1:]) or item["loc"][0]
        message = item["msg"].removeprefix("Value error, ")
        if where == "body" and item["type"] != "value_error":  # no JSON object at all
            message = "expected a JSON object, sent as Content-Type: application/json"
        parts.append(f"{where}: {message}")
    return "; ".join(parts)


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
        too_large = _error(413, f"request body over {self.limit // 1024} KiB")
        declared = Headers(scope=scope).get("content-length")
        if declared is not None and int(declared) > self.limit:  # the server checked it is one
            await too_large(scope, receive, send)
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
                await too_large(scope, receive, send)
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


def create_app(recommender: Recommender) -> FastAPI:
    """The service for one loaded platform recommender."""
    # FastAPI's /docs and /redoc pages load their scripts from a CDN; /openapi.json stays.
    app = FastAPI(title=f"FedFuse: {recommender.platform}", docs_url=None, redoc_url=None)
    app.add_middleware(BodyLimit)
    users = recommender.users
    page = PAGE.read_text(encoding="utf-8")
    # One ranking at a time: the tokenizer (a cold-start title is encoded) is not thread-safe,
    # and a single ranking already uses every core torch was given.
    ranking = threading.Lock()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        return _error(422, _one_line(error))

    @app.exception_handler(HTTPException)
    async def _http(_: Request, error: HTTPException) -> JSONResponse:
        return _error(error.status_code, str(error.detail))

    @app.exception_handler(UnknownUser)
    async def _unknown_user(_: Request, error: UnknownUser) -> JSONResponse:
        return _error(404, str(error))

    @app.exception_handler(FedFuseError)
    async def _bad_request(_: Request, error: FedFuseError) -> JSONResponse:
        return _error(422, str(error))

    @app.exception_handler(Exception)
    async def _bug(_: Request, error: Exception) -> JSONResponse:
        # Starlette re-raises it after this response, so uvicorn logs the traceback here.
        return _error(500, "internal error (logged by the service)")

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def home() -> str:
        return page

    @app.get("/health")
    def health() -> dict[str, object]:
        return {
            "status": "ok",
            "platform": recommender.platform,
            "items": len(recommender.data.item_text),
            "users": len(users),
        }

    @app.get("/api/users")
    def list_users(limit: int = Query(100, ge=1, le=10_000)) -> dict[str, object]:
        """User ids for the page's picker (sorted; ``total`` says how many there are)."""
        return {"users": users[:limit], "total": len(users)}

    @app.get("/api/users/{user}")
    def user_history(user: str) -> dict[str, object]:
        """The user's liked items, newest first; the first ``history_len`` drive the ranking."""
        liked, seen = recommender.user_history(user)
        return {
            "user": user,
            "liked": [vars(h) for h in liked],
            "seen": len(seen),
            "history_len": recommender.history_len,
        }

    @app.post("/api/recommend")
    def recommend(request: RecommendRequest) -> dict[str, object]:
        """Top-K with explanations; the same document as ``fedfuse recommend --json``."""
        with ranking:
            return recommender.document(request.user, request.liked, request.k)

    return app


def serve(recommender: Recommender, host: str, port: int) -> None:
    """Serve until interrupted (Ctrl-C or SIGTERM end it cleanly)."""
    import uvicorn

    uvicorn.run(create_app(recommender), host=host, port=port, log_level="info")
