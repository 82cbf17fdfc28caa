"""The runner's one writer: every attempt's log lines, events and command updates, and the
runner's claims, stored together in one transaction per flush, then published.

Per command, a `LogWriter` numbers lines gaplessly and redacts them; the `LogStore` behind
all of them flushes whatever is pending (of every command) in one transaction, the runner's
claim included, so a busy runner costs one transaction per flush and not one per line, per
command or per state change. A flush starts as soon as the previous one ends: lines that
arrive meanwhile ride along with the next one.

Lines go in through one statement per flush, whatever their number: on PostgreSQL a COPY
(foreign key checks make INSERT ... SELECT FROM unnest() slower), or for a few lines an
INSERT from arrays that is one statement with the flush's command updates (a flush of that
statement alone is one round trip); on SQLite an INSERT ... SELECT FROM json_each() of one
JSON text. On SQLite the flush runs in a thread of its own with a
connection of its own: a single statement keeps the thread out of the interpreter while
SQLite works (executemany would take and give back the GIL once per row, and wait up to the
switch interval each time the event loop is busy).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import json
import logging
import random
import re
import sys
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple, TypeVar

from sqlalchemy import JSON, Connection, Engine, bindparam, insert, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.exc import DBAPIError
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from runner.events import (
    EVENT_PREFIX,
    MAX_EVENTS_PER_ATTEMPT,
    ChildEvent,
    EventRejected,
    parse_event,
)
from runner.lines import Redactor
from server.broker import USAGE_TOPIC, Broker, UsageRecorded, command_topic
from server.db import create_sync_engine, sqlite_timestamp
from server.metrics import Metrics
from server.models import Command, CommandEvent, LogStream, ServiceUsage, UsageSource, utcnow

log = logging.getLogger("corral.runner")

T = TypeVar("T")
_EVENT_PREFIXES = itertools.repeat(EVENT_PREFIX)
_STDOUT, _SYSTEM = LogStream.STDOUT.value, LogStream.SYSTEM.value
# Lines waiting to be stored, over all commands, in number and in characters: past either,
# the pipe readers wait and the children block on write (the flush being committed and the
# one built meanwhile hold as much again at most).
MAX_PENDING_LINES = 50_000
MAX_PENDING_CHARS = 64 * 1024 * 1024
FLUSH_LINES = 10_000  # lines of one command per flush (a published batch stays small)
# Lines wait this long for company before a flush of their own (a claim or a writer that
# waits for its lines to be stored starts one at once).
LINGER_SECONDS = 0.004
# A flush of at least this many lines is built while the one before it commits.
EARLY_BUILD_LINES = 1_000
# A database that is down or busy is tried again for as long as the runner lives, waiting
# longer each time up to this (lines wait meanwhile: nothing is dropped)...
RETRY_FIRST_SECONDS = 0.2
RETRY_MAX_SECONDS = 5.0
# ...and for this long once the runner stops; what is still held then is given up (logged).
SHUTDOWN_RETRY_SECONDS = 15.0
# PostgreSQL: the store keeps one connection of its own (a pool checkout per flush cost more
# than a short command's flush itself), replaced when it breaks and after this long.
CONNECTION_MAX_AGE_SECONDS = 1800.0
# SQLSTATE classes worth another try: connection exception, transaction rollback
# (serialization failure, deadlock), insufficient resources, operator intervention.
RETRYABLE_SQLSTATE_CLASSES = frozenset({"08", "40", "53", "57"})
# SQLite primary result codes worth another try: BUSY, LOCKED, NOMEM, READONLY, IOERR,
# FULL, CANTOPEN, PROTOCOL (a file that is locked, unwritable or gone for a while).
RETRYABLE_SQLITE_CODES = frozenset({5, 6, 7, 8, 10, 13, 14, 15})
# The command columns a share keeps when even its own values cannot be stored: its state.
STATE_COLUMNS = frozenset(
    {
        "status",
        "exit_code",
        "finished_at",
        "next_attempt_at",
        "max_attempts",
        "uncounted_attempts",
        "runner_id",
        "lease_expires_at",
        "pgid",
        "cancel_requested",
        "last_seq",
        "lines_lost",
    }
)
COLUMNS = ("command_id", "seq", "attempt", "stream", "ts", "text")
COPY_MIN_LINES = 200
# One JSON text: [[command_id, attempt, stream, ts, first_seq, [text, ...]], ...]. The CTE
# reads each chunk's fields once (per line, `c.value ->> n` would parse the chunk again).
SQLITE_INSERT_LINES = (
    "INSERT INTO log_lines (command_id, seq, attempt, stream, ts, text) "
    "WITH c AS MATERIALIZED (SELECT value ->> 0 AS command_id, value ->> 1 AS attempt, "
    "value ->> 2 AS stream, value ->> 3 AS ts, value ->> 4 AS first_seq, value -> 5 AS texts "
    "FROM json_each(?)) "
    "SELECT c.command_id, c.first_seq + t.key, c.attempt, c.stream, c.ts, t.value "
    "FROM c, json_each(c.texts) AS t"
)


class LineRun(NamedTuple):
    """Lines with consecutive seqs that share an attempt, a stream and a timestamp (those of
    one read of a pipe): how lines are stored, published and streamed, with no object per
    line on the way (one per line cost more than anything else from pipe to socket)."""

    attempt: int
    stream: str
    ts: datetime
    first_seq: int
    texts: list[str]

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.texts) - 1

    def after(self, seq: int) -> LineRun:
        """The part of this run past `seq`."""
        skip = max(0, min(seq - self.first_seq + 1, len(self.texts)))
        return self._replace(first_seq=self.first_seq + skip, texts=self.texts[skip:])


@dataclass(frozen=True)
class StoredBatch:
    """Lines of one command stored in one transaction, published as one message."""

    command_id: int
    runs: list[LineRun]

    @property
    def weight(self) -> int:
        """What it costs a subscriber's bounded queue: its number of lines."""
        return sum(len(run.texts) for run in self.runs)

    @property
    def nbytes(self) -> int:
        """Memory its lines hold: what it costs a subscriber's queue (bounded in bytes)."""
        # A run: its tuple and list (~150 bytes); a line: its str and its slot in the list.
        return 150 * (1 + len(self.runs)) + sum(
            sum(map(sys.getsizeof, run.texts)) + 8 * len(run.texts) for run in self.runs
        )

    def after(self, seq: int) -> StoredBatch:
        """The lines of this batch past `seq`."""
        runs = [run if run.first_seq > seq else run.after(seq) for run in self.runs]
        return StoredBatch(self.command_id, [run for run in runs if run.texts])


