"""Passwords (argon2), API tokens and session cookies (stored as SHA-256 hashes), CSRF tokens,
and a log-in rate limiter."""

from __future__ import annotations

import hashlib
import hmac
import secrets
import threading
import time
from collections import defaultdict, deque

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError

_hasher = PasswordHasher()


def hash_password(password: str) -> str:
    return _hasher.hash(password)


_DUMMY_HASH: list[str] = []


def verify_no_user(password: str) -> bool:
    """As long as a failing ``verify_password``, for a name that has no user: the log-in's timing
    must not tell which names exist. Always False."""
    if not _DUMMY_HASH:
        _DUMMY_HASH.append(hash_password(new_secret(16)))
    verify_password(_DUMMY_HASH[0], password)
    return False


def verify_password(password_hash: str, password: str) -> bool:
    try:
        return _hasher.verify(password_hash, password)
    except (VerificationError, InvalidHashError):
        return False


def new_secret(nbytes: int = 24) -> str:
    """A random URL-safe secret (tokens, session ids, CSRF tokens, passwords)."""
    return secrets.token_urlsafe(nbytes)


def token_hash(token: str) -> str:
    """Tokens are long random strings, so a fast hash is enough (no dictionary to attack)."""
    return hashlib.sha256(token.encode()).hexdigest()


def same_secret(a: str | None, b: str | None) -> bool:
    return bool(a) and bool(b) and hmac.compare_digest(a.encode(), b.encode())


class LoginRateLimiter:
    """At most ``max_failures`` failed log-ins per client address and per user name within
    ``window`` seconds; a success does not reset the count (no guessing between successes)."""

    def __init__(self, max_failures: int = 5, window: float = 60.0) -> None:
        self.max_failures, self.window = max_failures, window
        self._failures: dict[str, deque[float]] = defaultdict(deque)
        self._lock = threading.Lock()

    def _recent(self, key: str, now: float) -> deque[float]:
        q = self._failures[key]
        while q and q[0] <= now - self.window:
            q.popleft()
        return q

    def retry_after(self, *keys: str) -> float:
        """Seconds until a new attempt is allowed (0: allowed now)."""
        now = time.monotonic()
        with self._lock:
            waits = [q[0] + self.window - now for k in keys
                     if len(q := self._recent(k, now)) >= self.max_failures]
        return max(waits, default=0.0)

    def failed(self, *keys: str) -> None:
        now = time.monotonic()
        with self._lock:
            for k in keys:
                self._recent(k, now).append(now)
