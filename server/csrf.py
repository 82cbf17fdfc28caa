"""CSRF protection, once for every route: a state-changing request (POST, PUT, PATCH,
DELETE) that a session cookie authenticates must carry that session's CSRF token, in the
`X-CSRF-Token` header (htmx: base.html's `hx-headers`; scripts) or, in a urlencoded form,
the `csrf_token` field. Bearer-token requests need none (a browser never adds that header
on its own), nor do requests without a session (they get no further than AccessControl,
but for the open routes, which change nothing without a session).

The login form is exempt here: it has no session yet and carries its own double-submit
token (server/login.py).

Pure ASGI (BaseHTTPMiddleware would break streaming); it runs after AccessControl (which
finds the session) and after BodySizeLimit (which bounds the form body it buffers).
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Collection
from urllib.parse import parse_qsl

from starlette.datastructures import Headers
from starlette.responses import PlainTextResponse, Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.access import principal_of
from server.pages import render_page

log = logging.getLogger("corral.csrf")

CSRF_HEADER = "x-csrf-token"
CSRF_FIELD = "csrf_token"
SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
FORM_TYPE = "application/x-www-form-urlencoded"
FORM_MAX_FIELDS = 1000
REFUSAL = (
    "CSRF token missing or wrong: a request made with the session cookie must send the "
    "session's CSRF token in the X-CSRF-Token header (or a csrf_token form field); "
    "reload the page for a fresh one"
)


def tokens_match(sent: str | None, expected: str) -> bool:
    """Constant-time comparison of a sent token with the session's."""
    return sent is not None and hmac.compare_digest(sent.encode(), expected.encode())


def parse_form(body: bytes) -> dict[str, str]:
    """A urlencoded body's fields (the first value of each); ValueError when it has more
    than FORM_MAX_FIELDS."""
    pairs = parse_qsl(
        body.decode("utf-8", "replace"),
        keep_blank_values=True,
        errors="replace",
        max_num_fields=FORM_MAX_FIELDS,
    )
    fields: dict[str, str] = {}
    for key, value in pairs:
        fields.setdefault(key, value)
    return fields


def media_type(headers: Headers) -> str:
    return headers.get("content-type", "").partition(";")[0].strip().lower()


async def read_body(receive: Receive) -> tuple[bytes, bool]:
    """The whole request body (bounded by BodySizeLimit, which runs before), and whether
    the client is still there."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return b"".join(chunks), False
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks), True


def replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the buffered body first, then whatever the client sends."""
    sent = False

    async def replayed() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


def refusal(scope: Scope, headers: Headers) -> Response:
    """403: a small page for a browser, GraphQL-shaped JSON on /graphql, else plain text."""
    if scope["path"] == "/graphql":
        body = json.dumps({"errors": [{"message": REFUSAL, "extensions": {"code": "CSRF"}}]})
        return Response(body, 403, media_type="application/json")
    if "text/html" in headers.get("accept", ""):
        return render_page(
            "error.html",
            principal_of(scope),
            status_code=403,
            title="Request refused",
            message="This form was not sent from this Corral page (its security token is "
            "missing or out of date). Go back, reload the page and try again.",
        )
    return PlainTextResponse(REFUSAL + "\n", 403)


class CsrfProtection:
    """ASGI middleware: 403 for a cookie-authenticated state change without its token."""

    def __init__(self, app: ASGIApp, exempt_paths: Collection[str] = ("/login",)) -> None:
        self.app = app
        self.exempt_paths = frozenset(exempt_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        principal = principal_of(scope) if scope["type"] == "http" else None
        if (
            principal is None
            or principal.kind != "user"
            or principal.csrf_token is None
            or scope["method"] in SAFE_METHODS
            or scope["path"] in self.exempt_paths
        ):
            await self.app(scope, receive, send)
            return
        headers = Headers(scope=scope)
        sent = headers.get(CSRF_HEADER)
        if sent is None and media_type(headers) == FORM_TYPE:
            body, connected = await read_body(receive)
            if not connected:
                return
            try:
                sent = parse_form(body).get(CSRF_FIELD)
            except ValueError:
                sent = None
            receive = replay(body, receive)
        if tokens_match(sent, principal.csrf_token):
            await self.app(scope, receive, send)
            return
        log.info("%s %s refused: CSRF token missing or wrong", scope["method"], scope["path"])
        await refusal(scope, headers)(scope, receive, send)