@dataclass(slots=True)
class _Chunk:
    stream: str
    lines: list[str]
    ts: datetime
    command_values: dict[str, Any] | None = None
    size: int = 0  # characters (what it holds in memory, about)


class _Event(NamedTuple):
    seq: int  # that of the line it came after (its place in the log)
    ts: datetime
    event: ChildEvent


@dataclass
class _Rows:
    """One command's share of a flush, numbered and redacted."""

    writer: LogWriter
    runs: list[LineRun] = field(default_factory=list)
    lines: int = 0
    events: list[_Event] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)


@dataclass
class _Job:
    run: Callable[[Connection], Any]
    future: asyncio.Future[Any]


class _ConnectionLost(Exception):
    """The store's own PostgreSQL connection broke during a flush (it is replaced)."""


class _Unstorable(Exception):
    """The database refused what a flush (or a share of it) holds: trying it again as it is
    would never end."""

    def __init__(self, error: Exception) -> None:
        super().__init__(repr(error))
        self.error = error


class _GaveUp(Exception):
    """The runner is stopping and the database stayed unreachable."""


class _JobFailed(Exception):
    def __init__(self, job: _Job, error: Exception) -> None:
        super().__init__(repr(error))
        self.job = job
        self.error = error


class LogWriter:
    """One attempt's lines: redacted and numbered here, stored by the runner's LogStore.

    `add` and `add_lines` wait while the store is too far behind: the pipe readers stop
    reading and the child blocks on write. Memory stays bounded; nothing is dropped.
    """

    def __init__(
        self,
        store: LogStore,
        command_id: int,
        attempt: int,
        last_seq: int,
        redactor: Redactor | None = None,
        service_ids: dict[str, int] | None = None,
        profile_id: int | None = None,
    ) -> None:
        self._store = store
        self.command_id = command_id
        self.attempt = attempt
        self.seq = last_seq
        self.redactor = redactor or Redactor([])
        self.service_ids = service_ids or {}
        self.profile_id = profile_id
        # The services whose token is the profile's own: their usage is the profile's;
        # any other service's usage is its shared token's (profile_id NULL).
        self.own_token_services: frozenset[int] = frozenset()
        self.chunks: list[_Chunk] = []
        self.events_taken = 0
        self.lines_lost = 0  # given up (unstorable): the command row counts them too

    async def add(
        self, stream: LogStream, text: str, *, command_values: dict[str, Any] | None = None
    ) -> None:
        """Queue one line; `command_values` are written to the command row with it."""
        chunk = _Chunk(stream.value, [text], utcnow(), command_values, len(text))
        await self._store.enqueue(self, chunk)

    async def add_lines(self, stream: LogStream, lines: list[str], size: int | None = None) -> None:
        """Queue the lines of one read; `size`: what was read, when the caller knows it."""
        if lines:
            if size is None:
                size = sum(map(len, lines))
            await self._store.enqueue(self, _Chunk(stream.value, lines, utcnow(), size=size))

    async def close(self) -> None:
        """Wait until everything queued so far is stored."""
        await self._store.stored(self)

    def take(self) -> list[_Chunk]:
        """The chunks of the next flush: all of them, or the first FLUSH_LINES lines' worth."""
        taken = 0
        for index, chunk in enumerate(self.chunks):
            taken += len(chunk.lines)
            if taken >= FLUSH_LINES:
                batch, self.chunks = self.chunks[: index + 1], self.chunks[index + 1 :]
                return batch
        batch, self.chunks = self.chunks, []
        return batch

    def number(self, chunks: list[_Chunk]) -> _Rows:
        """Redact and number; `::corral::` lines on stdout become events."""
        rows = _Rows(self)
        redact = self.redactor
        for chunk in chunks:
            if chunk.command_values:
                rows.values.update(chunk.command_values)
            texts = redact.all(chunk.lines)
            if chunk.stream == _STDOUT and any(map(str.startswith, texts, _EVENT_PREFIXES)):
                self._number_with_events(texts, chunk.ts, rows)
            elif texts:
                self._append(rows, chunk.stream, chunk.ts, texts)
        if rows.lines:
            rows.values["last_seq"] = self.seq
        return rows

    def unreadable(self, chunks: list[_Chunk], error: Exception) -> _Rows:
        """The share of chunks that could not be numbered: their command values, and one
        system line in place of their lines, which are lost."""
        rows = _Rows(self)
        for chunk in chunks:
            if chunk.command_values:
                rows.values.update(chunk.command_values)
        count = sum(len(chunk.lines) for chunk in chunks)
        self.lines_lost += count
        note = f"{count} log line(s) could not be read and are lost: {_summary(error)}"
        self._append(rows, _SYSTEM, utcnow(), [note])
        rows.values |= {"last_seq": self.seq, "lines_lost": self.lines_lost}
        return rows

    def _append(self, rows: _Rows, stream: str, ts: datetime, texts: list[str]) -> None:
        rows.runs.append(LineRun(self.attempt, stream, ts, self.seq + 1, texts))
        self.seq += len(texts)
        rows.lines += len(texts)

    def _number_with_events(self, texts: list[str], ts: datetime, rows: _Rows) -> None:
        """Events are taken out of the lines; one that cannot be stored is refused here,
        with a system line in its place that says why (it never reaches the database)."""
        kept: list[str] = []
        for text in texts:
            if not text.startswith(EVENT_PREFIX):
                kept.append(text)
                continue
            try:
                event = self._event(text[len(EVENT_PREFIX) :])
            except EventRejected as refused:
                if kept:
                    self._append(rows, _STDOUT, ts, kept)
                    kept = []
                self._append(rows, _SYSTEM, ts, [f"ignored ::corral:: event: {refused}"])
                continue
            if event is None:  # not an event: a plain line
                kept.append(text)
                continue
            rows.events.append(_Event(self.seq + len(kept), ts, event))
        if kept:
            self._append(rows, _STDOUT, ts, kept)

    def _event(self, payload: str) -> ChildEvent | None:
        event = parse_event(payload, self.service_ids)
        if event is not None:
            self.events_taken += 1
            if self.events_taken > MAX_EVENTS_PER_ATTEMPT:
                raise EventRejected(f"more than {MAX_EVENTS_PER_ATTEMPT} events in this attempt")
        return event


