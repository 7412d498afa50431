"""Who may ask ``fedfuse serve`` for what: the operator's token, per-user signed tokens, and
a per-caller rate limit (docs/serving.md gives the threat model behind them).

- The **operator token** is a random secret kept in a 0600 file in the platform's state
  folder (made on first start). Whoever holds it is the platform: any user's
  recommendations and history, the user list, and minting user tokens.
- A **user token** is ``user.expiry.signature``: the user id (base64url), a Unix expiry and
  an HMAC-SHA256 over both with a key derived from the operator token. The platform's login
  service mints one for a signed-in person (``POST /api/tokens`` or :func:`mint_user_token`);
  the service then answers for that user only. Stateless: nothing is stored per user.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import os
import secrets
import stat
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from common.errors import ConfigError

TOKEN_FILE = "serve.token"  # in the platform's state folder, beside its private part
MIN_TOKEN_CHARS = 32
_USER_KEY_LABEL = b"fedfuse serve user tokens v1"


@dataclass(frozen=True)
class Caller:
    """A verified caller: the operator (``user`` None), or one user of the platform."""

    user: str | None
    bucket: str | None  # whose rate-limit bucket it draws on; None: not limited

    @property
    def operator(self) -> bool:
        return self.user is None


def read_or_create_token(path: Path) -> tuple[str, bool]:
    """The operator token in ``path``, made (0600, exclusively) if missing; and whether it
    was made. A file others can read, or a short token, is refused: it would not be a secret."""
    try:
        descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except FileExistsError:
        pass
    except OSError as err:
        raise ConfigError(f"{path}: cannot create the service token ({err.strerror})") from None
    else:
        token = secrets.token_urlsafe(32)
        with os.fdopen(descriptor, "w", encoding="ascii") as out:
            out.write(token + "\n")
        return token, True
    try:
        mode = path.stat().st_mode
        token = path.read_text(encoding="ascii").strip()
    except (OSError, UnicodeDecodeError) as err:
        raise ConfigError(f"{path}: cannot read the service token ({err})") from None
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ConfigError(f"{path}: readable by others (mode {mode & 0o777:o}); chmod 600 it")
    if len(token) < MIN_TOKEN_CHARS or not token.isascii() or not token.isprintable():
        raise ConfigError(f"{path}: not a service token (at least {MIN_TOKEN_CHARS} characters)")
    return token, False


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


class Tokens:
    """Checks bearer tokens against one operator token (compare_digest: no timing oracle)."""

    def __init__(self, operator_token: str) -> None:
        self._operator = operator_token.encode("ascii")
        self._key = hmac.new(self._operator, _USER_KEY_LABEL, hashlib.sha256).digest()

    def mint(self, user: str, expires: int) -> str:
        """A token for ``user`` valid until the Unix time ``expires``."""
        body = f"{_b64(user.encode('utf-8'))}.{expires}"
        signature = hmac.new(self._key, body.encode("ascii"), hashlib.sha256).digest()
        return f"{body}.{_b64(signature)}"

    def verify(self, token: str, now: float | None = None) -> Caller | None:
        """The caller this token proves, or None (unknown, forged, malformed or expired)."""
        raw = token.encode("utf-8", "replace")
        if hmac.compare_digest(raw, self._operator):
            return Caller(None, None)  # the platform itself: not rate limited
        parts = token.split(".")
        if len(parts) != 3 or not (parts[1].isascii() and parts[1].isdigit()):
            return None
        body = f"{parts[0]}.{parts[1]}".encode("ascii", "replace")
        expected = hmac.new(self._key, body, hashlib.sha256).digest()
        try:
            valid = hmac.compare_digest(_unb64(parts[2]), expected)
            user = _unb64(parts[0]).decode("utf-8")
        except (binascii.Error, ValueError):
            return None
        if not valid or int(parts[1]) <= (time.time() if now is None else now):
            return None
        return Caller(user, f"user:{user}")


def mint_user_token(operator_token: str, user: str, lifetime_s: int) -> str:
    """What a platform's login service runs after signing a person in (it holds the operator
    token); the same as ``POST /api/tokens``."""
    return Tokens(operator_token).mint(user, int(time.time()) + lifetime_s)


class RateLimit:
    """A token bucket per caller: ``burst`` units at most, refilled at ``rate`` per second; a
    request costs units by the work it asks for (a title from elsewhere runs the encoder).

    Kept here rather than taken from slowapi: the bucket is keyed by the *verified* caller
    (known only after the bearer check) and charged by the body's cost, and slowapi limits
    counts of requests per key function; this is 30 lines, in memory, like slowapi's default.
    """

    def __init__(self, rate: float, burst: float, max_callers: int = 100_000) -> None:
        self.rate, self.burst, self.max_callers = rate, burst, max_callers
        self._buckets: dict[str, tuple[float, float]] = {}  # caller -> (units, at)
        self._lock = threading.Lock()

    def take(self, caller: str, cost: float) -> float:
        """0 if ``cost`` units were taken, else the seconds until they would be there."""
        now = time.monotonic()
        with self._lock:
            units, at = self._buckets.get(caller, (self.burst, now))
            units = min(self.burst, units + (now - at) * self.rate)
            if units < cost:
                self._buckets[caller] = (units, now)
                return (cost - units) / self.rate
            if len(self._buckets) >= self.max_callers and caller not in self._buckets:
                self._forget_full(now)
            self._buckets[caller] = (units - cost, now)
            return 0.0

    def _forget_full(self, now: float) -> None:
        """Drop the buckets that have refilled: a new bucket starts full, so nothing is lost
        (memory stays bounded by the callers active within ``burst / rate`` seconds)."""
        for caller, (units, at) in list(self._buckets.items()):
            if units + (now - at) * self.rate >= self.burst:
                del self._buckets[caller]
