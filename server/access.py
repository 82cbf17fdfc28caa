"""Nobody in without credentials: an ASGI middleware that finds who a request acts as (an
API token in `Authorization: Bearer`, or a panel session cookie) and turns away requests
for anything but the open routes without one.

What a principal may do once in (roles) is decided in the domain/GraphQL layer; this only
decides who it is. A WebSocket's credentials may also come in graphql-transport-ws's
`connection_init` payload, so a WebSocket passes with whatever the handshake carried and
its handler decides (closing 4401/4403).
"""

from __future__ import annotations

import ipaddress
import json
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any
from urllib.parse import quote

from itsdangerous import BadSignature, Signer
from starlette.datastructures import Headers
from starlette.requests import cookie_parser
from starlette.responses import PlainTextResponse, RedirectResponse, Response
from starlette.types import ASGIApp, Receive, Scope, Send

from runner.store_errors import database_unreachable
from server.auth import (
    Principal,
    SessionPolicy,
    TokenHasher,
    end_session,
    find_live_token,
    find_session,
    looks_like_api_token,
    needs_touch,
    session_principal,
    token_principal,
    touch_api_token,
    touch_session,
)
from server.db import READ_ONLY

if TYPE_CHECKING:
    from collections.abc import Awaitable, Callable

    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

log = logging.getLogger("corral.access")

PRINCIPAL_SCOPE_KEY = "corral.principal"
SESSION_COOKIE = "corral_session"
# /logout: with an expired session it still clears the cookie (CSRF-checked with a live one).
OPEN_PATHS = frozenset({"/healthz", "/readyz", "/login", "/logout", "/favicon.ico"})
OPEN_PREFIXES = ("/static/",)
METRICS_PATH = "/metrics"
# A long-lived stream (a WebSocket, an SSE log stream) checks its credential again this
# often, and ends once it no longer authenticates (revoked, expired, logged out).
CREDENTIAL_RECHECK_SECONDS = 30.0


def principal_of(scope: Scope) -> Principal | None:
    """Who the request acts as (set by AccessControl), or None."""
    principal: Principal | None = scope.get(PRINCIPAL_SCOPE_KEY)
    return principal


def session_signer(hasher: TokenHasher) -> Signer:
    """Signs the session cookie (itsdangerous): a tampered or forged cookie is refused
    before any database lookup."""
    return Signer(hasher.derive("corral session cookie"), salt="corral.session")


def bearer_token(headers: Headers) -> str | None:
    """The token of an `Authorization: Bearer ...` header ('' when malformed), None when
    there is no such header."""
    value = headers.get("authorization")
    if value is None:
        return None
    scheme, _, token = value.strip().partition(" ")
    return token.strip() if scheme.lower() == "bearer" else ""


