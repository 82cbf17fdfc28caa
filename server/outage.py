"""Requests that meet a database outage once let in: a 503 that says so, not a 500.

AccessControl refuses a request whose credentials cannot be checked while the database is
away; a request let in just before fails in its handler instead (a panel page, /metrics),
which Starlette answered with a 500 and a traceback in the log, one per request.
"""

from __future__ import annotations

import logging

from starlette.requests import Request
from starlette.types import ASGIApp, Receive, Scope, Send

from runner.store_errors import database_unreachable
from server.access import UNAVAILABLE, refuse_unavailable
from server.limits import StartWatch
from server.panel.common import error_page

log = logging.getLogger("corral.access")


class DatabaseOutage:
    """Pure ASGI: a retryable database error raised before the response started becomes a
    503 (a panel page for a browser, else as AccessControl refuses); after it, it is left
    to the server (the response is half sent)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        watched_send = StartWatch(send)
        try:
            await self.app(scope, receive, watched_send)
        except Exception as exc:
            if watched_send.started or not database_unreachable(exc):
                raise
            # Its type only: a driver's message may quote the statement's parameters.
            log.info(
                "%s failed: the database is unreachable (%s)", scope["path"], type(exc).__name__
            )
            await _answer(scope, receive, send)


async def _answer(scope: Scope, receive: Receive, send: Send) -> None:
    request = Request(scope, receive)
    if "text/html" not in request.headers.get("accept", ""):
        await refuse_unavailable(scope, receive, send)
        return
    response = error_page(request, 503, "Database unreachable", UNAVAILABLE.capitalize() + ".")
    response.headers["Retry-After"] = "5"
    await response(scope, receive, send)
