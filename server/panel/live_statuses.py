"""The runs list's live statuses: `GET /runs/statuses?ids=1,2,3`, SSE of rendered HTML.

One stream per list page (not one per row): the page's static/runs-live.js opens it for the
runs it shows that are not over. Each `status` event is the run's status cell, rendered by
the same `_run_status_cell.html` the table is rendered with; the page swaps it in by its id.
The first events are the runs' current statuses (a run that changed between the page's
render and this connection is set right at once), then one per change, fed by the broker's
StatusChange messages (on PostgreSQL other processes' too, by LISTEN/NOTIFY), with a re-read
of the database after a lag and every `follow_poll_seconds` on PostgreSQL (a safety net).
Once every run is over: an `end` event, and the stream ends. A reconnect (Last-Event-ID)
when every run is over gets 204, which stops EventSource; so does a request naming no run
there is.

Authenticated like the page by AccessControl; CountedStream holds the subscriber's place.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from sqlalchemy import select
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from server.app_services import AppServices, client_key
from server.broker import STATUS_TOPIC, StatusChange
from server.db import READ_ONLY
from server.logstream import CountedStream
from server.models import Command, CommandStatus
from server.pages import page_environment
from server.panel.common import PAGE_SIZE, app_services
from server.subscribers import TooManySubscribers

PING_SECONDS = 15


def run_ids(raw: str) -> list[int] | None:
    """The ids of `?ids=1,2,3` (at most PAGE_SIZE, each once); None when malformed."""
    parts = [part for part in raw.split(",") if part]
    if not 0 < len(parts) <= PAGE_SIZE:
        return None
    if not all(part.isascii() and part.isdigit() and len(part) < 12 for part in parts):
        return None
    return list(dict.fromkeys(int(part) for part in parts))


def render_status_cell(command_id: int, status: str) -> str:
    """The list's status cell of a run (`_run_status_cell.html`)."""
    template = page_environment().get_template("_run_status_cell.html")
    return template.render(run_id=command_id, status=status)


def _all_final(statuses: dict[int, str]) -> bool:
    return all(CommandStatus(status).is_final for status in statuses.values())


async def _statuses(services: AppServices, ids: list[int]) -> dict[int, str]:
    async with services.sessionmaker() as session:
        await session.connection(execution_options=READ_ONLY)
        rows = await session.execute(select(Command.id, Command.status).where(Command.id.in_(ids)))
        return {command_id: status for command_id, status in rows}


async def run_statuses(request: Request) -> Response:
    """SSE of the status cells of the runs `ids`, until all of them are over."""
    services = app_services(request)
    ids = run_ids(request.query_params.get("ids", ""))
    if ids is None:
        return PlainTextResponse(
            f"ids must be 1 to {PAGE_SIZE} run ids, separated by commas.", status_code=400
        )
    statuses = await _statuses(services, ids)
    reconnect = "last-event-id" in request.headers
    if not statuses or (reconnect and _all_final(statuses)):
        return Response(status_code=204)  # nothing to follow: EventSource stops here
    client = client_key(request)
    try:
        services.subscriber_limits.acquire(client)
    except TooManySubscribers as exc:
        return PlainTextResponse(str(exc), status_code=429)
    events = _status_events(services, list(statuses))
    return CountedStream(events, services.subscriber_limits, client, ping=PING_SECONDS)


async def _status_events(services: AppServices, ids: list[int]) -> AsyncIterator[dict[str, Any]]:
    async with services.broker.subscribe(STATUS_TOPIC) as subscription:
        shown = await _statuses(services, ids)  # read after subscribing: no change is lost
        for command_id, status in shown.items():
            yield _cell_event(command_id, status)
        while not _all_final(shown):
            try:
                message = await asyncio.wait_for(subscription.get(), services.follow_poll_seconds)
            except TimeoutError:
                message = None
            if message is None:  # lagged, or a poll: the database says what changed
                subscription.resync()
                changes = await _statuses(services, list(shown))
            elif isinstance(message, StatusChange) and message.command_id in shown:
                changes = {message.command_id: message.status}
            else:
                continue
            for command_id, status in changes.items():
                if shown.get(command_id) != status:
                    shown[command_id] = status
                    yield _cell_event(command_id, status)
        yield {"event": "end", "id": "end", "data": "every run is over"}


def _cell_event(command_id: int, status: str) -> dict[str, Any]:
    return {"event": "status", "id": "s", "data": render_status_cell(command_id, status)}