class LogStore:
    """Stores what the runner's writers queue, and runs its claims, one transaction a flush."""

    def __init__(
        self,
        engine: AsyncEngine,
        broker: Broker,
        metrics: Metrics | None = None,
        runner_id: str | None = None,
    ) -> None:
        self._engine = engine
        self._broker = broker
        self._metrics = metrics
        # Command values (status, pgid ...) are written only while this runner holds it.
        self._runner_id = runner_id
        self._sqlite = engine.dialect.name == "sqlite"
        self._sync_engine: Engine | None = None
        self._executor: ThreadPoolExecutor | None = None
        self._connection: AsyncConnection | None = None  # PostgreSQL: the store's own
        self._driver: Any = None  # its driver (asyncpg) connection
        self._connected_at = 0.0
        self._dirty: dict[int, LogWriter] = {}
        self._jobs: list[_Job] = []
        self._waiters: list[tuple[LogWriter, asyncio.Future[None]]] = []
        self._pending_lines = 0
        self._pending_chars = 0
        self._give_up_at: float | None = None  # set as the runner stops
        self._outage_since: float | None = None  # the database has refused to take writes
        self._room = asyncio.Event()
        self._room.set()
        self._wake = asyncio.Event()
        self._linger: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    # -- lifecycle ---------------------------------------------------------------------

    def start(self) -> None:
        if self._sqlite:
            self._sync_engine = create_sync_engine(self._engine.url)
            self._executor = ThreadPoolExecutor(1, thread_name_prefix="corral-logstore")
        self._closing = False
        self._give_up_at = None
        self._task = asyncio.create_task(self._run(), name="logstore")

    def shutting_down(self) -> None:
        """The runner is stopping: a database still unreachable SHUTDOWN_RETRY_SECONDS from
        now is given up on (what is held then is logged as lost), so that stopping ends."""
        if self._give_up_at is None:
            self._give_up_at = time.monotonic() + SHUTDOWN_RETRY_SECONDS

    async def close(self) -> None:
        """Store everything queued, then stop."""
        self.shutting_down()
        self._closing = True
        self._wake.set()
        if self._task is not None:
            await self._task
            self._task = None
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._sync_engine is not None:
            self._sync_engine.dispose()
            self._sync_engine = None
        await self._drop_connection(broken=False)

    # -- what writers and the runner call ----------------------------------------------

    def writer(
        self,
        command_id: int,
        attempt: int,
        last_seq: int,
        redactor: Redactor | None = None,
        service_ids: dict[str, int] | None = None,
        profile_id: int | None = None,
    ) -> LogWriter:
        return LogWriter(self, command_id, attempt, last_seq, redactor, service_ids, profile_id)

    async def enqueue(self, writer: LogWriter, chunk: _Chunk) -> None:
        while self._full() and self._task is not None:
            self._room.clear()
            await self._room.wait()
        writer.chunks.append(chunk)
        self._pending_lines += len(chunk.lines)
        self._pending_chars += chunk.size
        self._dirty[writer.command_id] = writer
        if self._pending_lines >= FLUSH_LINES:
            self._wake.set()
        elif self._linger is None:
            self._linger = asyncio.get_running_loop().call_later(LINGER_SECONDS, self._wake.set)

    async def stored(self, writer: LogWriter) -> None:
        """Return once everything `writer` queued so far is committed."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((writer, future))
        self._wake.set()
        await future

    def submit(self, job: Callable[[Connection], T]) -> asyncio.Future[T]:
        """Run `job(connection)` in the next flush's transaction, after its writes; its
        result comes in the returned future. The job is queued before this returns: it goes
        with the writes queued so far (unless their flush is already being built) and those
        queued next."""
        future: asyncio.Future[T] = asyncio.get_running_loop().create_future()
        self._jobs.append(_Job(job, future))
        self._wake.set()
        return future

    # -- flushing ----------------------------------------------------------------------

    async def _run(self) -> None:
        """Two stages: while one flush is being committed, the next one is numbered and
        built (commits stay in order: a flush is committed after the one before it).

        Only a big flush is built that early, though: a small one is built when it can go,
        so that what is queued meanwhile (the claim for a slot that frees, the final state
        of the command that leaves it) still goes with it rather than a flush later."""
        committing: asyncio.Task[None] | None = None
        try:
            while True:
                await self._wake.wait()
                await asyncio.sleep(0)  # let whatever else is ready queue its part first
                if (
                    committing is not None
                    and not committing.done()
                    and self._pending_lines < EARLY_BUILD_LINES
                ):
                    await asyncio.wait([committing])
                self._wake.clear()
                if not (self._dirty or self._jobs or self._waiters):
                    if self._closing:
                        return
                    continue
                try:
                    flush = self._prepare()
                except Exception as exc:  # never die: a dead store would stall every child
                    log.exception("log store flush failed: %r", exc)
                    continue
                if committing is not None:
                    await committing
                committing = asyncio.create_task(self._complete(flush))
        finally:
            if committing is not None:
                await committing

    def _prepare(self) -> _Flush:
        """Take what is pending: lines numbered and redacted, the rows to write, the jobs,
        and the writers waiting for everything they queued to be stored."""
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        flush = _Flush()
        dirty, self._dirty = self._dirty, {}
        for writer in dirty.values():
            chunks = writer.take()
            self._pending_lines -= sum(len(chunk.lines) for chunk in chunks)
            self._pending_chars -= sum(chunk.size for chunk in chunks)
            flush.shares.append(self._number(writer, chunks))
            if writer.chunks:  # more than one flush's worth: the rest goes next
                self._dirty[writer.command_id] = writer
        if not self._full():
            self._room.set()
        flush.jobs, self._jobs = self._jobs, []
        waiters, self._waiters = self._waiters, []
        for writer, future in waiters:
            if writer.chunks:  # its rest goes with a later flush
                self._waiters.append((writer, future))
            else:
                flush.waiters.append(future)
        if self._dirty or self._waiters:
            self._wake.set()
        try:
            flush.payload = self._payload(flush.shares)
        except Exception as exc:  # each share is then built (and stored) apart
            log.warning("building %s failed: %s", _describe(flush.shares), _summary(exc))
            flush.payload = None
        return flush

    def _full(self) -> bool:
        return self._pending_lines >= MAX_PENDING_LINES or self._pending_chars >= MAX_PENDING_CHARS

    @staticmethod
    def _number(writer: LogWriter, chunks: list[_Chunk]) -> _Rows:
        """The writer's share; should numbering fail, its state still goes, with a note."""
        seq, events_taken = writer.seq, writer.events_taken
        try:
            return writer.number(chunks)
        except Exception as exc:
            log.warning("command %d: numbering its lines failed: %r", writer.command_id, exc)
            writer.seq, writer.events_taken = seq, events_taken
            return writer.unreadable(chunks, exc)

    async def _complete(self, flush: _Flush) -> None:
        """Commit a flush, then publish its lines and tell its writers and jobs."""
        stored = True
        try:
            done = await self._commit(flush) if flush.shares or flush.jobs else []
        except Exception as exc:  # never die: a dead store would stall every child
            log.exception("log store flush failed: %r", exc)
            done, stored = [], False
            for job in flush.jobs:
                if not job.future.done():
                    job.future.set_exception(exc)
        if stored:  # a refused share's events were cleared (_reduce): only stored ones count
            for service_id in sorted(_usage_services(flush.shares)):
                self._broker.publish(USAGE_TOPIC, UsageRecorded(service_id))
        for share in flush.shares:
            if share.runs:
                batch = StoredBatch(share.writer.command_id, share.runs)
                self._broker.publish(command_topic(batch.command_id), batch)
                if self._metrics is not None:
                    self._metrics.log_lines.inc(share.lines)
        for future in flush.waiters:
            if not future.done():
                future.set_result(None)
        # Jobs (the runner's claims) hear after the writers: a command's final state is
        # announced before the claim that took its slot.
        for job, result in done:
            if not job.future.done():
                job.future.set_result(result)

    async def _commit(self, flush: _Flush) -> list[tuple[_Job, Any]]:
        """One transaction: the lines, events and command values, then the jobs. A failing
        job is taken out (its caller gets the error) and the rest committed without it; a
        database that is down or busy is waited for. A flush the database refuses is split:
        each command's share is stored apart, then the jobs, so one command's share can
        only cost that command (issue 10)."""
        shares, jobs = flush.shares, flush.jobs
        refused: Exception | None = None  # the one share of the flush, refused already
        if flush.payload is not None:
            try:
                return await self._store(flush.payload, jobs, shares)
            except _GaveUp as exc:
                self._give_up(shares, jobs, exc)
                return []
            except _Unstorable as exc:
                if len(shares) + bool(jobs) == 1:
                    refused = exc.error
                else:
                    log.warning(
                        "storing %s failed (%s); storing each command's share apart",
                        _describe(shares),
                        _summary(exc.error),
                    )
        for index, share in enumerate(shares):
            try:
                await self._store_share(share, refused)
            except _GaveUp as exc:
                self._give_up(shares[index:], jobs, exc)
                return []
        if not jobs:
            return []
        try:
            return await self._store(_Payload(), jobs, [])
        except (_GaveUp, _Unstorable) as exc:
            self._give_up([], jobs, exc)
            return []

    async def _store(
        self, payload: _Payload, jobs: list[_Job], shares: list[_Rows]
    ) -> list[tuple[_Job, Any]]:
        """Commit `payload` and `jobs`, trying again (with backoff) while the database is
        unreachable or busy, for as long as the runner lives. Raises _Unstorable when the
        database refuses the writes themselves, _GaveUp when the runner stops meanwhile."""
        delay = RETRY_FIRST_SECONDS
        uncertain = False  # a try failed in a way that may have come after its COMMIT
        while True:
            try:
                results = await self._transact(payload, jobs)
            except _JobFailed as failed:
                if not retryable_database_error(failed.error):
                    jobs = [job for job in jobs if job is not failed.job]
                    if not failed.job.future.done():
                        failed.job.future.set_exception(failed.error)
                    continue
                error: Exception = failed.error
            except Exception as exc:
                if uncertain and _duplicate_key(exc):
                    # The connection broke after the server committed an earlier try: its
                    # lines are stored (a flush is one transaction). Its jobs' outcome is
                    # unknown to them: they hear so (a claim is made again).
                    self._outage_over()
                    lost = RuntimeError("the database connection broke while committing")
                    for job in jobs:
                        if not job.future.done():
                            job.future.set_exception(lost)
                    return []
                if not retryable_database_error(exc):
                    raise _Unstorable(exc) from exc
                error = exc
            else:
                self._outage_over()
                return list(zip(jobs, results, strict=True))
            uncertain = True
            self._outage_begins(error, shares)
            if self._give_up_at is not None and time.monotonic() >= self._give_up_at:
                raise _GaveUp(_summary(error))
            await asyncio.sleep(random.uniform(delay / 2, delay))  # noqa: S311 - jitter
            delay = min(delay * 2, RETRY_MAX_SECONDS)

    def _outage_begins(self, error: Exception, shares: list[_Rows]) -> None:
        """One WARNING an outage (not one a try); its end is logged at INFO."""
        if self._outage_since is not None:
            log.debug("still cannot store: %s", _summary(error))
            return
        self._outage_since = time.monotonic()
        log.warning(
            "cannot store to the database (%s): holding %s and trying again until it can; "
            "the children wait meanwhile",
            _summary(error),
            _describe(shares),
        )

    def _outage_over(self) -> None:
        if self._outage_since is not None:
            log.info(
                "the database takes writes again after %.1fs: what was held is stored",
                time.monotonic() - self._outage_since,
            )
            self._outage_since = None

    async def _store_share(self, share: _Rows, refused: Exception | None = None) -> None:
        """One command's share alone; when the database refuses it (`refused`: it did
        already), what of it can be stored: a system line in place of its lines with all its
        values, then with its state only, then its state alone (a final state is never
        lost)."""
        error: Exception = refused or RuntimeError("not stored")
        for reduction in range(1 if refused else 0, 4):
            try:
                if reduction:
                    self._reduce(share, reduction, error)
                await self._store(self._payload([share]), [], [share])
                return
            except _GaveUp:
                raise
            except _Unstorable as exc:
                error = exc.error
            except Exception as exc:  # its payload could not even be built
                error = exc
        log.error(
            "command %d: not even its state could be stored: %s",
            share.writer.command_id,
            _summary(error),
        )
        share.runs.clear()

    @staticmethod
    def _reduce(share: _Rows, reduction: int, error: Exception) -> None:
        writer = share.writer
        if reduction == 1:
            log.warning(
                "command %d: the database refused its share (%s); storing its state and a "
                "note in place of its lines",
                writer.command_id,
                _summary(error),
            )
            share.events.clear()
            if share.runs:
                first, last = share.runs[0].first_seq, share.runs[-1].last_seq
                writer.lines_lost += share.lines
                note = (
                    f"{share.lines} log line(s) (seq {first} to {last}) could not be stored "
                    f"and are lost: {_summary(error)}"
                )
                share.runs = [LineRun(writer.attempt, _SYSTEM, utcnow(), first, [note])]
                share.lines = 1
            share.values["lines_lost"] = writer.lines_lost
        elif reduction == 2:
            share.values = {k: v for k, v in share.values.items() if k in STATE_COLUMNS}
        else:
            share.runs.clear()
            share.lines = 0

    def _give_up(self, shares: list[_Rows], jobs: list[_Job], error: Exception) -> None:
        """The runner stops and the database stayed unreachable: what is held is lost."""
        if shares:
            log.error(
                "the database stayed unreachable as the runner stopped: gave up %s (%s)",
                _describe(shares),
                error,
            )
        for share in shares:
            share.writer.lines_lost += share.lines
            share.runs.clear()
        failure = RuntimeError(f"the log store could not run it: {error}")
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(failure)

    async def _transact(self, payload: _Payload, jobs: list[_Job]) -> list[Any]:
        if self._sqlite:
            assert self._executor is not None
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self._transact_sqlite, payload, jobs)
        connection, driver = await self._pg_connection()
        try:
            # One transaction of the driver's own; lines and command values go through the
            # driver itself (SQLAlchemy's share of a short command's flush was most of it).
            # SQLAlchemy runs the events and jobs in that same transaction: with AUTOCOMMIT
            # it begins none of its own.
            write = _pg_write(payload)
            if write is not None and not (payload.pg_copy or payload.events or jobs):
                await driver.execute(write[0], *write[1])  # one statement: its own transaction
                return []
            async with driver.transaction():
                if payload.pg_copy:  # COPY: the fastest way in (foreign key checks included)
                    await driver.copy_to_table(
                        "log_lines",
                        source=_one_chunk("".join(payload.pg_copy).encode()),
                        columns=COLUMNS,
                        format="text",
                    )
                if write is not None:
                    await driver.execute(write[0], *write[1])
                if payload.events:
                    await connection.run_sync(self._write_rest, payload, [])
                return [await self._run_on_driver(job, connection, driver) for job in jobs]
        except _JobFailed as failed:
            if driver.is_closed():  # the connection broke during the job
                await self._drop_connection(broken=True)
                raise _ConnectionLost(repr(failed.error)) from failed.error
            raise  # rolled back; the connection is fine
        except Exception as exc:
            if driver.is_closed():
                await self._drop_connection(broken=True)
                raise _ConnectionLost(repr(exc)) from exc
            raise
        except BaseException:  # cancelled mid-statement: its state is unknown
            await self._drop_connection(broken=True)
            raise

    async def _pg_connection(self) -> tuple[AsyncConnection, Any]:
        """The store's own connection (AUTOCOMMIT: transactions are the driver's) and its
        driver connection; a new one when there is none, it broke, or it is old."""
        if self._connection is not None and (
            self._driver.is_closed()
            or time.monotonic() - self._connected_at > CONNECTION_MAX_AGE_SECONDS
        ):
            await self._drop_connection(broken=self._driver.is_closed())
        if self._connection is None:
            connection = await self._engine.connect()
            try:
                connection = await connection.execution_options(isolation_level="AUTOCOMMIT")
                raw = await connection.get_raw_connection()
            except BaseException:
                await connection.close()
                raise
            self._connection, self._driver = connection, raw.driver_connection
            self._connected_at = time.monotonic()
        return self._connection, self._driver

    async def _drop_connection(self, broken: bool) -> None:
        connection, self._connection, self._driver = self._connection, None, None
        if connection is None:
            return
        with contextlib.suppress(Exception):
            if broken:
                await connection.invalidate()
            await connection.close()

    @staticmethod
    async def _run_on_driver(job: _Job, connection: AsyncConnection, driver: Any) -> Any:
        """A job with an `on_driver` coroutine runs on the driver; others via SQLAlchemy."""
        try:
            on_driver = getattr(job.run, "on_driver", None)
            if on_driver is not None:
                return await on_driver(driver)
            return await connection.run_sync(job.run)
        except Exception as exc:
            raise _JobFailed(job, exc) from exc

    def _transact_sqlite(self, payload: _Payload, jobs: list[_Job]) -> list[Any]:
        assert self._sync_engine is not None
        with self._sync_engine.begin() as connection:
            return self._write(connection, payload, jobs)

    def _payload(self, shares: list[_Rows]) -> _Payload:
        payload = _Payload()
        # A few lines (a runner of short commands) go in with one INSERT: a COPY costs
        # more round trips.
        use_copy = sum(share.lines for share in shares) >= COPY_MIN_LINES
        for share in shares:
            command_id = share.writer.command_id
            if share.values:
                guarded = self._runner_id is not None
                key = (tuple(sorted(share.values)), guarded)
                payload.updates.setdefault(key, []).append(
                    {**share.values, "_id": command_id, "_runner": self._runner_id}
                )
            for event in share.events:
                payload.events.append((share.writer, event))
            if not share.runs:
                continue
            if self._sqlite:
                payload.sqlite_chunks.extend(
                    [command_id, attempt, stream, sqlite_timestamp(ts), first, texts]
                    for attempt, stream, ts, first, texts in share.runs
                )
                continue
            if not use_copy:
                payload.pg_rows.extend((command_id, run) for run in share.runs)
                continue
            for attempt, stream, ts, first, texts in share.runs:
                # COPY's text format, written here: cheaper than asyncpg's per-row encoder.
                row = f"{command_id}\t{{}}\t{attempt}\t{stream}\t{ts.isoformat()}\t{{}}\n"
                payload.pg_copy.append(
                    "".join(map(row.format, range(first, first + len(texts)), _copy_escape(texts)))
                )
        return payload

    def _write(self, connection: Connection, payload: _Payload, jobs: list[_Job]) -> list[Any]:
        """SQLite: the whole flush (in the store's thread)."""
        if payload.sqlite_chunks:
            text = json.dumps(payload.sqlite_chunks, ensure_ascii=False, separators=(",", ":"))
            connection.exec_driver_sql(SQLITE_INSERT_LINES, (text,))
        for (columns, guarded), params in payload.updates.items():
            connection.execute(_command_update(columns, guarded), params)
        return self._write_rest(connection, payload, jobs)

    def _write_rest(self, connection: Connection, payload: _Payload, jobs: list[_Job]) -> list[Any]:
        """Events, then the jobs."""
        for writer, event in payload.events:
            _store_event(connection, writer, event)
        results = []
        for job in jobs:
            try:
                results.append(job.run(connection))
            except Exception as exc:
                raise _JobFailed(job, exc) from exc
        return results


