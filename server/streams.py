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
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import TypeVar

from runner.store_errors import database_unreachable
from server import stream_pages
from server.broker import (
    Broker,
    LinesStored,
    StatusChange,
    Subscription,
    command_topic,
)
from server.db import SessionFactory
from server.messages import StoredBatch
from server.metrics import Metrics
from server.models import CommandStatus
from server.stream_batches import parts_of, sliced, with_queued
from server.stream_pages import REPLAY_FIRST_LINES, REPLAY_LINES, SharedPages, read_command_status

TICK_SECONDS = 0.02  # followers that keep up send on this common clock (see follow_command)
# A follower waits this long for a database that went away (a restart, a failover, a cut
# network) before its stream ends with StreamUnavailable; it tries again in the meantime.
OUTAGE_SECONDS = 30.0
OUTAGE_RETRY_SECONDS = (0.25, 2.0)  # the first wait between two tries, and the longest

T = TypeVar("T")


class StreamUnavailable(Exception):
    """The database stayed unreachable for OUTAGE_SECONDS: the stream ends, resumable
    after `last_seq` (afterSeq, Last-Event-ID) once the database is back."""

    def __init__(self, last_seq: int) -> None:
        super().__init__(
            "the database is unreachable: this log stream ends; subscribe again after "
            f"seq {last_seq} (afterSeq, Last-Event-ID) to resume"
        )
        self.last_seq = last_seq


async def patiently(read: Callable[[], Awaitable[T]], last_seq: int = 0) -> T:
    """What `read` returns, tried again while the database is away (for OUTAGE_SECONDS,
    then StreamUnavailable). Without it, a cut of a few seconds ended every follower with
    an unexpected error each, logged with its traceback (54 followers: 54 ERRORs)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + OUTAGE_SECONDS
    wait, longest = OUTAGE_RETRY_SECONDS
    while True:
        try:
            return await read()
        except Exception as exc:
            if not database_unreachable(exc):
                raise
            if loop.time() + wait > deadline:
                raise StreamUnavailable(last_seq) from exc
        await asyncio.sleep(wait)
        wait = min(2 * wait, longest)


@dataclass(frozen=True)
class FinalStatus:
    """The command is final and every line has been delivered."""

    status: str


Item = StoredBatch | StatusChange | FinalStatus


async def _next_tick(period: float) -> None:
    """Sleep until the next multiple of `period` on the loop's clock (the same instant for
    every follower that waits for it: they wake in one pass of the loop)."""
    loop = asyncio.get_running_loop()
    woken = loop.create_future()
    # call_at, not sleep: sleep adds its delay to a later reading of the clock.
    timer = loop.call_at((loop.time() // period + 1) * period, _wake, woken)
    try:
        await woken
    finally:
        timer.cancel()


def _wake(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


class _Follower:
    """The state of one follower: the last seq delivered, what its status read heard."""

    def __init__(
        self,
        sessionmaker: SessionFactory,
        command_id: int,
        after_seq: int,
        page_bytes: int,
        pages: SharedPages | None = None,
    ) -> None:
        self.sessionmaker = sessionmaker
        self.pages = pages
        self.command_id = command_id
        self.last = after_seq
        self.page_bytes = page_bytes
        self.changes_read: int | None = None  # status changes heard when it was last read
        # Lines the next page asks for: twice what the last one held when its bytes ended
        # it (the database measures no more lines than that), else twice as many.
        self.page_lines = REPLAY_FIRST_LINES

    async def _next_page(self) -> StoredBatch:
        read = stream_pages.read_lines if self.pages is None else self.pages.read
        batch = await patiently(
            lambda: read(
                self.sessionmaker, self.command_id, self.last, self.page_lines, self.page_bytes
            ),
            self.last,
        )
        lines = sum(len(run.texts) for run in batch.runs)
        self.page_lines = max(
            16, min(REPLAY_LINES, 2 * lines if lines < self.page_lines else 2 * self.page_lines)
        )
        return batch

    async def read_status(self) -> str | None:
        """The command's status, read after this call (shared with the others asking)."""
        heard = self._heard()
        self.changes_read = None if heard is None else heard[1]
        pages = self.pages
        if pages is None:
            return await patiently(
                lambda: read_command_status(self.sessionmaker, self.command_id), self.last
            )
        return await patiently(lambda: pages.status(self.sessionmaker, self.command_id), self.last)

    def _heard(self) -> tuple[int, int] | None:
        return None if self.pages is None else self.pages.heard(self.sessionmaker, self.command_id)

    def delivered_newest_heard(self) -> bool:
        """Whether the newest seq heard published is delivered (False: nothing is heard)."""
        heard = self._heard()
        return heard is not None and heard[0] <= self.last

    def status_unchanged_since_read(self) -> bool:
        """Whether no status change was heard since the status was last read (False:
        nothing is heard)."""
        heard = self._heard()
        return heard is not None and heard[1] == self.changes_read

    async def catch_up(
        self, subscription: Subscription | None = None, heard: bool = False
    ) -> AsyncIterator[StoredBatch]:
        """Everything stored after the last delivered seq, from the database; stops early
        once `subscription` holds the next line already (live delivery takes over there,
        instead of chasing a busy writer through the database). `heard`: every line
        published before now was heard (SharedPages.heard), so it stops at the newest
        heard instead of reading an empty page to learn that nothing is newer."""
        while not (subscription is not None and self._queued_next(subscription)):
            if heard and self.delivered_newest_heard():
                return
            batch = await self._next_page()
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
        fresh = batch if batch.runs[0].first_seq > self.last else sliced(batch, self.last)
        if not fresh.runs:
            return
        if fresh.runs[0].first_seq != self.last + 1:
            async for lines in self.catch_up(subscription):
                yield lines
            return
        self.last = fresh.runs[-1].last_seq
        yield fresh


