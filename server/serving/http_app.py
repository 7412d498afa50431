"""``fedfuse serve``: one platform's recommendations over HTTP, a JSON API and a small page.

The service is a thin shell over :class:`Recommender`: the run is loaded, the item vectors
computed and the title index built once at start; a request only looks up and ranks. It is
meant to be reachable by a platform's gateway and, through it, by the public, so
(docs/serving.md has the threat model):

- every API call names its caller with a bearer token (:mod:`server.serving.access`): a
  user's token gets that user's recommendations only, the operator's everything;
- user ids travel in bodies and tokens, never in URLs, and no access log is written;
- requests are bounded (body, list and title lengths, ``k``), charged to a per-caller rate
  limit by cost, and run in two bounded lanes — catalogue-only rankings, and rankings that
  run the encoder on titles from elsewhere — so a flood of the slow kind cannot queue the
  fast kind; a full lane answers 503 at once;
- the Host header must be one of the service's names (DNS rebinding), responses carry a
  strict CSP and no-store, the page's script and style are files the CSP allows;
- every refusal is sent :data:`ERROR_PACE` late (:class:`PacedRefusals`), so a client
  repeating bad requests cannot make the service answer hundreds a second;
- errors reach clients as one JSON line, ``{"error": "..."}``, with the status that says
  whose fault it is (401/403 credentials, 404 unknown user, 413 body too large, 422 bad
  request, 429 rate limit, 503 busy, 500 a bug — logged here and never shown).
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Annotated

from fastapi import Depends, FastAPI, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, StrictInt, model_validator
from starlette.exceptions import HTTPException
from starlette.middleware.trustedhost import TrustedHostMiddleware

from common.errors import FedFuseError
from common.platform_data import MAX_ID_CHARS, MAX_TEXT_CHARS
from server.serving.access import Caller, RateLimit, Tokens
from server.serving.guards import ERROR_PACE, BodyLimit, PacedRefusals, SecurityHeaders
from server.serving.recommender import Recommender, UnknownUser, valid_text

MAX_K = 100
MAX_LIKED = 100  # entries of a liked list; only the newest history_len of them are read
MAX_TITLE = MAX_TEXT_CHARS  # characters of one entry: a catalogue text is at most this long
MAX_TOKEN_LIFETIME_S = 7 * 24 * 3600
LOOPBACK_NAMES = ("127.0.0.1", "localhost")
# Per caller: units per second and at most this many saved up; a request costs 1, plus
# ENCODE_COST per title from elsewhere (the encoder runs on it: ~20 ms of a core each).
RATE, BURST, ENCODE_COST = 20.0, 60.0, 2.0
# Lanes: (rankings at once, requests allowed to wait, share of a core); beyond: 503 at once.
RANK_LANE, ENCODE_LANE = (2, 16, 1.0), (1, 2, 0.25)
STATIC = Path(__file__).parent
PAGES = {  # path -> (file beside this module, content type)
    "/": ("page.html", "text/html; charset=utf-8"),
    "/page.js": ("page.js", "text/javascript; charset=utf-8"),
    "/page.css": ("page.css", "text/css; charset=utf-8"),
}
_CHALLENGE = {"WWW-Authenticate": "Bearer"}


def _text(what: str) -> AfterValidator:
    """A pydantic check that answers invalid Unicode with 422 (the tokenizer and the JSON
    encoder of the reply would fail on it as a 500)."""

    def check(value: str) -> str:
        try:
            return valid_text(value, what)
        except FedFuseError as err:
            raise ValueError(str(err)) from None

    return AfterValidator(check)


UserId = Annotated[str, Field(min_length=1, max_length=MAX_ID_CHARS), _text("the user id")]
Title = Annotated[str, Field(max_length=MAX_TITLE), _text("a liked title or id")]


class RecommendRequest(BaseModel):
    """Who to recommend for: a user of the platform, or titles liked elsewhere (cold start)."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    user: UserId | None = Field(None, description="a user id of this platform")
    liked: list[Title] | None = Field(
        None,
        max_length=MAX_LIKED,
        description="liked items, newest first: ids or titles of this platform, or titles "
        "liked elsewhere (used as text, stored nowhere); [] means popularity only",
    )
    k: StrictInt = Field(10, ge=1, le=MAX_K, description="how many recommendations")

    @model_validator(mode="after")
    def _one_source(self) -> RecommendRequest:
        if (self.user is None) == (self.liked is None):
            raise ValueError("give either 'user' or 'liked', not both or neither")
        return self


