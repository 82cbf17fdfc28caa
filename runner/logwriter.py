"""One attempt's log, as the runner's writers see it: lines redacted and numbered here
(gaplessly per command; `::corral::` lines on stdout become events), then handed to the
runner's one LogStore (runner/logstore.py), which stores every command's lines together in
one transaction per flush and then publishes them (`StoredBatch`).
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, NamedTuple

from runner.events import (
    EVENT_PREFIX,
    MAX_EVENTS_PER_ATTEMPT,
    ChildEvent,
    EventRejected,
    parse_event,
)
from runner.lines import Redactor
from runner.store_errors import summary
from server.messages import LineRun
from server.models import LogStream, utcnow

if TYPE_CHECKING:
    from runner.logstore import LogStore

_EVENT_PREFIXES = itertools.repeat(EVENT_PREFIX)
_STDOUT, _SYSTEM = LogStream.STDOUT.value, LogStream.SYSTEM.value
# Lines of one command per published batch (it stays small), and per flush unless the
# store takes more at once (RunnerStore.flush_lines).
FLUSH_LINES = 10_000


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
class Share:
    """One command's share of a flush, numbered and redacted."""

    writer: LogWriter
    runs: list[LineRun] = field(default_factory=list)
    lines: int = 0
    events: list[_Event] = field(default_factory=list)
    values: dict[str, Any] = field(default_factory=dict)


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
        fence: int | None = None,
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
        # The attempt's fence token (from its claim): every flush of its share carries it.
        # Once the database refuses it, the attempt is lost: nothing more of it is queued
        # or written, and `on_lost` is called (once).
        self.fence = fence
        self.lost = False
        self.on_lost: Callable[[], None] | None = None

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

    def take(self, limit: int = FLUSH_LINES) -> list[_Chunk]:
        """The chunks of the next flush: all of them, or the first `limit` lines' worth."""
        taken = 0
        for index, chunk in enumerate(self.chunks):
            taken += len(chunk.lines)
            if taken >= limit:
                batch, self.chunks = self.chunks[: index + 1], self.chunks[index + 1 :]
                return batch
        batch, self.chunks = self.chunks, []
        return batch

    def number(self, chunks: list[_Chunk]) -> Share:
        """Redact and number; `::corral::` lines on stdout become events."""
        rows = Share(self)
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

    def unreadable(self, chunks: list[_Chunk], error: Exception) -> Share:
        """The share of chunks that could not be numbered: their command values, and one
        system line in place of their lines, which are lost."""
        rows = Share(self)
        for chunk in chunks:
            if chunk.command_values:
                rows.values.update(chunk.command_values)
        count = sum(len(chunk.lines) for chunk in chunks)
        self.lines_lost += count
        note = f"{count} log line(s) could not be read and are lost: {summary(error)}"
        self._append(rows, _SYSTEM, utcnow(), [note])
        rows.values |= {"last_seq": self.seq, "lines_lost": self.lines_lost}
        return rows

    def _append(self, rows: Share, stream: str, ts: datetime, texts: list[str]) -> None:
        rows.runs.append(LineRun(self.attempt, stream, ts, self.seq + 1, texts))
        self.seq += len(texts)
        rows.lines += len(texts)

    def _number_with_events(self, texts: list[str], ts: datetime, rows: Share) -> None:
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
