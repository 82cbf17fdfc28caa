"""Walls around every request: a bounded body, bounded WebSocket messages, known Host names.

The body limit is checked twice: a declared `Content-Length` over it is refused before a
byte is read, and a body without one (chunked) is counted as it arrives, so no more than
the limit is ever buffered. Starlette's own `max_body_size` works the same way but answers
a bare "Content Too Large" and only once the endpoint reads; this one says which limit
and which setting, for every route.
"""

from __future__ import annotations

from typing import Any

from starlette.datastructures import Headers
from starlette.middleware import Middleware
from starlette.middleware.trustedhost import TrustedHostMiddleware
from starlette.responses import PlainTextResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.settings import Settings

# RFC 6455 close code 1009: "message too big".
WS_MESSAGE_TOO_BIG = 1009


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
                await self._refuse(scope, receive, send)
                return
        started = False
        received = 0

        async def counting_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise BodyTooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, tracking_send)
        except BodyTooLarge:
            if started:  # too late for a 413: end the connection (the server logs it)
                raise
            await self._refuse(scope, receive, send)

    async def _refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        # Connection: close, so the server does not read the rest of the body.
        response = PlainTextResponse(
            too_large_message(self.max_bytes), 413, headers={"connection": "close"}
        )
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


def request_walls(settings: Settings) -> list[Middleware]:
    """The Host check first (a foreign Host gets 400 and nothing more), then the body limit.

    Starlette's TrustedHostMiddleware checks WebSockets too, and IPv6 literals with a port
    (`[::1]:8000` matches `[::1]`)."""
    return [
        Middleware(
            TrustedHostMiddleware, allowed_hosts=settings.allowed_host_names, www_redirect=False
        ),
        Middleware(BodySizeLimit, max_bytes=settings.max_request_bytes),
    ]


def uvicorn_limits(settings: Settings) -> dict[str, Any]:
    """uvicorn options that bound what one client can make the server hold."""
    return {
        # The websockets implementation refuses a larger frame itself (close 1009)
        # before it is assembled; uvicorn's default is 16 MiB.
        "ws_max_size": settings.max_request_bytes,
        # h11's default bound on a request's head (start line + headers): 16 KiB.
        "h11_max_incomplete_event_size": 16 * 1024,
    }
