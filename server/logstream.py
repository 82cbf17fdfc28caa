"""SSE: `GET /api/commands/{id}/logs/stream`, one `log` event per line, `status` events.

The contract (API.md, issue 15 item 7): a `retry:` field first; `stream` spelled as in
GraphQL (`STDOUT`); one final `status` event (`final: true`, its `id:` the last seq sent),
then the end; a reconnect after the end (Last-Event-ID at or past the last line of a final
command) is answered 204, which a standard EventSource takes as "stop"."""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
import weakref
from collections.abc import AsyncIterator
from json.encoder import encode_basestring_ascii
from typing import Any, Literal

import anyio
from anyio import CancelScope
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sse_starlette import EventSourceResponse
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.types import Receive, Scope, Send

from server import access
from server.access import Authenticator
from server.app_services import AppServices, client_key
from server.broker import StatusChange
from server.db import READ_ONLY
from server.ids import decode_global_id as decode_id
from server.messages import StoredBatch
from server.models import Command, CommandStatus, LogLine, LogStream
from server.stream_batches import SEND_CHUNK_BYTES, parts_of, pieces
from server.streams import FinalStatus, Item, StreamUnavailable, follow_command, patiently
from server.subscribers import SubscriberLimits, TooManySubscribers

log = logging.getLogger("corral.streams")
MAX_SEQ = 2**31 - 1  # seq is a 32-bit integer column
RETRY_MS = 3000  # how long a standard EventSource waits before it reconnects
RETRY_AFTER = {"Retry-After": "5"}  # a stream refused while the database is away


def encode_log_events(batch: StoredBatch) -> bytes:
    """A batch of `log` events, encoded once (one write for the whole batch).

    Each event's data is a line's JSON object (seq, attempt, stream, ts, text), written out
    from fixed pieces (what a run's lines share is encoded once per run): a json.dumps per
    line costs more than everything else on the way from pipe to socket, and this is also
    about half of what a format string per line costs.
    """
    parts: list[str] = []
    for run in batch.runs:
        stream = LogStream(run.stream).name
        shared = json.dumps({"attempt": run.attempt, "stream": stream, "ts": run.ts.isoformat()})
        before_text = f", {shared[1:-1]}, " + '"text": '
        for seq, text in enumerate(run.texts, run.first_seq):
            number = str(seq)
            parts += (_EVENT_ID, number, _DATA_SEQ, number, before_text, _json_str(text), _END)
    return "".join(parts).encode()


def shared_log_events(batch: StoredBatch) -> list[bytes]:
    """The `log` events of a batch in pieces of bounded size (server.stream_batches.pieces),
    encoded once for every stream it goes to: the broker hands all followers of a command
    the same batch object, and shared replay pages are one object too (issue 16). A batch
    merged from published ones (server.stream_batches.with_queued) is their encodings joined (a
    copy of bytes, not an encoding per follower whose merge is its own)."""
    encoded = _encoded.get(id(batch))
    if encoded is None:
        parts = parts_of(batch)
        if len(parts) == 1:
            encoded = [encode_log_events(piece) for piece in pieces(batch)]
        else:
            encoded = _joined([piece for part in parts for piece in shared_log_events(part)])
        _encoded[id(batch)] = encoded
        weakref.finalize(batch, _encoded.pop, id(batch), None)
    return encoded


def _joined(encoded: list[bytes], max_bytes: int = SEND_CHUNK_BYTES) -> list[bytes]:
    """Consecutive pieces joined up to about `max_bytes` each: one send apiece."""
    joined: list[bytes] = []
    group: list[bytes] = []
    size = 0
    for piece in encoded:
        if group and size + len(piece) > max_bytes:
            joined.append(b"".join(group))
            group, size = [], 0
        group.append(piece)
        size += len(piece)
    if group:
        joined.append(b"".join(group))
    return joined


# id(StoredBatch) -> its encoded pieces, while the batch lives (weakref.finalize drops the
# entry); as graphql_schema.log_messages.log_batches does for GraphQL messages.
_encoded: dict[int, list[bytes]] = {}
_EVENT_ID = "event: log\r\nid: "
_DATA_SEQ = '\r\ndata: {"seq": '
_END = "}\r\n\r\n"
_json_str = encode_basestring_ascii


def after_seq(request: Request, parameter: str = "afterSeq") -> int | None:
    """Where a log stream resumes: Last-Event-ID, else the query `parameter`, else 0; None
    when it is not a log seq."""
    raw = request.headers.get("last-event-id") or request.query_params.get(parameter) or "0"
    if not (raw.isascii() and raw.isdigit() and len(raw) < 12) or int(raw) > MAX_SEQ:
        return None
    return int(raw)


class CountedStream(EventSourceResponse):
    """An SSE response that holds a subscriber's place until it ends, however it ends."""

    def __init__(
        self, content: AsyncIterator[Any], limits: SubscriberLimits, client: str, **kwargs: Any
    ) -> None:
        super().__init__(content, **kwargs)
        self._limits = limits
        self._client = client

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            async with anyio.create_task_group() as group:
                group.start_soon(self._serve, scope, receive, send, group.cancel_scope)
                group.start_soon(self._watch_credential, scope, group.cancel_scope)
        finally:
            self._limits.release(self._client)

    async def _serve(self, scope: Scope, receive: Receive, send: Send, done: CancelScope) -> None:
        await EventSourceResponse.__call__(self, scope, receive, send)
        done.cancel()

    async def _watch_credential(self, scope: Scope, done: CancelScope) -> None:
        """End the stream once the request's credential no longer authenticates (a revoked
        or expired token, a logged-out session): checked every CREDENTIAL_RECHECK_SECONDS.
        The client sees the stream end; reconnecting, it gets 401."""
        authenticator: Authenticator | None = getattr(scope["app"].state, "authenticator", None)
        if authenticator is None:
            return
        headers = Headers(scope=scope)
        while True:
            await anyio.sleep(access.CREDENTIAL_RECHECK_SECONDS * (1 - SHARED_CHECK_SHARE))
            try:
                holds = await credential_holds(authenticator, headers)
            except Exception as exc:  # the database is away a moment: check again next time
                log.warning(
                    "could not check a log stream's credential again: %s", type(exc).__name__
                )
                continue
            if not holds:
                log.info("a log stream's credential no longer holds: the stream ends")
                done.cancel()
                return


