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
import weakref
from collections import OrderedDict, deque
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from itertools import islice
from typing import Any, TypeVar

from sqlalchemy import select, text

from runner.store_errors import database_unreachable
from server.broker import (
    DEFAULT_MAX_BYTES,
    Broker,
    LinesStored,
    StatusChange,
    Subscription,
    command_topic,
)
from server.db import READ_ONLY, SessionFactory
from server.fresh_reads import FreshReads
from server.messages import LineRun, StoredBatch
from server.metrics import Metrics
from server.models import Command, CommandStatus

REPLAY_LINES = 20_000  # most lines one replay page reads
REPLAY_FIRST_LINES = 1_000  # the first page's line limit; later ones adapt to the lines' size
REPLAY_LINE_COST = 200  # bytes a line costs on its way through a page, besides its text
SEND_CHUNK_BYTES = 64 * 1024  # a stream writes a batch in pieces of about this size
MERGE_LINES = 2_000  # most lines a follower that fell behind merges into one message
SHARED_PAGES_BYTES = 8 * 1024 * 1024  # replay pages kept for followers that read them next
PAGE_GRID = 128  # shared pages end on a multiple of this seq (see SharedPages)
RECENT_BYTES = 8 * 1024 * 1024  # published batches kept for followers that lagged (SharedPages)
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


# The next lines after :after, as many as fit in :bytes (at least one), at most :limit. The
# budget is applied in the database over the lines' sizes (SIZE), so a page never brings
# more than its budget (and one line) into memory, however long the lines are.
_READ_LINES_TEMPLATE = (
    "SELECT seq, attempt, stream, ts, text FROM log_lines"
    " WHERE command_id = :command_id AND seq > :after AND seq <= ("
    "  SELECT COALESCE(MAX(seq), :after) FROM ("
    "   SELECT seq, SUM(SIZE + :line_cost) OVER (ORDER BY seq ROWS UNBOUNDED PRECEDING)"
    "    - (SIZE + :line_cost) AS before"
    "   FROM (SELECT seq, text FROM log_lines"
    "    WHERE command_id = :command_id AND seq > :after ORDER BY seq LIMIT :limit) AS upcoming"
    "  ) AS sized WHERE before < :bytes)"
    " ORDER BY seq"
)
_LINE_SIZE = {"postgresql": "octet_length(text)", "sqlite": "length(CAST(text AS BLOB))"}
_READ_LINES = {
    dialect: text(_READ_LINES_TEMPLATE.replace("SIZE", size))
    for dialect, size in _LINE_SIZE.items()
}


async def _read_lines(
    sessionmaker: SessionFactory,
    command_id: int,
    after_seq: int,
    limit: int = REPLAY_LINES,
    max_bytes: int = DEFAULT_MAX_BYTES // 4,
) -> StoredBatch:
    """Stored lines after `after_seq` (at most `limit`, about `max_bytes`), in runs as they
    were written. Read without the ORM's per-row type handling (a follower catching up
    reads many): the timestamps of a read share a few values."""
    async with sessionmaker() as session:
        connection = await session.connection(execution_options=READ_ONLY)
        statement = _READ_LINES.get(connection.dialect.name, _READ_LINES["sqlite"])
        parameters = {
            "command_id": command_id,
            "after": after_seq,
            "limit": limit,
            "bytes": max_bytes,
            "line_cost": REPLAY_LINE_COST,
        }
        rows = (await connection.execute(statement, parameters)).all()
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