@dataclass
class _Flush:
    shares: list[_Rows] = field(default_factory=list)
    jobs: list[_Job] = field(default_factory=list)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    payload: _Payload | None = field(default_factory=lambda: _Payload())


@dataclass
class _Payload:
    sqlite_chunks: list[list[Any]] = field(default_factory=list)
    pg_copy: list[str] = field(default_factory=list)
    pg_rows: list[tuple[int, LineRun]] = field(default_factory=list)
    updates: dict[tuple[tuple[str, ...], bool], list[dict[str, Any]]] = field(default_factory=dict)
    events: list[tuple[LogWriter, _Event]] = field(default_factory=list)


def _copy_escape(texts: list[str]) -> list[str]:
    """Texts as COPY's text format wants them (backslash, tab, CR, LF escaped; NUL, which
    PostgreSQL text cannot hold, replaced)."""
    joined = "".join(texts)
    if not any(special in joined for special in _COPY_SPECIALS):
        return texts
    return [
        t.replace("\\", "\\\\")
        .replace("\t", "\\t")
        .replace("\r", "\\r")
        .replace("\n", "\\n")
        .replace("\x00", "\ufffd")
        for t in texts
    ]


_COPY_SPECIALS = ("\\", "\t", "\r", "\n", "\x00")


async def _one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


