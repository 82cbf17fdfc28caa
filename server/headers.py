"""Security headers: `nosniff` on every HTTP response, and on every HTML page (GraphiQL,
error pages, the panel) a Content-Security-Policy that allows only this origin, no framing
and no Referer.

A pure ASGI middleware (Starlette's BaseHTTPMiddleware would buffer streaming and SSE
responses): it adds headers to `http.response.start` and passes every body chunk through.
An endpoint that sets one of these headers itself keeps its own.
"""

from __future__ import annotations

from collections.abc import Sequence

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send


def content_security_policy(extra_origins: Sequence[str] = ()) -> str:
    """The policy of Corral's HTML pages: scripts, styles and everything else from this
    origin only (plus `extra_origins` for scripts and styles: a pinned CDN), nothing inline
    (GraphiQL sets styles through the DOM, which CSP allows). Fonts and images may be
    `data:` URLs (GraphiQL's stylesheet embeds its fonts; the page's icon is empty)."""
    more = "".join(f" {origin}" for origin in extra_origins)
    directives = [
        "default-src 'self'",
        f"script-src 'self'{more}",
        f"style-src 'self'{more}",
        "img-src 'self' data:",
        "font-src 'self' data:",
        "connect-src 'self'",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
    return "; ".join(directives)


class SecurityHeaders:
    """ASGI middleware: `X-Content-Type-Options: nosniff` on every HTTP response; on an
    HTML one also the CSP, `Referrer-Policy: no-referrer` and `X-Frame-Options: DENY`
    (frame-ancestors' older spelling)."""

    def __init__(self, app: ASGIApp, html_policy: str) -> None:
        self.app = app
        self.html_headers = {
            "content-security-policy": html_policy,
            "referrer-policy": "no-referrer",
            "x-frame-options": "DENY",
        }

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                headers.setdefault("x-content-type-options", "nosniff")
                if headers.get("content-type", "").lower().startswith("text/html"):
                    for name, value in self.html_headers.items():
                        headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)
