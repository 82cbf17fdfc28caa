"""The log pump's sink: numbers lines gaplessly, stores them in batches, then publishes them."""

from __future__ import annotations

import asyncio
import json
import logging
from dataclasses import dataclass
from datetime import datetime
from typing import Any, cast

from sqlalchemy import Table, func, insert, select, update
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from runner.lines import Redactor
from server.broker import Broker, command_topic
from server.metrics import Metrics
from server.models import (
    Command,
    CommandEvent,
    LogLine,
    LogStream,
    Service,
    ServiceUsage,
    utcnow,
)

log = logging.getLogger("corral.runner")

EVENT_PREFIX = "::corral::"
QUEUE_LINES = 10_000
BATCH_LINES = 5_000
STORE_ATTEMPTS = 5
LOG_TABLE = cast(Table, LogLine.__table__)


@dataclass(frozen=True)
class StoredLine:
    """A line as stored and published: what subscribers receive."""

    command_id: int
    seq: int
    attempt: int
    stream: str
    ts: datetime
    text: str

    def as_json(self) -> dict[str, Any]:
        return {
            "seq": self.seq,
            "attempt": self.attempt,
            "stream": self.stream,
            "ts": self.ts.isoformat(),
            "text": self.text,
        }


class LogWriter:
    """Receives an attempt's lines, redacts and numbers them, writes them in batches.

    The queue is bounded: when the database falls behind, `add` waits, the pipe readers
    stop reading and the child blocks on write. Memory stays bounded; nothing is dropped.
    """

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        broker: Broker,
        command_id: int,
        attempt: int,
        last_seq: int,
        redactor: Redactor,
        metrics: Metrics | None = None,
        service_names: dict[str, int] | None = None,
        profile_id: int | None = None,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._broker = broker
        self.command_id = command_id
        self.attempt = attempt
        self.seq = last_seq
        self._redact = redactor
        self._metrics = metrics
        self._services = service_names or {}
        self._profile_id = profile_id
        self._queue: asyncio.Queue[tuple[str, str, datetime] | None] = asyncio.Queue(QUEUE_LINES)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"logwriter-{self.command_id}")

    async def add(self, stream: LogStream, text: str) -> None:
        """Queue one raw line (waits when the writer is behind)."""
        await self._queue.put((stream.value, text, utcnow()))

    async def close(self) -> None:
        """Store everything queued, then stop."""
        await self._queue.put(None)
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        done = False
        while not done:
            first = await self._queue.get()
            batch = [] if first is None else [first]
            done = first is None
            while not done and len(batch) < BATCH_LINES and not self._queue.empty():
                item = self._queue.get_nowait()
                if item is None:
                    done = True
                else:
                    batch.append(item)
            if batch:
                await self._store_with_retries(batch)

    async def _store_with_retries(self, batch: list[tuple[str, str, datetime]]) -> None:
        """Store a batch; a database hiccup (e.g. SQLite busy past its timeout) is retried,
        and the writer never dies: a dead writer would stall the child on a full pipe."""
        for attempt in range(STORE_ATTEMPTS):
            seq = self.seq
            try:
                await self._store(batch)
                return
            except (OperationalError, DBAPIError) as exc:
                self.seq = seq
                log.warning(
                    "storing %d log lines of command %d failed (%r); retrying",
                    len(batch),
                    self.command_id,
                    exc,
                )
                await asyncio.sleep(0.2 * (attempt + 1))
        log.error(
            "dropped %d log lines of command %d after %d tries",
            len(batch),
            self.command_id,
            STORE_ATTEMPTS,
        )

    async def _store(self, batch: list[tuple[str, str, datetime]]) -> None:
        lines: list[StoredLine] = []
        events: list[dict[str, Any]] = []
        for stream, raw, ts in batch:
            text = self._redact(raw)
            if stream == LogStream.STDOUT.value and text.startswith(EVENT_PREFIX):
                event = _parse_event(text[len(EVENT_PREFIX) :])
                if event is not None:
                    events.append({"seq": self.seq, "ts": ts, "data": event})
                    continue
            self.seq += 1
            lines.append(StoredLine(self.command_id, self.seq, self.attempt, stream, ts, text))
        async with self._sessionmaker() as session, session.begin():
            if lines:
                await session.execute(
                    insert(LOG_TABLE),
                    [
                        {
                            "command_id": line.command_id,
                            "seq": line.seq,
                            "attempt": line.attempt,
                            "stream": line.stream,
                            "ts": line.ts,
                            "text": line.text,
                        }
                        for line in lines
                    ],
                )
                await session.execute(
                    update(Command).where(Command.id == self.command_id).values(last_seq=self.seq)
                )
            for event in events:
                await self._store_event(session, event)
        if self._metrics is not None:
            self._metrics.log_lines.inc(len(lines))
        topic = command_topic(self.command_id)
        for line in lines:
            self._broker.publish(topic, line)

    async def _store_event(self, session: AsyncSession, event: dict[str, Any]) -> None:
        data = event["data"]
        session.add(
            CommandEvent(
                command_id=self.command_id,
                attempt=self.attempt,
                seq=event["seq"],
                type=str(data.get("type"))[:64],
                data=data,
                ts=event["ts"],
            )
        )
        if data.get("type") == "usage":
            await self._store_usage(session, data, event["ts"])

    async def _store_usage(self, session: AsyncSession, data: dict[str, Any], ts: datetime) -> None:
        name = str(data.get("service", "")).lower()
        service_id = self._services.get(name)
        if service_id is None:
            service_id = await session.scalar(
                select(Service.id).where(func.lower(Service.name) == name)
            )
        if service_id is None:
            return
        session.add(
            ServiceUsage(
                service_id=service_id,
                profile_id=self._profile_id,
                command_id=self.command_id,
                units=_int(data.get("units")),
                remaining=_int(data.get("remaining")),
                limit=_int(data.get("limit")),
                reset_at=_datetime(data.get("resetAt")),
                token_valid=data.get("tokenValid")
                if isinstance(data.get("tokenValid"), bool)
                else None,
                observed_at=ts,
            )
        )


def _parse_event(payload: str) -> dict[str, Any] | None:
    try:
        data = json.loads(payload)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        return None
    return data


def _int(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _datetime(value: Any) -> datetime | None:
    if not isinstance(value, str):
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else None