class SharedPages:
    """Replay pages read once for every follower that asks for the same one (issue 16).

    Followers of a busy command replay the same stored lines: 200 clients that connect
    together ask for the same pages in the same order, and 200 reads of one page cost the
    database (and the event loop, row by row) 200 times what one does. A page is keyed by
    what decides its content (command, after seq, line limit, byte budget); a follower
    asking for a page being read waits for that read, and recently read pages are kept,
    up to `max_bytes` in all, so followers a little behind find them too. Every follower of
    a page gets the very same StoredBatch: its SSE text and its GraphQL result are then
    encoded once as well.

    Followers that lagged resume wherever their last message ended, each elsewhere: so that
    they meet on the same pages, a shared page ends on a multiple of PAGE_GRID when it spans
    one. From there on, followers read the same pages.

    Stored lines never change, so a page with lines is right whenever it was read: the
    follower goes on reading after its last line. A page with *no* line only says that
    nothing was stored after its seq when its read began: a follower that finds such a read
    under way when it asks takes part in the next one instead (the read began before it
    asked, and may have missed lines committed meanwhile; an empty page ends a replay), and
    such pages are never kept. The followers that join a command together share their
    empty first page and their status read that way (FreshReads).

    Followers that lagged mostly need lines published a moment ago: the batches that
    followers received live are remembered (`remember`, up to `recent_bytes` in all, oldest
    out first), and a page they hold from its first line on is made of them instead of read
    from the database (a read of a busy command's page cost more than everything else on a
    lagged follower's way, issue 16). Such a page is shared and kept as a read one is.
    """

    def __init__(
        self, max_bytes: int = SHARED_PAGES_BYTES, recent_bytes: int = RECENT_BYTES
    ) -> None:
        self.max_bytes = max_bytes
        self.recent_bytes = recent_bytes
        self._reading: FreshReads[StoredBatch] = FreshReads()
        self._status_reads: FreshReads[str | None] = FreshReads()
        self._kept: OrderedDict[tuple[Any, ...], tuple[StoredBatch, int]] = OrderedDict()
        self._kept_bytes = 0
        # (sessionmaker, command id) -> its remembered batches, consecutive seqs in order;
        # every remembered batch in the order it came (it leaves from there, oldest first).
        self._recent: dict[tuple[Any, int], deque[StoredBatch]] = {}
        self._recent_order: deque[tuple[tuple[Any, int], StoredBatch, int]] = deque()
        self._recent_held = 0
        self._taps: dict[tuple[Any, int], _Tap] = {}  # (sessionmaker, command id) -> its tap
        self.reads = 0  # reads of the database (what the sharing saves shows against asks)
        self.recent_pages = 0  # pages made of remembered batches instead

    @contextlib.contextmanager
    def following(
        self, broker: Broker, sessionmaker: SessionFactory, command_id: int
    ) -> Iterator[None]:
        """While a follower of the command is in the block, every batch of it published
        here is remembered as it is published, whether or not a follower's queue takes it:
        a follower that lagged (a busy command outruns its client) then catches up from
        memory rather than reading the lines back from the database (issue 15). One
        listener per command, however many follow it."""
        key = (sessionmaker, command_id)
        tap = self._taps.get(key)
        if tap is None:
            tap = self._taps[key] = self._tap(broker, sessionmaker, command_id)
        tap.followers += 1
        try:
            yield
        finally:
            tap.followers -= 1
            if tap.followers == 0 and self._taps.get(key) is tap:
                del self._taps[key]
                tap.stack.close()

    def _tap(self, broker: Broker, sessionmaker: SessionFactory, command_id: int) -> _Tap:
        tap = _Tap()

        def listen(message: Any) -> None:
            if isinstance(message, StoredBatch):
                self.remember(sessionmaker, message)
                if message.runs:
                    tap.newest = max(tap.newest, message.runs[-1].last_seq)
            elif isinstance(message, StatusChange):
                tap.status_changes += 1

        tap.stack.enter_context(broker.tap(command_topic(command_id), listen))
        return tap

    def heard(self, sessionmaker: SessionFactory, command_id: int) -> tuple[int, int] | None:
        """The newest seq of the command heard published and the status changes heard, while
        a follower of it is `following` (else None). On a broker of one process, where every
        message is published, a follower that has delivered that seq knows from memory that
        nothing newer was published before now: what is published from now on reaches its
        queue (see follow_command)."""
        tap = self._taps.get((sessionmaker, command_id))
        return None if tap is None else (tap.newest, tap.status_changes)

    def remember(self, sessionmaker: SessionFactory, batch: StoredBatch) -> None:
        """Keep a published batch (stored, so the database holds the same lines) for the
        followers that will ask for its lines; known or older ones are ignored."""
        if not batch.runs or self.recent_bytes <= 0:
            return
        key = (sessionmaker, batch.command_id)
        batches = self._recent.get(key)
        if batches is None:
            batches = self._recent[key] = deque()
        elif batches:
            last = batches[-1].runs[-1].last_seq
            if batch.runs[0].first_seq <= last:
                return
            if batch.runs[0].first_seq != last + 1:
                batches.clear()  # a page is made of consecutive batches only
        size = batch.nbytes
        batches.append(batch)
        self._recent_order.append((key, batch, size))
        self._recent_held += size
        while self._recent_held > self.recent_bytes and self._recent_order:
            old_key, oldest, old_size = self._recent_order.popleft()
            self._recent_held -= old_size
            kept = self._recent.get(old_key)
            if kept and kept[0] is oldest:
                kept.popleft()
            if kept is not None and not kept:
                del self._recent[old_key]

    def _from_recent(self, key: tuple[SessionFactory, int, int, int, int]) -> StoredBatch | None:
        """The page for `key` made of remembered batches, when they hold its first line. It
        is those very batches (the first one from the line after `after_seq` on), up to a
        batch's end: their SSE text and GraphQL messages, made once for the followers that
        got them live, are the page's too (parts_of). Making them again for every lagged
        follower's page cost more than all else on the way (issue 16)."""
        sessionmaker, command_id, after_seq, limit, max_bytes = key
        batches = self._recent.get((sessionmaker, command_id))
        if not batches or not (
            batches[0].runs[0].first_seq <= after_seq + 1 <= batches[-1].runs[-1].last_seq
        ):
            return None
        parts: list[StoredBatch] = []
        lines = size = 0
        for batch in batches:
            if batch.runs[-1].last_seq <= after_seq:
                continue
            part = batch if batch.runs[0].first_seq > after_seq else sliced(batch, after_seq)
            parts.append(part)
            lines += part.weight
            size += part.nbytes + REPLAY_LINE_COST * part.weight
            if lines >= limit or size >= max_bytes:
                break
        self.recent_pages += 1
        return merged(parts)

    async def read(
        self,
        sessionmaker: SessionFactory,
        command_id: int,
        after_seq: int,
        limit: int,
        max_bytes: int,
    ) -> StoredBatch:
        """The page after `after_seq`, as `_read_lines` reads it, shared. Not `limit` lines
        at most but as many as `max_bytes` can hold (each costs REPLAY_LINE_COST at least):
        the same for every follower, whatever its own last page held."""
        limit = max_bytes // REPLAY_LINE_COST + 1
        key = (sessionmaker, command_id, after_seq, limit, max_bytes)
        kept = self._kept.get(key)
        if kept is not None:
            self._kept.move_to_end(key)
            return kept[0]
        return await self._reading.read(key, lambda: self._read(key), _has_lines)

    async def status(self, sessionmaker: SessionFactory, command_id: int) -> str | None:
        """The command's status, read after this call began: the followers that join a
        command together share a read or two instead of one each (FreshReads)."""
        return await self._status_reads.read(
            (sessionmaker, command_id), lambda: _status(sessionmaker, command_id)
        )

    async def _read(self, key: tuple[SessionFactory, int, int, int, int]) -> StoredBatch:
        page = self._from_recent(key)  # ends where a published batch ends
        if page is None:
            self.reads += 1
            page = _to_grid(await _read_lines(*key), key[2])
        if page.runs:
            self._keep(key, page)
        return page

    def _keep(self, key: tuple[Any, ...], page: StoredBatch) -> None:
        size = page.nbytes
        self._kept[key] = (page, size)
        self._kept_bytes += size
        while self._kept_bytes > self.max_bytes and self._kept:
            _key, (_oldest, oldest_size) = self._kept.popitem(last=False)
            self._kept_bytes -= oldest_size


