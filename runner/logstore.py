"""The runner's one writer: every attempt's log lines, events and command updates, and the
runner's claims, stored together in one transaction per flush, then published.

Per command, a `LogWriter` (runner/logwriter.py) numbers lines gaplessly and redacts them;
the `LogStore` behind all of them flushes whatever is pending (of every command) in one
transaction of the store gateway (`RunnerStore.write_batch`, runner/store.py), the runner's
claim (`ClaimRequest`) included, so a busy runner costs one transaction per flush and not
one per line, per command or per state change. A flush starts as soon as the previous one
ends: lines that arrive meanwhile ride along with the next one.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar, overload

from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from runner.claims import ClaimRequest, ClaimResult
from runner.lines import Redactor
from runner.logwriter import FLUSH_LINES, LogWriter, Share, _Chunk
from runner.store import RunnerStore, StoreJob, WriteBatch, Written, open_store
from runner.store_errors import (
    JobFailed,
    duplicate_key,
    retryable_database_error,
    summary,
)
from server.broker import USAGE_TOPIC, Broker, UsageRecorded, command_topic
from server.messages import LineRun, StoredBatch
from server.metrics import Metrics
from server.models import LogStream, utcnow

log = logging.getLogger("corral.runner")

T = TypeVar("T")
_SYSTEM = LogStream.SYSTEM.value
# Lines waiting to be stored, over all commands, in number and in characters: past either,
# the pipe readers wait and the children block on write (the flush being committed and the
# one built meanwhile hold as much again at most).
MAX_PENDING_LINES = 50_000
MAX_PENDING_CHARS = 64 * 1024 * 1024
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


@dataclass
class _Job:
    run: StoreJob
    future: asyncio.Future[Any]


class _Unstorable(Exception):
    """The database refused what a flush (or a share of it) holds: trying it again as it is
    would never end."""

    def __init__(self, error: Exception) -> None:
        super().__init__(repr(error))
        self.error = error


class _GaveUp(Exception):
    """The runner is stopping and the database stayed unreachable."""


class LogStore:
    """Stores what the runner's writers queue, and runs its claims, one transaction a flush."""

    def __init__(
        self,
        engine: AsyncEngine,
        broker: Broker,
        metrics: Metrics | None = None,
        runner_id: str | None = None,
        sessionmaker: async_sessionmaker[AsyncSession] | None = None,
    ) -> None:
        self._broker = broker
        self._metrics = metrics
        # Command values (status, pgid ...) are written only while this runner holds it.
        self.gateway: RunnerStore = open_store(
            engine, sessionmaker or async_sessionmaker(engine, expire_on_commit=False), runner_id
        )
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
        self.gateway.start()
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
        await self.gateway.close()

    # -- what writers and the runner call ----------------------------------------------

    def writer(
        self,
        command_id: int,
        attempt: int,
        last_seq: int,
        redactor: Redactor | None = None,
        service_ids: dict[str, int] | None = None,
        profile_id: int | None = None,
        fence: int | None = None,
    ) -> LogWriter:
        return LogWriter(
            self, command_id, attempt, last_seq, redactor, service_ids, profile_id, fence
        )

    async def enqueue(self, writer: LogWriter, chunk: _Chunk) -> None:
        while self._full() and self._task is not None and not writer.lost:
            self._room.clear()
            await self._room.wait()
        if writer.lost:  # its fence was refused: nothing more of it is written
            return
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

    @overload
    def submit(self, job: ClaimRequest) -> asyncio.Future[ClaimResult]: ...
    @overload
    def submit(self, job: Callable[[Connection], T]) -> asyncio.Future[T]: ...
    def submit(self, job: StoreJob) -> asyncio.Future[Any]:
        """Run `job` in the next flush's transaction, after its writes: a `ClaimRequest`
        through the gateway's claim, a function of the SQLAlchemy connection as it is. Its
        result comes in the returned future. The job is queued before this returns: it goes
        with the writes queued so far (unless their flush is already being built) and those
        queued next."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
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
            flush.payload = self.gateway.build_batch(flush.shares)
        except Exception as exc:  # each share is then built (and stored) apart
            log.warning("building %s failed: %s", _describe(flush.shares), summary(exc))
            flush.payload = None
        return flush

    def _full(self) -> bool:
        return self._pending_lines >= MAX_PENDING_LINES or self._pending_chars >= MAX_PENDING_CHARS

    @staticmethod
    def _number(writer: LogWriter, chunks: list[_Chunk]) -> Share:
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
                        summary(exc.error),
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
            return await self._store(WriteBatch(), jobs, [])
        except (_GaveUp, _Unstorable) as exc:
            self._give_up([], jobs, exc)
            return []

    async def _store(
        self, payload: WriteBatch, jobs: list[_Job], shares: list[Share]
    ) -> list[tuple[_Job, Any]]:
        """Commit `payload` and `jobs`, trying again (with backoff) while the database is
        unreachable or busy, for as long as the runner lives. Raises _Unstorable when the
        database refuses the writes themselves, _GaveUp when the runner stops meanwhile."""
        delay = RETRY_FIRST_SECONDS
        uncertain = False  # a try failed in a way that may have come after its COMMIT
        while True:
            try:
                written = await self._transact(payload, jobs)
            except JobFailed as failed:
                if not retryable_database_error(failed.error):
                    job = jobs[failed.index]
                    jobs = [other for other in jobs if other is not job]
                    if not job.future.done():
                        job.future.set_exception(failed.error)
                    continue
                error: Exception = failed.error
            except Exception as exc:
                if uncertain and duplicate_key(exc):
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
                self._fenced_out(written.refused, shares)
                return list(zip(jobs, written.results, strict=True))
            uncertain = True
            self._outage_begins(error, shares)
            if self._give_up_at is not None and time.monotonic() >= self._give_up_at:
                raise _GaveUp(summary(error))
            await asyncio.sleep(random.uniform(delay / 2, delay))  # noqa: S311 - jitter
            delay = min(delay * 2, RETRY_MAX_SECONDS)

    def _outage_begins(self, error: Exception, shares: list[Share]) -> None:
        """One WARNING an outage (not one a try); its end is logged at INFO."""
        if self._outage_since is not None:
            log.debug("still cannot store: %s", summary(error))
            return
        self._outage_since = time.monotonic()
        log.warning(
            "cannot store to the database (%s): holding %s and trying again until it can; "
            "the children wait meanwhile",
            summary(error),
            _describe(shares),
        )

    def _outage_over(self) -> None:
        if self._outage_since is not None:
            log.info(
                "the database takes writes again after %.1fs: what was held is stored",
                time.monotonic() - self._outage_since,
            )
            self._outage_since = None

    async def _store_share(self, share: Share, refused: Exception | None = None) -> None:
        """One command's share alone; when the database refuses it (`refused`: it did
        already), what of it can be stored: a system line in place of its lines with all its
        values, then with its state only, then its state alone (a final state is never
        lost)."""
        error: Exception = refused or RuntimeError("not stored")
        for reduction in range(1 if refused else 0, 4):
            try:
                if reduction:
                    self._reduce(share, reduction, error)
                await self._store(self.gateway.build_batch([share]), [], [share])
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
            summary(error),
        )
        share.runs.clear()

    @staticmethod
    def _reduce(share: Share, reduction: int, error: Exception) -> None:
        writer = share.writer
        if reduction == 1:
            log.warning(
                "command %d: the database refused its share (%s); storing its state and a "
                "note in place of its lines",
                writer.command_id,
                summary(error),
            )
            share.events.clear()
            if share.runs:
                first, last = share.runs[0].first_seq, share.runs[-1].last_seq
                writer.lines_lost += share.lines
                note = (
                    f"{share.lines} log line(s) (seq {first} to {last}) could not be stored "
                    f"and are lost: {summary(error)}"
                )
                share.runs = [LineRun(writer.attempt, _SYSTEM, utcnow(), first, [note])]
                share.lines = 1
            share.values["lines_lost"] = writer.lines_lost
        elif reduction == 2:
            share.values = {k: v for k, v in share.values.items() if k in STATE_COLUMNS}
        else:
            share.runs.clear()
            share.lines = 0

    def _give_up(self, shares: list[Share], jobs: list[_Job], error: Exception) -> None:
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

    async def _transact(self, batch: WriteBatch, jobs: list[_Job]) -> Written:
        return await self.gateway.write_batch(batch, [job.run for job in jobs])

    def _fenced_out(self, refused: list[int], shares: list[Share]) -> None:
        """The shares the database refused for their fence token: nothing of them was
        written, nothing is published, and their writers are lost."""
        if not refused:
            return
        for share in shares:
            if share.writer.command_id in refused:
                share.runs.clear()
                share.events.clear()
                share.lines = 0
                self.lose(share.writer)

    def lose(self, writer: LogWriter) -> None:
        """The writer's attempt is lost (its fence was refused, by a flush or a lease
        renewal): what it still holds is dropped, it takes nothing more, and its `on_lost`
        is called (once)."""
        if writer.lost:
            return
        writer.lost = True
        chunks, writer.chunks = writer.chunks, []
        self._pending_lines -= sum(len(chunk.lines) for chunk in chunks)
        self._pending_chars -= sum(chunk.size for chunk in chunks)
        if self._dirty.get(writer.command_id) is writer:
            del self._dirty[writer.command_id]
        self._room.set()  # a pump of it may wait for room: it returns at once now
        if writer.on_lost is not None:
            writer.on_lost()


@dataclass
class _Flush:
    shares: list[Share] = field(default_factory=list)
    jobs: list[_Job] = field(default_factory=list)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    payload: WriteBatch | None = field(default_factory=lambda: WriteBatch())


def _usage_services(shares: list[Share]) -> set[int]:
    """The services whose budgets the flush's usage events spoke of."""
    return {
        stored.event.usage.service_id
        for share in shares
        for stored in share.events
        if stored.event.usage is not None
    }


def _describe(shares: list[Share]) -> str:
    lines = sum(share.lines for share in shares)
    commands = ", ".join(str(share.writer.command_id) for share in shares)
    return f"{lines} log lines of command(s) {commands or '-'}"
