"""Log lines as they travel from the runner to every subscriber: the messages the broker
carries for a command's log (`StoredBatch`, made of `LineRun`s), and what the streams, the
SSE route and GraphQL subscriptions read. At the bottom of the layers (they import nothing
of ours), so the runner that makes them and the handlers that send them both point down.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from datetime import datetime
from functools import cached_property
from typing import NamedTuple


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

    # Cached (a batch is never changed once made): a replay page, a merge and the broker
    # each ask, and summing a page's lines every time cost a lagged follower more than
    # the page itself (issue 16).
    @cached_property
    def weight(self) -> int:
        """What it costs a subscriber's bounded queue: its number of lines."""
        return sum(len(run.texts) for run in self.runs)

    @cached_property  # asked by the broker and by SharedPages: its runs never change
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
