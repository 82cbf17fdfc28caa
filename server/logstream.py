"""SSE: `GET /api/commands/{id}/logs/stream`, one `log` event per line, `status` events."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import datetime
from json.encoder import encode_basestring_ascii
from typing import Any

from sse_starlette import EventSourceResponse
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from graphql_schema.context import AppServices
from graphql_schema.relay import decode_id
from runner.logwriter import StoredLine
from server.broker import StatusChange
from server.models import Command
from server.streams import FinalStatus, follow_command

MAX_SEQ = 2**31 - 1  # seq is a 32-bit integer column


def encode_log_events(lines: list[StoredLine]) -> bytes:
    """A batch of `log` events, encoded once (one write for the whole batch).

    Each event's data is the JSON of `StoredLine.as_json()`, written out directly: a
    json.dumps per line costs more than everything else on the way from pipe to socket.
    """
    stamps: dict[datetime, str] = {}  # the lines of one read share one timestamp
    parts = []
    for line in lines:
        stamp = stamps.get(line.ts)
        if stamp is None:
            stamp = stamps[line.ts] = line.ts.isoformat()
        parts.append(
            f"event: log\r\nid: {line.seq}\r\ndata: "
            f'{{"seq": {line.seq}, "attempt": {line.attempt}, "stream": "{line.stream}", '
            f'"ts": "{stamp}", "text": {encode_basestring_ascii(line.text)}}}\r\n\r\n'
        )
    return "".join(parts).encode()


def _after_seq(request: Request) -> int | None:
    raw = request.headers.get("last-event-id") or request.query_params.get("afterSeq") or "0"
    if not (raw.isascii() and raw.isdigit()) or int(raw) > MAX_SEQ:
        return None
    return int(raw)


async def stream_command_logs(request: Request) -> Response:
    """Replay after Last-Event-ID, then live; ends after the command is final and drained."""
    services: AppServices = request.app.state.services
    decoded = decode_id(request.path_params["command_id"])
    if decoded is None or decoded[0] != "Command":
        return JSONResponse({"error": "not a Command ID"}, status_code=404)
    after = _after_seq(request)
    if after is None:
        return JSONResponse({"error": "Last-Event-ID must be a log seq"}, status_code=400)
    async with services.sessionmaker() as session:
        if await session.get(Command, decoded[1]) is None:
            return JSONResponse({"error": "no such command"}, status_code=404)

    async def events() -> AsyncIterator[bytes | dict[str, Any]]:
        async for item in follow_command(
            services.sessionmaker,
            services.broker,
            decoded[1],
            after,
            services.metrics,
            services.follow_poll_seconds,
        ):
            if isinstance(item, list):
                yield encode_log_events(item)
            elif isinstance(item, StatusChange):
                yield {"event": "status", "data": json.dumps({"status": item.status})}
            elif isinstance(item, FinalStatus):
                yield {
                    "event": "status",
                    "data": json.dumps({"status": item.status, "final": True}),
                }

    return EventSourceResponse(events(), ping=15)