class Authenticator:
    """Resolves credentials to a principal against the database."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        hasher: TokenHasher,
        policy: SessionPolicy,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.hasher = hasher
        self.policy = policy
        self.signer = session_signer(hasher)

    # Credentials are read on a read-only connection (on SQLite, no write lock for every
    # request: it would queue behind the runner's log writes); the rare write (a last-used
    # time a minute old, an expired session) is a transaction of its own.
    async def from_token(self, token: str) -> Principal | None:
        if not looks_like_api_token(token):
            return None
        async with self.sessionmaker() as session:
            await session.connection(execution_options=READ_ONLY)
            row = await find_live_token(session, self.hasher, token)
            await session.commit()
        if row is None:
            return None
        if needs_touch(row.last_used_at):
            await self._write(touch_api_token, row.id)
        return token_principal(row)

    async def from_cookie(self, cookie: str) -> Principal | None:
        try:
            raw_id = self.signer.unsign(cookie).decode()
        except (BadSignature, UnicodeDecodeError):
            return None
        async with self.sessionmaker() as session:
            await session.connection(execution_options=READ_ONLY)
            found = await find_session(session, self.hasher, raw_id, self.policy)
            await session.commit()
        if found is None:
            return None
        if found.expired:
            await self._write(end_session, found.row.id)
            return None
        if found.user is None:
            return None
        if needs_touch(found.row.last_seen_at):
            await self._write(touch_session, found.row.id)
        return session_principal(found.user, found.row)

    async def _write(self, change: Callable[[AsyncSession, int], Awaitable[None]], pk: int) -> None:
        async with self.sessionmaker() as session:
            await change(session, pk)
            await session.commit()

    def cookie_value(self, raw_id: str) -> str:
        """What the session cookie holds for a session id: the id, signed."""
        return self.signer.sign(raw_id).decode()

    async def from_headers(self, headers: Headers) -> tuple[Principal | None, bool]:
        """(principal, whether credentials were offered but refused)."""
        token = bearer_token(headers)
        if token is not None:
            principal = await self.from_token(token) if token else None
            return principal, principal is None
        cookie = cookie_parser(headers.get("cookie", "")).get(SESSION_COOKIE)
        if cookie:
            principal = await self.from_cookie(cookie)
            return principal, False  # a stale cookie is like none: log in again
        return None, False


def _networks(addresses: Iterable[str]) -> list[ipaddress.IPv4Network | ipaddress.IPv6Network]:
    return [ipaddress.ip_network(address.strip(), strict=False) for address in addresses]


def _address_in(address: str | None, networks: list[Any]) -> bool:
    if address is None or not networks:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    return any(ip in network for network in networks)


def is_open_path(path: str) -> bool:
    """Routes anyone may reach: health, readiness, the login page, static assets."""
    return path in OPEN_PATHS or path.startswith(OPEN_PREFIXES)


def wants_html(scope: Scope, headers: Headers) -> bool:
    """A browser navigating (to be sent to the login page rather than given a 401)."""
    return scope["method"] in ("GET", "HEAD") and "text/html" in headers.get("accept", "")


def unauthorised(scope: Scope, headers: Headers, refused: bool) -> Response:
    """401 for API clients (a GraphQL-shaped body on /graphql), a redirect for browsers."""
    if not refused and wants_html(scope, headers):
        target = scope["path"] + (
            f"?{scope['query_string'].decode('latin-1')}" if scope["query_string"] else ""
        )
        return RedirectResponse(f"/login?next={quote(target, safe='')}", status_code=303)
    reason = (
        "the API token is invalid, revoked or expired"
        if refused
        else "authentication required: send `Authorization: Bearer crl_...` (an API token) "
        "or log in"
    )
    challenge = {"WWW-Authenticate": 'Bearer realm="corral"'}
    if scope["path"] == "/graphql":
        body = json.dumps(
            {"errors": [{"message": reason, "extensions": {"code": "UNAUTHENTICATED"}}]}
        )
        return Response(body, 401, challenge, media_type="application/json")
    return PlainTextResponse(reason, 401, challenge)


UNAVAILABLE = "the database is unreachable for a moment: try again shortly"


async def refuse_unavailable(scope: Scope, receive: Receive, send: Send) -> None:
    """503 (a GraphQL-shaped body on /graphql), or a WebSocket closed 1013 (try again
    later): who the request acts as cannot be told while the database is away."""
    if scope["type"] == "websocket":
        await send({"type": "websocket.close", "code": 1013, "reason": UNAVAILABLE})
        return
    retry = {"Retry-After": "5"}
    response: Response = PlainTextResponse(UNAVAILABLE, 503, retry)
    if scope["path"] == "/graphql":
        body = json.dumps(
            {"errors": [{"message": UNAVAILABLE, "extensions": {"code": "UNAVAILABLE"}}]}
        )
        response = Response(body, 503, retry, media_type="application/json")
    await response(scope, receive, send)


class AccessControl:
    """Pure ASGI (streams and WebSockets pass through untouched once let in)."""

    def __init__(self, app: ASGIApp, metrics_allow: Iterable[str] = ()) -> None:
        self.app = app
        self.metrics_networks = _networks(metrics_allow)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        if scope["path"].startswith(OPEN_PREFIXES):  # static assets: no lookup at all
            scope[PRINCIPAL_SCOPE_KEY] = None
            await self.app(scope, receive, send)
            return
        authenticator: Authenticator | None = getattr(scope["app"].state, "authenticator", None)
        headers = Headers(scope=scope)
        principal, refused = (None, False)
        if authenticator is not None:
            try:
                principal, refused = await authenticator.from_headers(headers)
            except Exception as exc:
                # A database that is away is no bug of ours: no traceback a request (an
                # outage of a few seconds logged one per request, each a 500).
                if not database_unreachable(exc):
                    raise
                log.info(
                    "%s refused: the database is unreachable (%s)",
                    scope["path"],
                    type(exc).__name__,
                )
                await refuse_unavailable(scope, receive, send)
                return
        scope[PRINCIPAL_SCOPE_KEY] = principal
        if scope["type"] == "websocket" or is_open_path(scope["path"]) or principal is not None:
            await self.app(scope, receive, send)
            return
        if scope["path"] == METRICS_PATH and not refused:
            client = scope.get("client")
            if _address_in(client[0] if client else None, self.metrics_networks):
                await self.app(scope, receive, send)
                return
        log.info("unauthenticated request to %s refused", scope["path"])
        await unauthorised(scope, headers, refused)(scope, receive, send)