class HistoryRequest(BaseModel):
    """Whose history: the caller's own when ``user`` is left out."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    user: UserId | None = None


class TokenRequest(BaseModel):
    """A user token to mint (operator only): for whom, and for how long."""

    model_config = ConfigDict(extra="forbid", coerce_numbers_to_str=True)

    user: UserId
    lifetime_s: StrictInt = Field(3600, ge=60, le=MAX_TOKEN_LIFETIME_S)


class Busy(Exception):
    """A lane is full: the request is turned away now rather than queued without end."""


class Lane:
    """At most ``workers`` requests at once and ``waiting`` more queued; beyond, :class:`Busy`.

    ``duty`` < 1 also rests the lane after each request for as long as keeps its work to that
    share of one core (a 0.4 s encoding at 0.25 closes it for 1.2 s): the encoder is the one
    costly step, so however many callers ask for it, it leaves the other cores' time to the
    catalogue rankings."""

    def __init__(self, workers: int, waiting: int, duty: float = 1.0) -> None:
        self._running = threading.Semaphore(workers)
        self._admitted = threading.Semaphore(workers + waiting)
        self._duty = duty
        self._rest_until = 0.0

    @contextlib.contextmanager
    def slot(self) -> Iterator[None]:
        if time.monotonic() < self._rest_until or not self._admitted.acquire(blocking=False):
            raise Busy
        try:
            with self._running:
                start = time.monotonic()
                try:
                    yield
                finally:
                    now = time.monotonic()
                    rest = (now - start) * (1 / self._duty - 1)
                    self._rest_until = max(self._rest_until, now + rest)
        finally:
            self._admitted.release()


def _error(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


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


_bearer = HTTPBearer(auto_error=False, description="a user token or the operator token")


async def _caller(
    request: Request,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Caller:
    """Who is asking: checked before the body is validated or anything is looked up, so a
    stranger costs a parse of at most ``guards.MAX_BODY`` bytes and nothing more."""
    tokens: Tokens | None = request.app.state.tokens
    if tokens is None:
        address = request.client.host if request.client else "unknown"
        return Caller(None, f"address:{address}")
    if credentials is None:
        raise HTTPException(401, "send Authorization: Bearer <token>", _CHALLENGE)
    found = tokens.verify(credentials.credentials)
    if found is None:
        raise HTTPException(401, "invalid or expired token", _CHALLENGE)
    return found


Who = Annotated[Caller, Depends(_caller)]


def create_app(
    recommender: Recommender,
    tokens: Tokens | None,
    allowed_hosts: Sequence[str] = LOOPBACK_NAMES,
    openapi: bool = False,
    rate_limit: RateLimit | None = None,
    error_pace: float = ERROR_PACE,
) -> FastAPI:
    """The service for one loaded platform recommender. ``tokens`` None is the open mode
    (every caller is the operator, limited by address): ``fedfuse serve`` allows it only on
    loopback and when told ``--insecure-no-auth``."""
    # FastAPI's /docs and /redoc load their scripts from a CDN (the CSP forbids it); the
    # schema itself is served only when asked for, as it maps the surface for a prober.
    app = FastAPI(
        title=f"FedFuse: {recommender.platform}",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json" if openapi else None,
    )
    app.add_middleware(BodyLimit)
    app.add_middleware(TrustedHostMiddleware, allowed_hosts=list(allowed_hosts))
    app.add_middleware(SecurityHeaders)  # on the Host and body rejections too
    app.add_middleware(PacedRefusals, pace=error_pace)  # outermost: every refusal is paced
    limiter = rate_limit or RateLimit(RATE, BURST)
    lanes = {"rank": Lane(*RANK_LANE), "encode": Lane(*ENCODE_LANE)}
    pages = {path: ((STATIC / name).read_bytes(), kind) for path, (name, kind) in PAGES.items()}
    app.state.tokens = tokens

    def operator_only(who: Caller) -> None:
        if not who.operator:
            raise HTTPException(403, "only the platform's operator may do this")

    def for_whom(who: Caller, user: str | None) -> str | None:
        """The user a request may be about: a user's own id only (403 before any look-up, so
        a refusal never tells whether another user exists)."""
        if who.operator:
            return user
        if user is not None and user != who.user:
            raise HTTPException(403, "a user token answers for its own user only")
        return who.user

    def charge(who: Caller, cost: float) -> None:
        if who.bucket is None:
            return
        wait = limiter.take(who.bucket, cost)
        if wait:
            seconds = str(math.ceil(wait))
            raise HTTPException(429, f"rate limit: retry in {seconds} s", {"Retry-After": seconds})

    @app.exception_handler(RequestValidationError)
    async def _invalid(_: Request, error: RequestValidationError) -> JSONResponse:
        return _error(422, _one_line(error))

    @app.exception_handler(HTTPException)
    async def _http(_: Request, error: HTTPException) -> JSONResponse:
        return _error(error.status_code, str(error.detail), error.headers)

    @app.exception_handler(UnknownUser)
    async def _unknown_user(_: Request, error: UnknownUser) -> JSONResponse:
        return _error(404, str(error))

    @app.exception_handler(FedFuseError)
    async def _bad_request(_: Request, error: FedFuseError) -> JSONResponse:
        return _error(422, str(error))

    @app.exception_handler(Busy)
    async def _busy(_: Request, error: Busy) -> JSONResponse:
        return _error(503, "busy: retry shortly", {"Retry-After": "1"})

    @app.exception_handler(Exception)
    async def _bug(_: Request, error: Exception) -> JSONResponse:
        # Starlette re-raises it after this response, so uvicorn logs the traceback here.
        return _error(500, "internal error (logged by the service)")

    for path, (body, kind) in pages.items():
        app.add_api_route(path, _static(body, kind), methods=["GET"], include_in_schema=False)

    @app.get("/health")
    async def health() -> dict[str, object]:
        """Liveness for a load balancer: says nothing about the platform."""
        return {"status": "ok"}

    @app.get("/api/session")
    async def session(who: Who) -> dict[str, object]:
        """Who the caller is and what the page needs to know about the platform."""
        return {
            "role": "operator" if who.operator else "user",
            "user": who.user,
            "open": tokens is None,
            "platform": recommender.platform,
            "items": len(recommender.data.item_text),
            "users": len(recommender.users) if who.operator else None,
            "history_len": recommender.history_len,
        }

    @app.get("/api/users")
    async def list_users(
        who: Who, limit: Annotated[int, Query(ge=1, le=10_000)] = 100
    ) -> dict[str, object]:
        """User ids for the operator's picker (sorted; ``total`` says how many there are)."""
        operator_only(who)
        return {"users": recommender.users[:limit], "total": len(recommender.users)}

    @app.post("/api/history")
    async def user_history(request: HistoryRequest, who: Who) -> dict[str, object]:
        """The user's liked items, newest first; the first ``history_len`` drive the ranking."""
        user = for_whom(who, request.user)
        if user is None:
            raise HTTPException(422, "user: the operator names the user")
        charge(who, 1)
        liked, seen = recommender.user_history(user)
        return {
            "user": user,
            "liked": [recommender.shown(h) for h in liked],
            "seen": len(seen),
            "history_len": recommender.history_len,
        }

    @app.post("/api/recommend")
    def recommend(request: RecommendRequest, who: Who) -> JSONResponse:
        """Top-K with explanations; the same document as ``fedfuse recommend --json``."""
        user = None if request.user is None else for_whom(who, request.user)
        history, seen = recommender.history_for(user, request.liked)
        foreign = sum(h.row is None for h in history)
        charge(who, 1 + ENCODE_COST * foreign)
        with lanes["encode" if foreign else "rank"].slot():
            recommendations = recommender.recommend(history, seen, request.k)
        # as a JSONResponse: FastAPI would otherwise walk the document (jsonable_encoder)
        return JSONResponse(recommender.as_document(user, history, recommendations))

    @app.post("/api/tokens")
    async def mint(request: TokenRequest, who: Who) -> dict[str, object]:
        """A token that answers for ``user`` only, for the platform's login service to hand
        to a signed-in person (operator only)."""
        operator_only(who)
        if tokens is None:
            raise HTTPException(409, "the service runs without tokens (--insecure-no-auth)")
        expires = int(time.time()) + request.lifetime_s
        token = tokens.mint(request.user, expires)
        return {"user": request.user, "token": token, "expires": expires}

    return app


def _static(body: bytes, kind: str) -> Callable[[], Response]:
    """A route answering one of the page's files, read once at start."""

    async def page() -> Response:
        return Response(body, media_type=kind)

    return page
