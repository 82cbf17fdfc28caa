"""Walls around every request: known Host names, a bounded body, bounded WebSocket messages.

The body limit is checked twice: a declared `Content-Length` over it is refused before the
app runs, and a body without one (chunked) is counted as it arrives, so no more than the
limit is ever buffered. Starlette's own `max_body_size` works alike but answers a bare
"Content Too Large", only once the endpoint reads; this one names the limit and the setting.

Most clients send their whole body before they read the answer, so a refused body is read
and dropped (up to DRAIN_MAX_BYTES, never kept) before the 413 goes out; past that the
connection is closed and such a client sees it reset instead.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import urlsplit

from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.settings import Settings

# RFC 6455 close codes: 1009 "message too big", 1008 "policy violation".
WS_MESSAGE_TOO_BIG = 1009
WS_POLICY_VIOLATION = 1008
DRAIN_MAX_BYTES = 16 * 1024 * 1024


class StartWatch:
    """An ASGI `send` that notes whether the response has started (after which a middleware
    can no longer answer in its place)."""

    __slots__ = ("send", "started")

    def __init__(self, send: Send) -> None:
        self.send = send
        self.started = False

    async def __call__(self, message: Message) -> None:
        self.started = self.started or message["type"] == "http.response.start"
        await self.send(message)


class BodyTooLarge(Exception):
    """The request body passed the limit while it was read."""


def too_large_message(limit: int) -> str:
    return f"request body too large: at most {limit} bytes (CORRAL_MAX_REQUEST_BYTES)\n"


class BodySizeLimit:
    """ASGI middleware: 413 for an HTTP body over `max_bytes`; WebSocket messages over it
    close the socket with 1009 (the server's own frame limit normally stops them first)."""

    def __init__(self, app: ASGIApp, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            await self._http(scope, receive, send)
        elif scope["type"] == "websocket":
            await self.app(scope, self._bounded_ws_receive(receive, send), send)
        else:
            await self.app(scope, receive, send)

    async def _http(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = Headers(scope=scope).get("content-length")
        if declared is not None:
            if not declared.strip().isdigit():
                await PlainTextResponse("invalid Content-Length\n", 400)(scope, receive, send)
                return
            if int(declared) > self.max_bytes:
                drained = int(declared) <= DRAIN_MAX_BYTES and await _drain(receive)
                await self._refuse(scope, receive, send, close=not drained)
                return
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge
            return message

        tracking_send = StartWatch(send)
        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if tracking_send.started:  # too late for a 413: end the connection (the server logs it)
                raise
            drained = await _drain(receive, DRAIN_MAX_BYTES - received)
            await self._refuse(scope, receive, send, close=not drained)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send, *, close: bool) -> None:
        headers = {"connection": "close"} if close else None
        response = PlainTextResponse(too_large_message(self.max_bytes), 413, headers=headers)
        await response(scope, receive, send)

    def _bounded_ws_receive(self, receive: Receive, send: Send) -> Receive:
        async def bounded() -> Message:
            message = await receive()
            if message["type"] == "websocket.receive":
                data = message.get("text") or message.get("bytes") or b""
                size = len(data.encode() if isinstance(data, str) else data)
                if size > self.max_bytes:
                    await send({"type": "websocket.close", "code": WS_MESSAGE_TOO_BIG})
                    return {"type": "websocket.disconnect", "code": WS_MESSAGE_TOO_BIG}
            return message

        return bounded


async def _drain(receive: Receive, budget: int = DRAIN_MAX_BYTES) -> bool:
    """Read and drop the rest of a request body; False when it is longer than `budget`."""
    while budget >= 0:
        message = await receive()
        if message["type"] != "http.request":
            return False  # the client went away
        budget -= len(message.get("body", b""))
        if not message.get("more_body", False):
            return budget >= 0
    return False


def host_name(header: str | None) -> str | None:
    """The lower-case host of a Host header (IPv6 literals keep their brackets), or None
    when it is missing or not a host[:port]."""
    if not header:
        return None
    try:
        parts = urlsplit(f"//{header}")
        parts.port  # noqa: B018 (raises ValueError on a bad port)
    except ValueError:
        return None
    host = parts.hostname
    if not host or parts.netloc != header or "@" in header or parts.path:
        return None
    host = host.rstrip(".")  # "localhost." is the same name as "localhost"
    return f"[{host}]" if ":" in host else host


def host_allowed(host: str, patterns: list[str]) -> bool:
    """Whether `host` matches one of the patterns (`*`, `*.example.com`, or a name)."""
    return any(
        pattern in ("*", host) or (pattern.startswith("*.") and host.endswith(pattern[1:]))
        for pattern in patterns
    )


class AllowedHosts:
    """ASGI middleware: a request whose Host is not an allowed name gets 400 (HTTP) or is
    refused before the handshake (WebSocket: uvicorn answers 403), so a page on another
    site cannot reach the API through a DNS-rebound name.

    Starlette's TrustedHostMiddleware does the same check, but it refuses a WebSocket with
    a denial response that uvicorn's websockets-sansio logs at ERROR on every refusal
    (Kludex/uvicorn#3138), and a client's mistake must not be an ERROR line."""

    def __init__(self, app: ASGIApp, patterns: list[str]) -> None:
        self.app = app
        self.patterns = [pattern.lower() for pattern in patterns]
        self.allow_any = "*" in self.patterns

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if self.allow_any or scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        header = Headers(scope=scope).get("host")
        host = host_name(header)
        if host is not None and host_allowed(host, self.patterns):
            await self.app(scope, receive, send)
        elif scope["type"] == "websocket":
            await send({"type": "websocket.close", "code": WS_POLICY_VIOLATION})
        else:
            shown = "no Host header" if header is None else f"Host {header[:100]!r}"
            text = f"{shown} is not an allowed name for this server (CORRAL_ALLOWED_HOSTS)\n"
            await PlainTextResponse(text, 400)(scope, receive, send)


def request_walls(settings: Settings) -> list[Middleware]:
    """The Host check first (a foreign Host gets 400 and nothing more), then the body limit."""
    return [
        Middleware(AllowedHosts, patterns=settings.allowed_host_names),
        Middleware(BodySizeLimit, max_bytes=settings.max_request_bytes),
    ]


def uvicorn_limits(settings: Settings) -> dict[str, Any]:
    """uvicorn options that bound what one client can make the server hold."""
    return {
        # The websockets implementation refuses a larger frame itself (close 1009)
        # before it is assembled; uvicorn's default is 16 MiB.
        "ws_max_size": settings.max_request_bytes,
        # Compressing each message cost more CPU than executing it for hundreds of
        # subscribers (issue 16's fan-out profile: 38% of the event loop); off unless asked.
        "ws_per_message_deflate": settings.ws_compression,
        # h11's default bound on a request's head (start line + headers): 16 KiB.
        "h11_max_incomplete_event_size": 16 * 1024,
    }