async def follow_command(
    sessionmaker: SessionFactory,
    broker: Broker,
    command_id: int,
    after_seq: int = 0,
    metrics: Metrics | None = None,
    poll_seconds: float | None = None,
    pages: SharedPages | None = None,
    tick_seconds: float = TICK_SECONDS,
) -> AsyncIterator[Item]:
    """Line batches after `after_seq` and status changes, ending with FinalStatus once drained
    (or StreamUnavailable when the database stays away: see `patiently`).

    `pages`: replay pages shared with the other followers (SharedPages), else read alone;
    the batches this follower gets live are remembered there for the others.

    `tick_seconds`: a follower that keeps up (nothing queued behind the batch it got) waits
    for the next multiple of it on the event loop's clock and takes what came meanwhile as
    one message. Every such follower of a command wakes at the same tick with the same
    batches, so they share one merge (with_queued) and its encoding; and a busy command costs
    a stream a send per tick, not one per stored batch (a send through the middleware and
    the socket cost more than the lines it carried, issue 16). 0: no waiting.

    `poll_seconds`: also re-read the database that often (PostgreSQL's safety net; lines that
    other processes store arrive as LinesStored nudges, read by seq).
    """
    if metrics is not None:
        metrics.subscribers.inc()
    try:
        async with contextlib.AsyncExitStack() as stack:
            if pages is not None:  # before the subscription: it remembers what it misses
                stack.enter_context(pages.following(broker, sessionmaker, command_id))
            subscription = await stack.enter_async_context(
                broker.subscribe(command_topic(command_id))
            )
            # A page is read while the queue may fill up: both together stay near the bound.
            follower = _Follower(
                sessionmaker, command_id, after_seq, subscription.max_bytes // 4, pages
            )
            async for lines in follower.catch_up(subscription):
                yield lines
            status = await follower.read_status()
            if status is None:
                return
            yield StatusChange(command_id, status)
            while not CommandStatus(status).is_final:
                try:
                    # Not wait_for: on 3.11 it makes a task of every get, one a message for
                    # every follower of a busy command (issue 16).
                    async with asyncio.timeout(poll_seconds):
                        message = await subscription.get()
                except TimeoutError:
                    message = None
                if isinstance(message, LinesStored):  # stored by another process: read them
                    if message.last_seq > follower.last:
                        async for lines in follower.catch_up(subscription):
                            yield lines
                    continue
                if message is None:  # lagged (or a poll): re-read what was missed
                    # A lag on a broker of one process lost nothing the tap did not hear
                    # (issue 16: SQLite followers that lagged read an empty page and the
                    # status after each lag, on threads that slowed the loop). A poll reads.
                    heard = broker.single_process and subscription.lagged
                    subscription.resync()
                    async for lines in follower.catch_up(subscription, heard):
                        yield lines
                    if heard and follower.status_unchanged_since_read():
                        continue
                    current = await follower.read_status() or status
                    if current == status:
                        continue
                    message = StatusChange(command_id, current)
                if isinstance(message, StoredBatch):
                    at_tick = bool(tick_seconds) and next(subscription.waiting(), None) is None
                    if at_tick:
                        await _next_tick(tick_seconds)  # keeping up: gather a tick's batches
                    message = with_queued(message, subscription, at_tick)
                    if pages is not None:
                        for part in parts_of(message):
                            pages.remember(sessionmaker, part)
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
