"""The shapes a stored batch takes on its way to followers: cut in pieces for sending,
merged with the batches queued behind it, sliced past a seq; each remembers what it was
made of, so that what was encoded for its parts is reused."""

from __future__ import annotations

import weakref
from collections.abc import Iterator
from itertools import islice

from server.broker import Subscription
from server.messages import LineRun, StoredBatch

SEND_CHUNK_BYTES = 64 * 1024  # a stream writes a batch in pieces of about this size
MERGE_LINES = 2_000  # most lines a follower that fell behind merges into one message


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
