"""Committing one flush of the log store: its writes and jobs in one transaction of the
store gateway, tried again while the database is away (nothing is dropped while the runner
lives), a flush the database refuses split per command (a bad share costs only its own
command), and given up only when the runner stops and the database stays away.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from runner.logwriter import LogWriter, Share
from runner.store import RunnerStore, StoreJob, WriteBatch, Written
from runner.store_errors import (
    JobFailed,
    duplicate_key,
    retryable_database_error,
    summary,
)
from server.messages import LineRun
from server.models import LogStream, utcnow

log = logging.getLogger("corral.runner")

_SYSTEM = LogStream.SYSTEM.value
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
class Job:
    """A job riding in a flush (runner/store.py StoreJob), and where its result goes."""

    run: StoreJob
    future: asyncio.Future[Any]


@dataclass
class Flush:
    """What one flush takes: each command's share, the jobs, the writers waiting for it,
    and its writes as the database takes them (None: building them failed)."""

    shares: list[Share] = field(default_factory=list)
    jobs: list[Job] = field(default_factory=list)
    waiters: list[asyncio.Future[None]] = field(default_factory=list)
    payload: WriteBatch | None = field(default_factory=lambda: WriteBatch())


class _Unstorable(Exception):
    """The database refused what a flush (or a share of it) holds: trying it again as it is
    would never end."""

    def __init__(self, error: Exception) -> None:
        super().__init__(repr(error))
        self.error = error


class _GaveUp(Exception):
    """The runner is stopping and the database stayed unreachable."""


class FlushCommitter:
    """Commits the log store's flushes through the gateway, through outages and refusals."""

    def __init__(self, gateway: RunnerStore, lose: Callable[[LogWriter], None]) -> None:
        self.gateway = gateway
        self.lose = lose  # a writer whose share was refused for its fence token
        self._give_up_at: float | None = None  # set as the runner stops
        self._outage_since: float | None = None  # the database has refused to take writes

    def shutting_down(self) -> None:
        """The runner is stopping: a database still unreachable SHUTDOWN_RETRY_SECONDS from
        now is given up on (what is held then is logged as lost), so that stopping ends."""
        if self._give_up_at is None:
            self._give_up_at = time.monotonic() + SHUTDOWN_RETRY_SECONDS

    def started(self) -> None:
        """The runner (re)starts: nothing is given up on."""
        self._give_up_at = None

    async def commit(self, flush: Flush) -> list[tuple[Job, Any]]:
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
                        describe(shares),
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
        self, payload: WriteBatch, jobs: list[Job], shares: list[Share]
    ) -> list[tuple[Job, Any]]:
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
            describe(shares),
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

    def _give_up(self, shares: list[Share], jobs: list[Job], error: Exception) -> None:
        """The runner stops and the database stayed unreachable: what is held is lost."""
        if shares:
            log.error(
                "the database stayed unreachable as the runner stopped: gave up %s (%s)",
                describe(shares),
                error,
            )
        for share in shares:
            share.writer.lines_lost += share.lines
            share.runs.clear()
        failure = RuntimeError(f"the log store could not run it: {error}")
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(failure)

    async def _transact(self, batch: WriteBatch, jobs: list[Job]) -> Written:
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


def describe(shares: list[Share]) -> str:
    lines = sum(share.lines for share in shares)
    commands = ", ".join(str(share.writer.command_id) for share in shares)
    return f"{lines} log lines of command(s) {commands or '-'}"
