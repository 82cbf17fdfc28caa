"""Following a command live: replay stored lines from the database, then live ones.

Shared by the GraphQL subscription and the SSE route. The subscription to the broker is
opened *before* the replay, and live lines at or below the last replayed seq are dropped,
so nothing is lost or repeated at the seam. A subscriber that falls behind is resynced
from the database, so memory stays bounded and the runner never waits for it. Lines
travel in batches (one per stored transaction), so a busy command costs one message per
batch, not per line.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from runner.logwriter import LineRun, StoredBatch
from server.broker import Broker, StatusChange, Subscription, command_topic
from server.db import READ_ONLY
from server.metrics import Metrics
from server.models import Command, CommandStatus

REPLAY_BATCH = 20_000


@dataclass(frozen=True)
class FinalStatus:
    """The command is final and every line has been delivered."""

    status: str


Item = StoredBatch | StatusChange | FinalStatus


_READ_LINES = text(
    "SELECT seq, attempt, stream, ts, text FROM log_lines"
    " WHERE command_id = :command_id AND seq > :after ORDER BY seq LIMIT :limit"
)


async def _read_lines(
    sessionmaker: async_sessionmaker[AsyncSession], command_id: int, after_seq: int
) -> StoredBatch:
    """Stored lines after `after_seq`, in runs as they were written. Read without the ORM's
    per-row type handling (a follower catching up reads many): the timestamps of a read
    share a few values."""
    async with sessionmaker() as session:
        connection = await session.connection(execution_options=READ_ONLY)
        rows = (
            await connection.execute(
                _READ_LINES, {"command_id": command_id, "after": after_seq, "limit": REPLAY_BATCH}
            )
        ).all()
    stamps: dict[Any, datetime] = {}
    runs: list[LineRun] = []
    run: LineRun | None = None
    for seq, attempt, stream, ts, text_ in rows:
        stamp = stamps.get(ts)
        if stamp is None:
            stamp = stamps[ts] = _utc(ts)
        if (
            run is not None
            and seq == run.first_seq + len(run.texts)
            and stamp is run.ts
            and attempt == run.attempt
            and stream == run.stream
        ):
            run.texts.append(text_)
        else:
            run = LineRun(attempt, stream, stamp, seq, [text_])
            runs.append(run)
    return StoredBatch(command_id, runs)


def _utc(value: datetime | str) -> datetime:
    """A timestamp as the driver returns it (SQLite: naive UTC text) -> aware UTC."""
    stamp = datetime.fromisoformat(value) if isinstance(value, str) else value
    return stamp.replace(tzinfo=UTC) if stamp.tzinfo is None else stamp.astimezone(UTC)


async def _status(sessionmaker: async_sessionmaker[AsyncSession], command_id: int) -> str | None:
    async with sessionmaker() as session:
        connection = await session.connection(execution_options=READ_ONLY)
        return await connection.scalar(select(Command.status).where(Command.id == command_id))


class _Follower:
    """The state of one follower: the last seq delivered and the last status seen."""

    def __init__(
        self, sessionmaker: async_sessionmaker[AsyncSession], command_id: int, after_seq: int
    ) -> None:
        self.sessionmaker = sessionmaker
        self.command_id = command_id
        self.last = after_seq
        self.status: str | None = None

    async def catch_up(
        self, subscription: Subscription | None = None
    ) -> AsyncIterator[StoredBatch]:
        """Everything stored after the last delivered seq, from the database; stops early
        once `subscription` holds the next line already (live delivery takes over there,
        instead of chasing a busy writer through the database)."""
        while not (subscription is not None and self._queued_next(subscription)):
            batch = await _read_lines(self.sessionmaker, self.command_id, self.last)
            if not batch.runs:
                return
            self.last = batch.runs[-1].last_seq
            yield batch

    def _queued_next(self, subscription: Subscription) -> bool:
        for message in subscription.waiting():
            if isinstance(message, StoredBatch) and message.runs:
                return message.runs[0].first_seq <= self.last + 1
        return False

    async def live(
        self, batch: StoredBatch, subscription: Subscription | None = None
    ) -> AsyncIterator[StoredBatch]:
        """A published batch: the part not yet delivered; a gap is filled from the database."""
        if not batch.runs:
            return
        fresh = batch if batch.runs[0].first_seq > self.last else batch.after(self.last)
        if not fresh.runs:
            return
        if fresh.runs[0].first_seq != self.last + 1:
            async for lines in self.catch_up(subscription):
                yield lines
            return
        self.last = fresh.runs[-1].last_seq
        yield fresh


async def follow_command(
    sessionmaker: async_sessionmaker[AsyncSession],
    broker: Broker,
    command_id: int,
    after_seq: int = 0,
    metrics: Metrics | None = None,
    poll_seconds: float | None = None,
) -> AsyncIterator[Item]:
    """Line batches after `after_seq` and status changes, ending with FinalStatus once drained.

    `poll_seconds`: also re-read the database that often. Needed while runners in other
    processes (PostgreSQL scale-out) publish to their own in-process broker; it goes away
    with the LISTEN/NOTIFY backend.
    """
    if metrics is not None:
        metrics.subscribers.inc()
    try:
        async with broker.subscribe(command_topic(command_id)) as subscription:
            follower = _Follower(sessionmaker, command_id, after_seq)
            async for lines in follower.catch_up(subscription):
                yield lines
            status = await _status(sessionmaker, command_id)
            if status is None:
                return
            yield StatusChange(command_id, status)
            while not CommandStatus(status).is_final:
                try:
                    message = await asyncio.wait_for(subscription.get(), poll_seconds)
                except TimeoutError:
                    message = None
                if message is None:  # lagged (or a poll): re-read what was missed
                    subscription.resync()
                    async for lines in follower.catch_up(subscription):
                        yield lines
                    current = await _status(sessionmaker, command_id) or status
                    if current == status:
                        continue
                    message = StatusChange(command_id, current)
                if isinstance(message, StoredBatch):
                    async for lines in follower.live(message, subscription):
                        yield lines
                elif isinstance(message, StatusChange):
                    status = message.status
                    yield message
            async for lines in follower.catch_up():
                yield lines
            yield FinalStatus(status)
    finally:
        if metrics is not None:
            metrics.subscribers.dec()