def _to_grid(page: StoredBatch, after_seq: int) -> StoredBatch:
    """`page` up to the last multiple of PAGE_GRID it holds past `after_seq` (if any)."""
    if not page.runs:
        return page
    end = page.runs[-1].last_seq
    end -= end % PAGE_GRID
    if end <= after_seq or end == page.runs[-1].last_seq:
        return page
    runs = []
    for run in page.runs:
        if run.first_seq > end:
            break
        runs.append(
            run if run.last_seq <= end else run._replace(texts=run.texts[: end - run.first_seq + 1])
        )
    return StoredBatch(page.command_id, runs)


@dataclass(eq=False)
class _Tap:
    """The listener of a command's messages for its followers (SharedPages.following)."""

    stack: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)
    followers: int = 0
    newest: int = 0  # the newest seq heard published
    status_changes: int = 0  # heard since the tap began


def _has_lines(page: StoredBatch) -> bool:
    """Whether a page is right whenever it was read (stored lines never change)."""
    return bool(page.runs)


def pieces(batch: StoredBatch, max_bytes: int = SEND_CHUNK_BYTES) -> Iterator[StoredBatch]:
    """The batch in pieces of about `max_bytes` of text (at least a line each), in order: a
    stream encodes and writes one piece at a time, so a slow client holds one piece, not a
    whole batch encoded."""
    runs: list[LineRun] = []
    size = 0
    for run in batch.runs:
        run_size = sum(map(len, run.texts))
        if size + run_size < max_bytes:  # the common case: the whole run fits
            runs.append(run)
            size += run_size
            continue
        start = 0
        for index, line in enumerate(run.texts):
            size += len(line)
            if size >= max_bytes:
                runs.append(
                    run._replace(
                        first_seq=run.first_seq + start, texts=run.texts[start : index + 1]
                    )
                )
                yield StoredBatch(batch.command_id, runs)
                runs, size, start = [], 0, index + 1
        if start == 0:
            runs.append(run)
        elif start < len(run.texts):
            runs.append(run._replace(first_seq=run.first_seq + start, texts=run.texts[start:]))
    if runs:
        yield StoredBatch(batch.command_id, runs)


