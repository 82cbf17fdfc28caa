"""The log pump's sink: numbers lines gaplessly, stores them in batches, then publishes them.

The hot path works on chunks, not lines: the pipe readers queue every line of a read
together (one timestamp), a batch is inserted through the raw driver (COPY on PostgreSQL,
executemany on SQLite), and subscribers get one message per stored batch.
"""

from __future__ import annotations

import asyncio
import functools
import json
import logging
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from runner.lines import Redactor
from server.broker import Broker, command_topic
from server.metrics import Metrics
from server.models import (
    Command,
    CommandEvent,
    LogStream,
    Service,
    ServiceUsage,
    utcnow,
)

log = logging.getLogger("corral.runner")

EVENT_PREFIX = "::corral::"
QUEUE_CHUNKS = 1_000  # pipe reads (of up to 64 KiB) waiting to be stored
BATCH_LINES = 5_000
STORE_ATTEMPTS = 5
COLUMNS = ("command_id", "seq", "attempt", "stream", "ts", "text")
SQLITE_INSERT = (
    "INSERT INTO log_lines (command_id, seq, attempt, stream, ts, text) VALUES (?, ?, ?, ?, ?, ?)"
)


@dataclass(slots=True)
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


@dataclass(frozen=True)
class StoredBatch:
    """Lines stored in one transaction, published as one message (seqs consecutive)."""

    command_id: int
    lines: list[StoredLine]

    @property
    def weight(self) -> int:
        """What it costs a subscriber's bounded queue: its number of lines."""
        return len(self.lines)


@dataclass
class _Chunk:
    stream: str
    lines: list[str]
    ts: datetime
    command_values: dict[str, Any] | None = None


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
        runner_id: str | None = None,
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
        # Command values (status, pgid ...) are written only while this runner holds it.
        self._runner_id = runner_id
        self._queue: asyncio.Queue[_Chunk | None] = asyncio.Queue(QUEUE_CHUNKS)
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name=f"logwriter-{self.command_id}")

    async def add(
        self, stream: LogStream, text: str, *, command_values: dict[str, Any] | None = None
    ) -> None:
        """Queue one line; `command_values` are written to the command row with it."""
        await self._queue.put(_Chunk(stream.value, [text], utcnow(), command_values))

    async def add_lines(self, stream: LogStream, lines: list[str]) -> None:
        """Queue the lines of one read (waits when the writer is behind)."""
        if lines:
            await self._queue.put(_Chunk(stream.value, lines, utcnow()))

    async def close(self) -> None:
        """Store everything queued, then stop."""
        await self._queue.put(None)
        if self._task is not None:
            await self._task

    async def _run(self) -> None:
        done = False
        while not done:
            first = await self._queue.get()
            if first is None:
                return
            batch = [first]
            size = len(first.lines)
            while size < BATCH_LINES and not self._queue.empty():
                item = self._queue.get_nowait()
                if item is None:
                    done = True
                    break
                batch.append(item)
                size += len(item.lines)
            await self._store_with_retries(batch)

    async def _store_with_retries(self, batch: list[_Chunk]) -> None:
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
                    "storing %d log chunks of command %d failed (%r); retrying",
                    len(batch),
                    self.command_id,
                    exc,
                )
                await asyncio.sleep(0.2 * (attempt + 1))
        log.error(
            "dropped %d log chunks of command %d after %d tries",
            len(batch),
            self.command_id,
            STORE_ATTEMPTS,
        )

    def _number(
        self, batch: list[_Chunk]
    ) -> tuple[list[StoredLine], list[dict[str, Any]], dict[str, Any]]:
        lines: list[StoredLine] = []
        events: list[dict[str, Any]] = []
        values: dict[str, Any] = {}
        for chunk in batch:
            if chunk.command_values:
                values.update(chunk.command_values)
            for raw in chunk.lines:
                text = self._redact(raw)
                if chunk.stream == "stdout" and text.startswith(EVENT_PREFIX):
                    event = _parse_event(text[len(EVENT_PREFIX) :])
                    if event is not None:
                        events.append({"seq": self.seq, "ts": chunk.ts, "data": event})
                        continue
                self.seq += 1
                lines.append(
                    StoredLine(
                        self.command_id, self.seq, self.attempt, chunk.stream, chunk.ts, text
                    )
                )
        return lines, events, values

    async def _store(self, batch: list[_Chunk]) -> None:
        lines, events, values = self._number(batch)
        async with self._sessionmaker() as session, session.begin():
            if lines:
                await _insert_lines(session, lines)
            guarded = bool(values) and self._runner_id is not None  # only while it is ours
            if lines:
                values["last_seq"] = self.seq
            if values:
                params = {**values, "_id": self.command_id, "_runner": self._runner_id}
                await session.execute(_command_update(tuple(sorted(values)), guarded), params)
            for event in events:
                await self._store_event(session, event)
        if self._metrics is not None:
            self._metrics.log_lines.inc(len(lines))
        if lines:
            self._broker.publish(
                command_topic(self.command_id), StoredBatch(self.command_id, lines)
            )

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
        valid = data.get("tokenValid")
        session.add(
            ServiceUsage(
                service_id=service_id,
                profile_id=self._profile_id,
                command_id=self.command_id,
                units=_int(data.get("units")),
                remaining=_int(data.get("remaining")),
                limit=_int(data.get("limit")),
                reset_at=_datetime(data.get("resetAt")),
                token_valid=valid if isinstance(valid, bool) else None,
                observed_at=ts,
            )
        )


@functools.lru_cache(maxsize=64)
def _command_update(columns: tuple[str, ...], guarded: bool) -> Any:
    """UPDATE of these columns, built once per column set (building statements per batch
    cost ~10% of a short command's runner time)."""
    stmt = update(Command).where(Command.id == bindparam("_id"))
    if guarded:
        stmt = stmt.where(Command.runner_id == bindparam("_runner"))
    return stmt.values({column: bindparam(column) for column in columns})


async def _insert_lines(session: AsyncSession, lines: list[StoredLine]) -> None:
    """Insert through the raw driver: SQLAlchemy's per-row processing costs more than the
    database itself at these volumes (benchmarks/log_ingest)."""
    connection = await session.connection()
    raw = await connection.get_raw_connection()
    driver: Any = raw.driver_connection
    if connection.dialect.name == "postgresql":
        await driver.copy_records_to_table(
            "log_lines",
            records=[
                (line.command_id, line.seq, line.attempt, line.stream, line.ts, line.text)
                for line in lines
            ],
            columns=COLUMNS,
        )
        return
    # SQLite keeps UTC timestamps as naive text, the way server.models.UTCDateTime does.
    rows = [
        (
            line.command_id,
            line.seq,
            line.attempt,
            line.stream,
            line.ts.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds"),
            line.text,
        )
        for line in lines
    ]
    await driver.executemany(SQLITE_INSERT, rows)


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
