"""Reads shared by the followers that ask for the same thing at once (issue 16).

200 followers that join a command together each asked the database, as they joined, for
the same (empty) replay page and the same status: 400 reads where a few would do, run on
SQLite's threads that compete with the event loop. Sharing them is only right for a read
that began *after* a follower asked: one under way may have missed what was committed
just before the follower subscribed (or resynced), which its queue never gets either. A
follower that finds a read under way waits for it, takes its result when that result is
right whenever it was read (`usable`: a replay page with lines), and otherwise takes part
in the next read, which every follower that asked meanwhile shares: it begins once they
are all in (a pass of the event loop), so a burst of followers costs two reads, not one
each.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from dataclasses import dataclass
from typing import Generic, TypeVar

T = TypeVar("T")


@dataclass(eq=False)
class _Read(Generic[T]):
    future: asyncio.Future[T]
    began: bool = False  # its query may have been sent: too early for those who ask now


class FreshReads(Generic[T]):
    """One read at a time per key, shared by the followers that may take its result."""

    def __init__(self) -> None:
        self._reads: dict[Hashable, _Read[T]] = {}

    def __len__(self) -> int:
        """Reads under way (or about to begin)."""
        return len(self._reads)

    async def read(
        self,
        key: Hashable,
        reader: Callable[[], Awaitable[T]],
        usable: Callable[[T], bool] = lambda _result: False,
    ) -> T:
        """What `reader` returns, read after this call began, or by a read under way then
        whose result is `usable` anyway."""
        while True:
            current = self._reads.get(key)
            if current is None:
                return await self._read(key, reader)
            fresh = not current.began
            try:
                result = await asyncio.shield(current.future)
            except _ReadFailed:  # its reader went away or met an error: read again
                continue
            if fresh or usable(result):
                return result
            # It began before this call: the next one (shared with the others) is right.

    async def _read(self, key: Hashable, reader: Callable[[], Awaitable[T]]) -> T:
        read: _Read[T] = _Read(asyncio.get_running_loop().create_future())
        self._reads[key] = read
        try:
            await asyncio.sleep(0)  # those who ask in this pass of the loop join it
            read.began = True
            result = await reader()
        except BaseException:
            # Those waiting read again (an error is theirs to meet, or not).
            read.future.set_exception(_ReadFailed())
            read.future.exception()  # retrieved, whether anybody waits or not
            raise
        finally:
            if self._reads.get(key) is read:
                del self._reads[key]
        read.future.set_result(result)
        return result


class _ReadFailed(Exception):
    """A shared read did not finish (its reader was cancelled or met an error)."""