def with_queued(
    batch: StoredBatch, subscription: Subscription, at_tick: bool = False
) -> StoredBatch:
    """`batch` and the batches queued behind it, as one (up to about MERGE_LINES lines): a
    subscriber that fell behind catches up in fewer, larger messages, and a message costs
    its subscriber far more than a line (issue 16). The first follower to merge from a
    batch decides the merge; the others that have the same batches queued take that very
    object (so its GraphQL result is shared, see graphql_schema.shared_events), and one
    with fewer queued gets `batch` alone, the object every subscriber gets.

    `at_tick`: the follower kept up and waited for the common tick (follow_command), so
    the followers that keep up will take this merge too (made_at_tick): shown to GraphQL
    as one message, executed once for all of them. A merge made by a follower behind is
    mostly its own: shown as its batches' messages, shared (log_batches_of)."""
    known = _merges.get(id(batch))
    shared = None if known is None else known[1]()
    if known is not None and shared is not None:
        rest = known[0][1:]
        ahead = tuple(islice(subscription.waiting(), len(rest)))
        if len(ahead) < len(rest) or any(a is not b for a, b in zip(ahead, rest, strict=True)):
            return batch
        for _ in rest:
            subscription.take_queued()
        return shared
    constituents = [batch]
    lines = batch.weight
    while lines < MERGE_LINES:
        queued = next(subscription.waiting(), None)
        if not isinstance(queued, StoredBatch):  # a status change keeps its place
            break
        subscription.take_queued()
        constituents.append(queued)
        lines += queued.weight
    if len(constituents) == 1:
        return batch
    joined = merged(constituents)
    # The entry holds its batches (their ids stay theirs) while the merged one lives.
    _merges[id(batch)] = (tuple(constituents), weakref.ref(joined))
    weakref.finalize(joined, _merges.pop, id(batch), None)
    if at_tick:
        _tick_merges.add(id(joined))
        weakref.finalize(joined, _tick_merges.discard, id(joined))
    return joined


def made_at_tick(batch: StoredBatch) -> bool:
    """Whether `batch` is a merge made at the common tick by a follower that kept up (the
    others that keep up take the same object, see with_queued)."""
    return id(batch) in _tick_merges


def merged(parts: list[StoredBatch]) -> StoredBatch:
    """One batch of the lines of `parts` (consecutive, in order), which parts_of tells
    apart again while it lives; a single part is itself."""
    if len(parts) == 1:
        return parts[0]
    joined = StoredBatch(parts[0].command_id, [run for part in parts for run in part.runs])
    _parts[id(joined)] = tuple(parts)  # held (their ids stay theirs) while `joined` lives
    weakref.finalize(joined, _parts.pop, id(joined), None)
    return joined


def parts_of(batch: StoredBatch) -> tuple[StoredBatch, ...]:
    """The batches `batch` was merged from (`with_queued`, a replay page made of remembered
    batches), else `batch` alone: what is encoded once per published batch is then shared
    by merges and such pages too."""
    return _parts.get(id(batch), (batch,))


def sliced(batch: StoredBatch, seq: int) -> StoredBatch:
    """The lines of `batch` past `seq`, which slice_of tells apart again while they live: a
    follower resuming inside a published batch (a lagged one, each at its own seq) gets its
    messages cut from the batch's own, not made again for it alone (issue 16)."""
    part = batch.after(seq)
    skipped = batch.weight - part.weight
    if skipped and part.runs:
        _slices[id(part)] = (batch, skipped)  # held (its id stays its own) while `part` lives
        weakref.finalize(part, _slices.pop, id(part), None)
    return part


def slice_of(batch: StoredBatch) -> tuple[StoredBatch, int] | None:
    """The batch `batch` was cut from (sliced) and the lines it skipped, if it was."""
    return _slices.get(id(batch))


_merges: dict[int, tuple[tuple[StoredBatch, ...], weakref.ref[StoredBatch]]] = {}
_parts: dict[int, tuple[StoredBatch, ...]] = {}
_slices: dict[int, tuple[StoredBatch, int]] = {}
_tick_merges: set[int] = set()


def _utc(value: datetime | str) -> datetime:
    """A timestamp as the driver returns it (SQLite: naive UTC text) -> aware UTC."""
    stamp = datetime.fromisoformat(value) if isinstance(value, str) else value
    return stamp.replace(tzinfo=UTC) if stamp.tzinfo is None else stamp.astimezone(UTC)


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


async def _status(sessionmaker: SessionFactory, command_id: int) -> str | None:
    async with sessionmaker() as session:
        connection = await session.connection(execution_options=READ_ONLY)
        return await connection.scalar(select(Command.status).where(Command.id == command_id))


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
        read = _read_lines if self.pages is None else self.pages.read
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
            return await patiently(lambda: _status(self.sessionmaker, self.command_id), self.last)
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
