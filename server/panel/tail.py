"""The run page's live log tail: `GET /runs/{id}/tail`, SSE of rendered HTML (issue #17).

The page shows the last lines itself and then follows this stream from the seq after its
last line (`?after=`, or the browser's `Last-Event-ID` on a reconnect). Each `lines` event
is the same `_log_lines.html` partial the page renders its lines with (escaped by Jinja),
its id the last seq it holds; a `status` event is the run's status badge; an `end` event
(the final badge) comes once the run is over and every line was sent, and the stream ends.
A browser's EventSource reconnects whenever a stream ends, so a *reconnect* (Last-Event-ID
sent) for a run that is over, with nothing after its seq, gets 204: the one answer that makes
EventSource stop. A first connection always gets a stream, ending with `end`: a run that
became final between the page's render and this connection still gets its final badge.

Authenticated like the page by AccessControl; CountedStream holds the subscriber's place
and ends the stream once its session no longer holds (checked every 30 s).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any, NamedTuple

from sqlalchemy import exists, select
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from server.app_services import AppServices, client_key
from server.broker import StatusChange
from server.db import READ_ONLY
from server.logstream import RETRY_AFTER, CountedStream, after_seq, until_unavailable
from server.messages import StoredBatch
from server.models import Command, CommandStatus, LogLine
from server.pages import page_environment
from server.stream_batches import pieces
from server.streams import FinalStatus, StreamUnavailable, follow_command, patiently
from server.subscribers import TooManySubscribers

PING_SECONDS = 15


class TailLine(NamedTuple):
    """One log line as `_log_lines.html` shows it (a LogLine row has the same fields)."""

    seq: int
    attempt: int
    stream: str
    text: str


def render_lines(lines: list[Any], previous_attempt: int) -> str:
    """`lines` as the run page's log shows them: an attempt separator wherever the attempt
    changes (counting from `previous_attempt`, the one of the line shown before them)."""
    template = page_environment().get_template("_log_lines.html")
    return template.render(lines=lines, previous_attempt=previous_attempt)


def render_status(status: str) -> str:
    """The run's status badge (text and colour)."""
    badge: str = page_environment().get_template("_macros.html").module.status_badge(status)  # type: ignore[attr-defined]
    return str(badge)


def tail_lines(batch: StoredBatch) -> Iterator[TailLine]:
    for run in batch.runs:
        for seq, text in enumerate(run.texts, run.first_seq):
            yield TailLine(seq, run.attempt, run.stream, text)


def _command_id(request: Request) -> int | None:
    raw = str(request.path_params["command_id"])
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 12 else None


class _Start(NamedTuple):
    status: str
    more_lines: bool
    attempt: int  # the attempt of the line at the stream's starting seq (1 if none)


async def _start(services: AppServices, command_id: int, after: int) -> _Start | None:
    """Where the stream starts: the run's status, whether lines follow `after`, the attempt
    of the line at `after`; None when there is no such run."""
    async with services.stream_sessions() as session:
        await session.connection(execution_options=READ_ONLY)
        status = await session.scalar(select(Command.status).where(Command.id == command_id))
        if status is None:
            return None
        of_run = LogLine.command_id == command_id
        more = await session.scalar(select(exists().where(of_run, LogLine.seq > after)))
        attempt = await session.scalar(select(LogLine.attempt).where(of_run, LogLine.seq == after))
    return _Start(status, bool(more), attempt or 1)


async def run_tail(request: Request) -> Response:
    """SSE of the run's log lines after `after`, its status, and `end` once it is over."""
    services: AppServices = request.app.state.services
    command_id = _command_id(request)
    after = after_seq(request, "after")
    if command_id is None:
        return PlainTextResponse("There is no such run.", status_code=404)
    if after is None:
        return PlainTextResponse("after (or Last-Event-ID) must be a log seq.", status_code=400)
    try:
        start = await patiently(lambda: _start(services, command_id, after), after)
    except StreamUnavailable as exc:
        return PlainTextResponse(str(exc), status_code=503, headers=RETRY_AFTER)
    if start is None:
        return PlainTextResponse("There is no such run.", status_code=404)
    reconnect = "last-event-id" in request.headers
    if reconnect and CommandStatus(start.status).is_final and not start.more_lines:
        return Response(status_code=204)  # over and all sent: EventSource stops here
    client = client_key(request)
    try:
        services.subscriber_limits.acquire(client)
    except TooManySubscribers as exc:
        return PlainTextResponse(str(exc), status_code=429)
    events = _tail_events(services, command_id, after, start.attempt)
    return CountedStream(events, services.subscriber_limits, client, ping=PING_SECONDS)


async def _tail_events(
    services: AppServices, command_id: int, after: int, attempt: int
) -> AsyncIterator[dict[str, Any]]:
    following = follow_command(
        services.stream_sessions,
        services.broker,
        command_id,
        after,
        services.metrics,
        services.follow_poll_seconds,
        pages=services.replay_pages,
    )
    async for item in until_unavailable(following):
        if isinstance(item, StoredBatch):
            for piece in pieces(item):
                lines = list(tail_lines(piece))
                if not lines:
                    continue
                html = render_lines(lines, attempt)
                attempt, after = lines[-1].attempt, lines[-1].seq
                yield {"event": "lines", "id": str(after), "data": html}
        elif isinstance(item, StatusChange):
            yield {"event": "status", "data": render_status(item.status)}
        elif isinstance(item, FinalStatus):
            # With an id, so that even a stream that sent no line makes a browser's reconnect
            # carry Last-Event-ID (and get its 204).
            yield {"event": "end", "id": str(after), "data": render_status(item.status)}
