"""The runner's one writer: every attempt's log lines, events and command updates, and the
runner's claims, stored together in one transaction per flush, then published.

Per command, a `LogWriter` (runner/logwriter.py) numbers lines gaplessly and redacts them;
the `LogStore` behind all of them flushes whatever is pending (of every command) in one
transaction of the store gateway (`RunnerStore.write_batch`, runner/store.py), the runner's
claim (`ClaimRequest`) included, so a busy runner costs one transaction per flush and not
one per line, per command or per state change. A flush starts as soon as the previous one
ends: lines that arrive meanwhile ride along with the next one. Committing a flush (retries,
outages, refused shares) is runner/commit.py's.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Iterator
from typing import Any, TypeVar, overload

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from runner.claims import ClaimRequest, ClaimResult
from runner.commit import Flush, FlushCommitter, Job, describe
from runner.lines import Redactor
from runner.logwriter import FLUSH_LINES, LogWriter, Share, _Chunk
from runner.store import FunctionJob, RunnerStore, StoreJob, open_store
from runner.store_errors import summary
from server.broker import USAGE_TOPIC, Broker, UsageRecorded, command_topic
from server.messages import LineRun, StoredBatch
from server.metrics import Metrics

log = logging.getLogger("corral.runner")

T = TypeVar("T")
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
        self.committer = FlushCommitter(self.gateway, self.lose)
        self._dirty: dict[int, LogWriter] = {}
        self._jobs: list[Job] = []
        self._waiters: list[tuple[LogWriter, asyncio.Future[None]]] = []
        self._pending_lines = 0
        self._pending_chars = 0
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
        self.committer.started()
        self._task = asyncio.create_task(self._run(), name="logstore")

    def shutting_down(self) -> None:
        """The runner is stopping: a database that stays unreachable is given up on after a
        while (runner/commit.py), so that stopping ends."""
        self.committer.shutting_down()

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

    async def stored(self, writer: LogWriter) -> None:
        """Return once everything `writer` queued so far is committed."""
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append((writer, future))
        self._wake.set()
        await future

    @overload
    def submit(self, job: ClaimRequest) -> asyncio.Future[ClaimResult]: ...
    @overload
    def submit(self, job: FunctionJob[T]) -> asyncio.Future[T]: ...
    def submit(self, job: StoreJob) -> asyncio.Future[Any]:
        """Run `job` in the next flush's transaction, after its writes: a `ClaimRequest`
        through the gateway's claim, a function of the SQLAlchemy connection as it is. Its
        result comes in the returned future. The job is queued before this returns: it goes
        with the writes queued so far (unless their flush is already being built) and those
        queued next."""
        future: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._jobs.append(Job(job, future))
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
        with contextlib.suppress(Exception):  # unreachable: the first flush retries, reports
            await self.gateway.connect()
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

    def _prepare(self) -> Flush:
        """Take what is pending: lines numbered and redacted, the rows to write, the jobs,
        and the writers waiting for everything they queued to be stored."""
        if self._linger is not None:
            self._linger.cancel()
            self._linger = None
        flush = Flush()
        dirty, self._dirty = self._dirty, {}
        for writer in dirty.values():
            chunks = writer.take(self.gateway.flush_lines)
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
            log.warning("building %s failed: %s", describe(flush.shares), summary(exc))
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

    async def _complete(self, flush: Flush) -> None:
        """Commit a flush, then publish its lines and tell its writers and jobs."""
        stored = True
        try:
            done = await self.committer.commit(flush) if flush.shares or flush.jobs else []
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
                topic = command_topic(share.writer.command_id)
                for batch in published_batches(share.writer.command_id, share.runs):
                    self._broker.publish(topic, batch)
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


def published_batches(command_id: int, runs: list[LineRun]) -> Iterator[StoredBatch]:
    """A share's lines as the batches they are published in: FLUSH_LINES lines at most
    each (a flush on PostgreSQL holds more), so that a subscriber's message stays small."""
    batch: list[LineRun] = []
    room = FLUSH_LINES
    for run in runs:
        start = 0
        while start < len(run.texts):
            if not room:
                yield StoredBatch(command_id, batch)
                batch, room = [], FLUSH_LINES
            take = min(room, len(run.texts) - start)
            if take == len(run.texts):
                batch.append(run)
            else:
                part = run.texts[start : start + take]
                batch.append(run._replace(first_seq=run.first_seq + start, texts=part))
            start += take
            room -= take
    if batch:
        yield StoredBatch(command_id, batch)


def _usage_services(shares: list[Share]) -> set[int]:
    """The services whose budgets the flush's usage events spoke of."""
    return {
        stored.event.usage.service_id
        for share in shares
        for stored in share.events
        if stored.event.usage is not None
    }
