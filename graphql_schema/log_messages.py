"""The lines of a command's log as GraphQL shows them: `LogLine`, and the `LogBatch`
messages of commandLogBatches, made of stored batches once for all their followers
(issue 16)."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from datetime import datetime
from typing import cast

import strawberry

from graphql_schema.enums import LogStream
from graphql_schema.shared_events import SharedResults
from server import models
from server.messages import StoredBatch
from server.stream_batches import made_at_tick, parts_of, pieces, slice_of


@strawberry.type(description="One stored line of a command's output (secrets already masked).")
class LogLine:
    seq: int = strawberry.field(description="Position in the command's log: 1, 2, ... with no gap.")
    attempt: int = strawberry.field(description="The attempt that wrote it (1 for the first).")
    stream: LogStream = strawberry.field(
        description="Which pipe it came from (SYSTEM: Corral's own line)."
    )
    ts: datetime = strawberry.field(description="When the runner read it.")
    text: str = strawberry.field(description="The line, without its newline; secrets masked.")

    @classmethod
    def from_row(cls, row: models.LogLine) -> LogLine:
        return cls(
            seq=row.seq,
            attempt=row.attempt,
            stream=LogStream(row.stream),
            ts=row.ts,
            text=row.text,
        )


@strawberry.type(
    description="The lines of one stored batch of a command's log (a message of "
    "commandLogBatches); `final` is true on the last message, sent once the command is "
    "final and every line was sent (its `lines` are empty)."
)
class LogBatch:
    lines: list[LogLine] = strawberry.field(description="The batch's lines, in seq order.")
    final: bool = strawberry.field(
        description="The last message: the command is final and every line was sent."
    )
    # Published batches are shown to every subscriber of the command: their result for one
    # selection is computed and encoded once (graphql_schema.shared_events).
    shared_results: strawberry.Private[SharedResults | None] = None
    # Made of other messages' lines (a merge of published batches, a follower's slice of
    # one): those messages, each with the lines it skips, whose results its result joins
    # (CorralExecutionContext), so that a line is executed once whatever message it is in.
    parts: strawberry.Private[tuple[tuple[LogBatch, int], ...]] = ()


class _Lines:
    """The lines of a published message, made as they are read: by the one execution of the
    message per selection (graphql_schema.shared_events), then let go. A message lives as
    long as its batch is remembered for followers that fall behind
    (server.stream_pages.SharedPages): kept with it, a LogLine object per line was a quarter
    of the objects the garbage collector tracked in a 200-follower fan-out (24k of 106k),
    walked by every full collection (30-70 ms with the event loop stopped), and ~8 MB of
    the server's memory there (issue 16). The texts are the batch's own (no copy)."""

    __slots__ = ("batch",)

    def __init__(self, batch: StoredBatch) -> None:
        self.batch = batch

    def __len__(self) -> int:
        return self.batch.weight

    def __iter__(self) -> Iterator[LogLine]:
        return each_log_line(self.batch)

    def after(self, skipped: int) -> _Lines:
        """The lines after the first `skipped` (a message's seqs follow one another)."""
        runs = self.batch.runs
        if not skipped or not runs:
            return self
        return _Lines(self.batch.after(runs[0].first_seq + skipped - 1))


def _message(lines: _Lines, parts: tuple[tuple[LogBatch, int], ...] = ()) -> LogBatch:
    """A published message of `lines` (shown as the list the schema says it is)."""
    shown = cast("list[LogLine]", lines)
    return LogBatch(lines=shown, final=False, shared_results=SharedResults(), parts=parts)


def _published_lines(message: LogBatch) -> _Lines:
    lines: object = message.lines
    if not isinstance(lines, _Lines):  # only published messages are cut or joined
        raise TypeError("not a published message")
    return lines


def each_log_line(batch: StoredBatch) -> Iterator[LogLine]:
    for run in batch.runs:
        stream = LogStream(run.stream)
        for seq, text in enumerate(run.texts, run.first_seq):
            yield LogLine(seq=seq, attempt=run.attempt, stream=stream, ts=run.ts, text=text)


# id(StoredBatch) -> its messages, while the batch lives (weakref.finalize drops the
# entry): every subscriber that gets a batch from the broker gets the same messages.
_published: dict[int, list[LogBatch]] = {}


def log_batches(batch: StoredBatch) -> list[LogBatch]:
    """The messages of a batch, in pieces of bounded size (server.stream_batches.pieces), built
    once for all the subscribers it is published to."""
    messages = _published.get(id(batch))
    if messages is None:
        cut = slice_of(batch)
        messages = _published[id(batch)] = (
            [_message(_Lines(piece)) for piece in pieces(batch)]
            if cut is None
            else _cut(log_batches(cut[0]), cut[1])
        )
        weakref.finalize(batch, _published.pop, id(batch), None)
    return messages


def _cut(messages: list[LogBatch], skipped: int) -> list[LogBatch]:
    """The messages of a batch's lines after its first `skipped`, made of its `messages`."""
    cut: list[LogBatch] = []
    for message in messages:
        if skipped >= len(message.lines):
            skipped -= len(message.lines)
        elif skipped:
            cut.append(_made_of([(message, skipped)]))
            skipped = 0
        else:
            cut.append(message)
    return cut


def _made_of(parts: list[tuple[LogBatch, int]]) -> LogBatch:
    """A message of the lines of `parts` (each message past the lines it skips), in order."""
    cut = [_published_lines(message).after(skipped).batch for message, skipped in parts]
    joined = StoredBatch(cut[0].command_id, [run for batch in cut for run in batch.runs])
    return _message(_Lines(joined), tuple(parts))


# A merge of published batches up to this many lines is sent as one message; a larger one
# as its batches' messages (see log_batches_of).
OWN_MERGE_LINES = 256


def log_batches_of(batch: StoredBatch) -> list[LogBatch]:
    """The messages a follower sends for `batch`. A small merge made at the tick (followers
    that keep up share it: server.streams.follow_command) is one message; any other (a
    follower that fell behind merged its queue, a replay page made of remembered batches:
    mostly its own) is sent as the messages of the batches it was made of, executed and
    encoded once for every follower (issue 16): executing a merge for one follower cost
    more than the messages it saved, from a hundred lines up."""
    parts = parts_of(batch)
    if len(parts) == 1:
        return log_batches(batch)
    messages = [message for part in parts for message in log_batches(part)]
    if batch.weight <= OWN_MERGE_LINES and made_at_tick(batch):
        return _joined_message(batch, messages)
    return messages


def _joined_message(batch: StoredBatch, messages: list[LogBatch]) -> list[LogBatch]:
    """A merge's one message, made of its batches' `messages` (whose results it joins), once
    for all the followers that take the merge."""
    joined = _published.get(id(batch))
    if joined is None:
        joined = _published[id(batch)] = [_made_of([(message, 0) for message in messages])]
        weakref.finalize(batch, _published.pop, id(batch), None)
    return joined
