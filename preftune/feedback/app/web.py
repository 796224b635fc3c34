"""Shared plumbing of the web layer: settings, the per-request database transaction, who is
asking (API token or session cookie), CSRF checks, security headers and the body-size limit."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from datetime import timedelta

from fastapi import HTTPException, Request
from sqlalchemy import bindparam, select
from sqlalchemy.orm import Session

from preftune.feedback.app.db import transaction
from preftune.feedback.app.models import User, WebSession, utcnow
from preftune.feedback.app.security import LoginRateLimiter, new_secret, same_secret, token_hash
from preftune.feedback.app.tasks import Limits

SESSION_COOKIE = "preftune_session"
LOGIN_CSRF_COOKIE = "preftune_login_csrf"
CSRF_HEADER = "X-CSRF-Token"
UNSAFE = ("POST", "PUT", "PATCH", "DELETE")


@dataclass
class Settings:
    max_body_bytes: int = 5_000_000
    limits: Limits = field(default_factory=Limits)
    login_max_failures: int = 5
    login_window_seconds: float = 60.0
    session_hours: float = 12.0
    secure_cookies: bool = False  # set behind HTTPS


def tx(request: Request, readonly: bool = False):
    """One transaction, committed when the block ends: endpoints answer only after the commit,
    so an acknowledged write is durable."""
    return transaction(request.app.state.sessions, readonly)


@dataclass
class Caller:
    user: User
    session: WebSession | None  # None when authenticated by API token


USER_BY_TOKEN = select(User).where(User.token_hash == bindparam("hash"))  # built once: every API call runs it
SESSION_BY_COOKIE = (select(WebSession, User).join(User, WebSession.user_id == User.id)
                     .where(WebSession.token_hash == bindparam("hash")))


def identify(request: Request, session: Session) -> Caller | None:
    auth = request.headers.get("authorization", "")
    if auth:
        scheme, _, token = auth.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            return None
        user = session.scalar(USER_BY_TOKEN, {"hash": token_hash(token.strip())})
        return Caller(user, None) if user else None
    cookie = request.cookies.get(SESSION_COOKIE)
    if not cookie:
        return None
    row = session.execute(SESSION_BY_COOKIE, {"hash": token_hash(cookie)}).first()
    if row is None or row[0].expires_at <= utcnow():
        return None
    return Caller(row[1], row[0])


def api_caller(request: Request, session: Session, *, admin: bool = False) -> User:
    """The authenticated user of an API call; cookie-authenticated writes need the CSRF header."""
    caller = identify(request, session)
    if caller is None:
        raise HTTPException(401, "authentication required: send Authorization: Bearer TOKEN",
                            headers={"WWW-Authenticate": "Bearer"})
    if caller.session is not None and request.method in UNSAFE and not same_secret(
            request.headers.get(CSRF_HEADER), caller.session.csrf_token):
        raise HTTPException(403, f"missing or invalid {CSRF_HEADER} header")
    if admin and caller.user.role != "admin":
        raise HTTPException(403, "admins only")
    return caller.user


def start_session(session: Session, user: User, hours: float) -> tuple[str, WebSession]:
    cookie = new_secret(32)
    web = WebSession(token_hash=token_hash(cookie), user_id=user.id, csrf_token=new_secret(24),
                     expires_at=utcnow() + timedelta(hours=hours))
    session.add(web)
    session.flush()
    return cookie, web


PAGE_CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; object-src 'none'; "
            "base-uri 'none'; frame-ancestors 'none'; form-action 'self'")


SECURITY_HEADERS = [(b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"same-origin"),
                    (b"x-frame-options", b"DENY")]


class SecurityMiddleware:
    """Pure ASGI: refuse oversized bodies (413) before the app reads them, and add security
    headers (a strict Content-Security-Policy on pages: no inline script can ever run)."""

    def __init__(self, app, max_body_bytes: int) -> None:
        self.app, self.max_body_bytes = app, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        length = headers.get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            return await self._too_large(send)
        if length is None and scope.get("method") in ("POST", "PUT", "PATCH"):
            # A chunked body has no length to check: read it here (up to the limit), then replay it,
            # so an oversized upload is a 413 and never half-parsed by the app.
            chunks, size, more = [], 0, True
            while more:
                message = await receive()
                if message["type"] != "http.request":
                    break
                chunks.append(message.get("body", b""))
                size += len(chunks[-1])
                more = message.get("more_body", False)
                if size > self.max_body_bytes:
                    return await self._too_large(send)
            buffered = {"type": "http.request", "body": b"".join(chunks), "more_body": False}
            replayed = False

            async def replay():
                nonlocal replayed
                if replayed:
                    return await receive()
                replayed = True
                return buffered

            limited_receive = replay
        else:
            received = 0

            async def limited_receive():
                nonlocal received
                message = await receive()
                if message["type"] == "http.request":
                    received += len(message.get("body", b""))
                    if received > self.max_body_bytes:
                        raise _TooLarge()
                return message

        async def send_with_headers(message):
            if message["type"] == "http.response.start":
                extra = SECURITY_HEADERS + [(b"content-security-policy", PAGE_CSP.encode())]
                message["headers"] = list(message.get("headers", [])) + extra
            await send(message)

        started = False

        async def send_tracked(message):
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send_with_headers(message)

        try:
            await self.app(scope, limited_receive, send_tracked)
        except _TooLarge:
            await self._too_large(send)
        except Exception:  # a bug: logged, answered as a plain 500 that keeps the security headers
            logging.getLogger("preftune.feedback").exception("unhandled error on %s %s", scope.get("method"),
                                                             scope.get("path"))
            if not started:
                body = b'{"detail": "internal error"}'
                await send_with_headers({"type": "http.response.start", "status": 500, "headers": [
                    (b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
                await send({"type": "http.response.body", "body": body})

    async def _too_large(self, send):
        body = json.dumps({"detail": f"request body larger than {self.max_body_bytes} bytes"}).encode()
        await send({"type": "http.response.start", "status": 413,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                *SECURITY_HEADERS]})
        await send({"type": "http.response.body", "body": body})


class _TooLarge(Exception):
    pass


def make_limiter(settings: Settings) -> LoginRateLimiter:
    return LoginRateLimiter(settings.login_max_failures, settings.login_window_seconds)
