"""Replay pages of a command's stored lines, read once for every follower that asks for
the same one and kept a while (`SharedPages`), and the reads behind them."""

from __future__ import annotations

import contextlib
from collections import OrderedDict, deque
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select, text

from server.broker import DEFAULT_MAX_BYTES, Broker, StatusChange, command_topic
from server.db import READ_ONLY, SessionFactory
from server.fresh_reads import FreshReads
from server.messages import LineRun, StoredBatch
from server.models import Command
from server.stream_batches import merged, sliced

REPLAY_LINES = 20_000  # most lines one replay page reads
REPLAY_FIRST_LINES = 1_000  # the first page's line limit; later ones adapt to the lines' size
REPLAY_LINE_COST = 200  # bytes a line costs on its way through a page, besides its text
SHARED_PAGES_BYTES = 8 * 1024 * 1024  # replay pages kept for followers that read them next
PAGE_GRID = 128  # shared pages end on a multiple of this seq (see SharedPages)
RECENT_BYTES = 8 * 1024 * 1024  # published batches kept for followers that lagged (SharedPages)


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


async def read_lines(
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
        """The page after `after_seq`, as `read_lines` reads it, shared. Not `limit` lines
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
            (sessionmaker, command_id), lambda: read_command_status(sessionmaker, command_id)
        )

    async def _read(self, key: tuple[SessionFactory, int, int, int, int]) -> StoredBatch:
        page = self._from_recent(key)  # ends where a published batch ends
        if page is None:
            self.reads += 1
            page = _to_grid(await read_lines(*key), key[2])
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


def _utc(value: datetime | str) -> datetime:
    """A timestamp as the driver returns it (SQLite: naive UTC text) -> aware UTC."""
    stamp = datetime.fromisoformat(value) if isinstance(value, str) else value
    return stamp.replace(tzinfo=UTC) if stamp.tzinfo is None else stamp.astimezone(UTC)


async def read_command_status(sessionmaker: SessionFactory, command_id: int) -> str | None:
    """The command's stored status (None: no such command), read on its own."""
    async with sessionmaker() as session:
        connection = await session.connection(execution_options=READ_ONLY)
        return await connection.scalar(select(Command.status).where(Command.id == command_id))