# A check of a credential made this share of CREDENTIAL_RECHECK_SECONDS ago or less counts
# for every stream that holds the credential (streams wait that much less between checks,
# so a revoked credential still ends each of them within CREDENTIAL_RECHECK_SECONDS).
SHARED_CHECK_SHARE = 1 / 6
# authenticator -> digest of a credential -> (when its check began, the check)
_checks: weakref.WeakKeyDictionary[Authenticator, dict[bytes, tuple[float, asyncio.Future[bool]]]]
_checks = weakref.WeakKeyDictionary()


async def credential_holds(authenticator: Authenticator, headers: Headers) -> bool:
    """Whether the request's credential still authenticates, checked once for all the
    streams that hold it (200 followers of a run, one token: one check, not 200)."""
    digest = hashlib.sha256(
        f"{headers.get('authorization')}\n{headers.get('cookie')}".encode()
    ).digest()
    window = access.CREDENTIAL_RECHECK_SECONDS * SHARED_CHECK_SHARE
    now = time.monotonic()
    checks = _checks.setdefault(authenticator, {})
    known = checks.get(digest)
    if known is None or now - known[0] > window:
        for old in [key for key, (began, _) in checks.items() if now - began > window]:
            del checks[old]
        known = checks[digest] = (now, asyncio.ensure_future(_check(authenticator, headers)))
    return await asyncio.shield(known[1])


async def _check(authenticator: Authenticator, headers: Headers) -> bool:
    principal, _refused = await authenticator.from_headers(headers)
    return principal is not None


async def stream_command_logs(request: Request) -> Response:
    """Replay after Last-Event-ID, then live; ends after the command is final and drained."""
    services: AppServices = request.app.state.services
    decoded = decode_id(request.path_params["command_id"])
    if decoded is None or decoded[0] != "Command":
        return JSONResponse({"error": "not a Command ID"}, status_code=404)
    after = after_seq(request)
    if after is None:
        return JSONResponse({"error": "Last-Event-ID must be a log seq"}, status_code=400)
    resumed = "last-event-id" in request.headers
    try:
        found = await patiently(lambda: _stream_start(services, decoded[1], after, resumed), after)
    except StreamUnavailable as exc:
        log.info("a log stream is refused: %s", exc)
        return JSONResponse({"error": str(exc)}, status_code=503, headers=RETRY_AFTER)
    if found is None:
        return JSONResponse({"error": "no such command"}, status_code=404)
    if found == "ended":
        return Response(status_code=204)
    client = client_key(request)
    try:
        services.subscriber_limits.acquire(client)
    except TooManySubscribers as exc:
        return JSONResponse({"error": str(exc)}, status_code=429)

    async def events() -> AsyncIterator[bytes | dict[str, Any]]:
        yield f"retry: {RETRY_MS}\r\n\r\n".encode()
        last_seq = after
        following = follow_command(
            services.stream_sessions,
            services.broker,
            decoded[1],
            after,
            services.metrics,
            services.follow_poll_seconds,
            pages=services.replay_pages,
        )
        async for item in until_unavailable(following):
            if isinstance(item, StoredBatch):
                for events in shared_log_events(item):
                    yield events
                last_seq = max(last_seq, _last_seq(item))
            elif isinstance(item, StatusChange):
                if not CommandStatus(item.status).is_final:  # the final one comes once, last
                    yield {"event": "status", "data": json.dumps({"status": item.status})}
            elif isinstance(item, FinalStatus):
                yield {
                    "event": "status",
                    "id": str(last_seq),
                    "data": json.dumps({"status": item.status, "final": True}),
                }

    return CountedStream(events(), services.subscriber_limits, client, ping=15)


async def until_unavailable(items: AsyncIterator[Item]) -> AsyncIterator[Item]:
    """A follower's items, ending quietly when the database stays away: the stream ends
    without its final status, and the client reconnects with Last-Event-ID after `retry:`
    (an unexpected error here cost a traceback per stream, and a chunk cut in half)."""
    try:
        async for item in items:
            yield item
    except StreamUnavailable as exc:
        log.info("a log stream ends: %s", exc)


async def _stream_start(
    services: AppServices, command_id: int, after: int, resumed: bool
) -> Literal["follow", "ended"] | None:
    """Whether to follow the command (None: no such command; "ended": a reconnect after
    its end, answered 204)."""
    async with services.stream_sessions() as session:
        await session.connection(execution_options=READ_ONLY)  # SQLite: no write lock
        command = await session.get(Command, command_id)
        if command is None:
            return None
        if resumed and await _ended_before(session, command, after):
            return "ended"
    return "follow"


def _last_seq(batch: StoredBatch) -> int:
    return max((run.first_seq + len(run.texts) - 1 for run in batch.runs), default=0)


async def _ended_before(session: AsyncSession, command: Command, after: int) -> bool:
    """The command is final and has no line after `after`: a stream resumed there would
    send nothing new (a client reconnecting after the end)."""
    if not command.status.is_final:
        return False
    newer = select(LogLine.seq).where(LogLine.command_id == command.id, LogLine.seq > after)
    return await session.scalar(newer.limit(1)) is None