UNIQUE_VIOLATION = "23505"  # PostgreSQL's SQLSTATE
SQLITE_DUPLICATE_KEYS = frozenset({1555, 2067})  # SQLITE_CONSTRAINT_PRIMARYKEY, _UNIQUE


def _duplicate_key(exc: BaseException) -> bool:
    """Whether the database refused `exc`'s statement for a key it holds already (looking
    through SQLAlchemy's wrapper to the driver's error)."""
    current: BaseException | None = exc
    for _ in range(5):
        if current is None:
            break
        if getattr(current, "sqlstate", None) == UNIQUE_VIOLATION:
            return True
        if getattr(current, "sqlite_errorcode", None) in SQLITE_DUPLICATE_KEYS:
            return True
        current = getattr(current, "orig", None) or current.__cause__
    return False


def retryable_database_error(exc: BaseException) -> bool:
    """A database that is down, unreachable, busy or overloaded (worth waiting for), as
    against one that refuses the statement itself (trying that again would never end).
    Looks through SQLAlchemy's wrapper to the driver's error."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        if isinstance(current, _ConnectionLost | OSError | TimeoutError):
            return True
        if isinstance(current, DBAPIError) and current.connection_invalidated:
            return True
        state = getattr(current, "sqlstate", None)
        if isinstance(state, str) and state:
            return state[:2] in RETRYABLE_SQLSTATE_CLASSES
        code = getattr(current, "sqlite_errorcode", None)
        if isinstance(code, int):
            return code & 0xFF in RETRYABLE_SQLITE_CODES
        current = getattr(current, "orig", None) or current.__cause__
    return False


def _summary(error: BaseException) -> str:
    """An error in one short line (the driver's own message, not SQLAlchemy's statement and
    parameters), in ASCII: it goes into a log line that must be storable itself."""
    if isinstance(error, DBAPIError) and error.orig is not None:
        error = error.orig
    lines = str(error).strip().splitlines()
    text = f"{type(error).__name__}: {lines[0][:200] if lines else ''}"
    return text.encode("ascii", "backslashreplace").decode("ascii")


def _describe(shares: list[_Rows]) -> str:
    lines = sum(share.lines for share in shares)
    commands = ", ".join(str(share.writer.command_id) for share in shares)
    return f"{lines} log lines of command(s) {commands or '-'}"


@functools.lru_cache(maxsize=64)
def _command_update(columns: tuple[str, ...], guarded: bool) -> Any:
    """UPDATE of these columns, built once per column set."""
    stmt = update(Command).where(Command.id == bindparam("_id"))
    if guarded:
        stmt = stmt.where(Command.runner_id == bindparam("_runner"))
    return stmt.values({column: bindparam(column) for column in columns})


def _pg_arrays(rows: list[tuple[int, LineRun]]) -> list[list[Any]]:
    """The lines as one array per column (NUL, which PostgreSQL text cannot hold, replaced)."""
    arrays: list[list[Any]] = [[], [], [], [], [], []]
    ids, seqs, attempts, streams, stamps, texts = arrays
    for command_id, run in rows:
        count = len(run.texts)
        ids += [command_id] * count
        seqs += range(run.first_seq, run.first_seq + count)
        attempts += [run.attempt] * count
        streams += [run.stream] * count
        stamps += [run.ts] * count
        texts += [t.replace("\x00", "\ufffd") if "\x00" in t else t for t in run.texts]
    return arrays


def _pg_write(payload: _Payload) -> tuple[str, list[Any]] | None:
    """The flush's few lines and all its command updates as one PostgreSQL statement (a
    statement a round trip, and a flush of this statement alone needs no BEGIN/COMMIT of
    its own): an INSERT of the lines from arrays, and one UPDATE from arrays per column set,
    as data-modifying CTEs. None when there is nothing of the kind. (A command is in one
    column set only: a flush holds one share per command.)"""
    args: list[Any] = []

    def param(value: Any, sql_type: str) -> str:
        args.append(value)
        return f"${len(args)}::{sql_type}"

    parts = []
    if payload.pg_rows:
        arrays = _pg_arrays(payload.pg_rows)
        columns = ", ".join(map(param, arrays, _LINE_ARRAY_TYPES))
        parts.append(
            f"lines AS (INSERT INTO log_lines ({', '.join(COLUMNS)}) "  # noqa: S608
            f"SELECT * FROM unnest({columns}))"
        )
    # Column sets in a fixed order: the same sets make the same text (the driver caches
    # prepared statements by their text).
    for index, ((names, guarded), rows) in enumerate(sorted(payload.updates.items())):
        sources = [param([row["_id"] for row in rows], "integer[]")]
        for name in names:
            values = [row[name] for row in rows]
            if name in _JSON_COLUMNS:
                values = [json.dumps(value) for value in values]  # the json codec takes text
            sources.append(param(values, _command_array_type(name)))
        assignments = ", ".join(f"{name} = v.{name}" for name in names)
        where = "c.id = v._id"
        if guarded:
            where += f" AND c.runner_id = {param(rows[0]['_runner'], 'text')}"
        parts.append(
            f"u{index} AS (UPDATE commands AS c SET {assignments} "  # noqa: S608 - checked names
            f"FROM unnest({', '.join(sources)}) AS v(_id, {', '.join(names)}) WHERE {where})"
        )
    if not parts:
        return None
    return f"WITH {', '.join(parts)} SELECT 1", args


_LINE_ARRAY_TYPES = ("integer[]", "integer[]", "integer[]", "varchar[]", "timestamptz[]", "text[]")


@functools.lru_cache(maxsize=64)
def _command_array_type(name: str) -> str:
    """The PostgreSQL array type of a commands column, without its length (a cast to
    VARCHAR(16)[] would cut a longer value silently; the column itself refuses it). A name
    not of the table is refused: names are written into the statement."""
    column = Command.__table__.c.get(name)
    if column is None or not name.isidentifier():
        raise ValueError(f"commands has no column {name!r}")
    return re.sub(r"\(.*?\)", "", column.type.compile(dialect=_PG_DIALECT)) + "[]"


_PG_DIALECT = postgresql.dialect()  # type: ignore[no-untyped-call]
_JSON_COLUMNS = frozenset(
    column.name for column in Command.__table__.c if isinstance(column.type, JSON)
)


def _usage_services(shares: list[_Rows]) -> set[int]:
    """The services whose budgets the flush's usage events spoke of."""
    return {
        stored.event.usage.service_id
        for share in shares
        for stored in share.events
        if stored.event.usage is not None
    }


def _store_event(connection: Connection, writer: LogWriter, stored: _Event) -> None:
    """A checked event (runner.events: every value fits its column) and its usage row."""
    event = stored.event
    connection.execute(
        insert(CommandEvent).values(
            command_id=writer.command_id,
            attempt=writer.attempt,
            seq=stored.seq,
            type=event.type,
            data=event.data,
            ts=stored.ts,
        )
    )
    usage = event.usage
    if usage is None:
        return
    connection.execute(
        insert(ServiceUsage).values(
            service_id=usage.service_id,
            profile_id=(
                writer.profile_id if usage.service_id in writer.own_token_services else None
            ),
            command_id=writer.command_id,
            units=usage.units,
            remaining=usage.remaining,
            limit=usage.limit,
            reset_at=usage.reset_at,
            token_valid=usage.token_valid,
            detail=usage.detail,
            observed_at=stored.ts,
            source=UsageSource.EVENT.value,
        )
    )
