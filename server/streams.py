"""Following a command live: replay stored lines from the database, then live ones.

Shared by the GraphQL subscription and the SSE route. The subscription to the broker is
opened *before* the replay, and live lines at or below the last replayed seq are dropped,
so nothing is lost or repeated at the seam. A subscriber that falls behind is resynced
from the database, so memory stays bounded and the runner never waits for it.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from runner.logwriter import StoredLine
from server.broker import Broker, StatusChange, command_topic
from server.metrics import Metrics
from server.models import Command, CommandStatus, LogLine

REPLAY_BATCH = 1000


@dataclass(frozen=True)
class FinalStatus:
    """The command is final and every line has been delivered."""

    status: str


async def _read_lines(
    sessionmaker: async_sessionmaker[AsyncSession], command_id: int, after_seq: int
) -> list[StoredLine]:
    async with sessionmaker() as session:
        rows = await session.scalars(
            select(LogLine)
            .where(LogLine.command_id == command_id, LogLine.seq > after_seq)
            .order_by(LogLine.seq)
            .limit(REPLAY_BATCH)
        )
        return [
            StoredLine(row.command_id, row.seq, row.attempt, row.stream, row.ts, row.text)
            for row in rows
        ]


async def _status(sessionmaker: async_sessionmaker[AsyncSession], command_id: int) -> str | None:
    async with sessionmaker() as session:
        return await session.scalar(select(Command.status).where(Command.id == command_id))


async def follow_command(
    sessionmaker: async_sessionmaker[AsyncSession],
    broker: Broker,
    command_id: int,
    after_seq: int = 0,
    metrics: Metrics | None = None,
    poll_seconds: float | None = None,
) -> AsyncIterator[StoredLine | StatusChange | FinalStatus]:
    """Lines after `after_seq` and status changes, ending with FinalStatus once drained.

    `poll_seconds`: also re-read the database that often. Needed while runners in other
    processes (PostgreSQL scale-out) publish to their own in-process broker; it goes away
    with the LISTEN/NOTIFY backend.
    """
    if metrics is not None:
        metrics.subscribers.inc()
    try:
        async with broker.subscribe(command_topic(command_id)) as subscription:
            last = after_seq

            async def catch_up() -> AsyncIterator[StoredLine]:
                nonlocal last
                while batch := await _read_lines(sessionmaker, command_id, last):
                    for line in batch:
                        last = line.seq
                        yield line

            async for line in catch_up():
                yield line
            status = await _status(sessionmaker, command_id)
            if status is None:
                return
            yield StatusChange(command_id, status)
            if CommandStatus(status).is_final:
                async for line in catch_up():
                    yield line
                yield FinalStatus(status)
                return
            while True:
                try:
                    message = await asyncio.wait_for(subscription.get(), poll_seconds)
                except TimeoutError:
                    message = None
                if message is None:  # lagged (or a poll): re-read what was missed
                    subscription.resync()
                    async for line in catch_up():
                        yield line
                    current = await _status(sessionmaker, command_id) or status
                    if current == status and not CommandStatus(current).is_final:
                        continue
                    status = current
                    message = StatusChange(command_id, status)
                if isinstance(message, StoredLine):
                    if message.seq <= last:
                        continue
                    if message.seq > last + 1:
                        async for line in catch_up():
                            yield line
                        continue
                    last = message.seq
                    yield message
                elif isinstance(message, StatusChange):
                    status = message.status
                    yield message
                    if CommandStatus(message.status).is_final:
                        async for line in catch_up():
                            yield line
                        yield FinalStatus(message.status)
                        return
    finally:
        if metrics is not None:
            metrics.subscribers.dec()
