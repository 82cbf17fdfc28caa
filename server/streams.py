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

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from runner.logwriter import StoredBatch, StoredLine
from server.broker import Broker, StatusChange, command_topic
from server.metrics import Metrics
from server.models import Command, CommandStatus, LogLine

REPLAY_BATCH = 5000


@dataclass(frozen=True)
class FinalStatus:
    """The command is final and every line has been delivered."""

    status: str


Lines = list[StoredLine]
Item = Lines | StatusChange | FinalStatus


async def _read_lines(
    sessionmaker: async_sessionmaker[AsyncSession], command_id: int, after_seq: int
) -> Lines:
    async with sessionmaker() as session:
        rows = await session.execute(
            select(LogLine.seq, LogLine.attempt, LogLine.stream, LogLine.ts, LogLine.text)
            .where(LogLine.command_id == command_id, LogLine.seq > after_seq)
            .order_by(LogLine.seq)
            .limit(REPLAY_BATCH)
        )
        return [StoredLine(command_id, *row) for row in rows.all()]


async def _status(sessionmaker: async_sessionmaker[AsyncSession], command_id: int) -> str | None:
    async with sessionmaker() as session:
        return await session.scalar(select(Command.status).where(Command.id == command_id))


class _Follower:
    """The state of one follower: the last seq delivered and the last status seen."""

    def __init__(
        self, sessionmaker: async_sessionmaker[AsyncSession], command_id: int, after_seq: int
    ) -> None:
        self.sessionmaker = sessionmaker
        self.command_id = command_id
        self.last = after_seq
        self.status: str | None = None

    async def catch_up(self) -> AsyncIterator[Lines]:
        """Everything stored after the last delivered seq, from the database."""
        while batch := await _read_lines(self.sessionmaker, self.command_id, self.last):
            self.last = batch[-1].seq
            yield batch

    async def live(self, batch: StoredBatch) -> AsyncIterator[Lines]:
        """A published batch: the part not yet delivered; a gap is filled from the database."""
        lines = batch.lines
        if not lines:
            return
        last = self.last
        fresh = lines if lines[0].seq > last else [line for line in lines if line.seq > last]
        if not fresh:
            return
        if fresh[0].seq != self.last + 1:
            async for lines in self.catch_up():
                yield lines
            return
        self.last = fresh[-1].seq
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
            async for lines in follower.catch_up():
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
                    async for lines in follower.catch_up():
                        yield lines
                    current = await _status(sessionmaker, command_id) or status
                    if current == status:
                        continue
                    message = StatusChange(command_id, current)
                if isinstance(message, StoredBatch):
                    async for lines in follower.live(message):
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
