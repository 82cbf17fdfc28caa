"""The event broker: one interface, two backends. This module is the in-process fan-out (one
process: SQLite, or PostgreSQL alone); `server.pgbroker` carries the same messages between
processes on one PostgreSQL with LISTEN/NOTIFY.

Each subscriber has its own queue, registered by a context manager and bounded in messages
and in bytes (what its messages hold in memory, the one being delivered included).
Publishing never waits: a subscriber whose queue is full is marked `lagged`, lets go of what
it held and gets no more messages until it re-reads what it missed from the database (log
lines and statuses are stored before they are published, so the database is always the
source of truth).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

DEFAULT_QUEUE_SIZE = 2048
DEFAULT_MAX_BYTES = 1024 * 1024  # CORRAL_SUBSCRIBER_BUFFER_BYTES
SMALL_MESSAGE_BYTES = 128  # a message that does not say its size (a status change, an id)


def message_bytes(message: Any) -> int:
    """Memory a message holds, as far as it says (a batch of log lines: its `nbytes`)."""
    return int(getattr(message, "nbytes", SMALL_MESSAGE_BYTES))


def command_topic(command_id: int) -> str:
    """Topic of one command: its stored log lines and its status changes, in order."""
    return f"command:{command_id}"


def status_topic(command_id: int) -> str:
    """Topic of one command's status changes only (no log lines to crowd them out)."""
    return f"status:{command_id}"


STATUS_TOPIC = "status"
CANCEL_TOPIC = "cancel"
QUEUE_TOPIC = "queue"
SECRETS_TOPIC = "secrets"  # a committed write changed a stored secret (message: None)
SCHEDULE_TOPIC = "schedule"  # a committed write made a scheduled check due (message: None)
USAGE_TOPIC = "usage"  # a committed write recorded what a service's token spent or has left
DRAIN_TOPIC = "drain"  # a committed write asked runners to drain: each reads its own row


@dataclass(frozen=True)
class UsageRecorded:
    """Something new is known of a service's token budgets: an observation (a probe, a run's
    usage event) or Corral's count (a run started with one of its tokens). Published after
    the commit; subscribers re-read the service's tokens."""

    service_id: int


@dataclass(frozen=True)
class StatusChange:
    """A command's status changed (published after the change is committed)."""

    command_id: int
    status: str


@dataclass(frozen=True)
class LinesStored:
    """Lines of a command up to `last_seq` are stored (by another process): a nudge to read
    them from the database by seq, as a lagged subscriber does. Never the lines themselves."""

    command_id: int
    last_seq: int


@dataclass(eq=False)
class Subscription:
    """One subscriber's view of a topic."""

    topic: str
    queue: deque[tuple[Any, int]] = field(default_factory=deque)
    max_size: int = DEFAULT_QUEUE_SIZE
    lagged: bool = False
    # Bounded in bytes too: what the queued messages and the one being delivered hold.
    max_bytes: int = DEFAULT_MAX_BYTES
    held_bytes: int = 0
    _delivering: int = 0  # bytes of the message `get` returned last (released by the next)
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    def offer(self, message: Any, size: int | None = None) -> None:
        if self.lagged:
            return
        size = message_bytes(message) if size is None else size
        if len(self.queue) >= self.max_size or self.held_bytes + size > self.max_bytes:
            self.lag()
            return
        self.queue.append((message, size))
        self.held_bytes += size
        self._wake.set()

    def lag(self) -> None:
        """Drop what is queued and deliver no more until `resync`: the subscriber re-reads
        the database (its queue overflowed, or messages from other processes may be lost)."""
        self.lagged = True
        self.queue = deque()
        self.held_bytes = self._delivering
        self._wake.set()

    async def get(self) -> Any | None:
        """The next message; None when the subscriber has lagged (re-read, then `resync`).

        The message returned counts against the bound until the next call: a subscriber
        busy sending it to a slow client holds it meanwhile."""
        self.held_bytes -= self._delivering
        self._delivering = 0
        while not self.queue and not self.lagged:
            self._wake.clear()
            await self._wake.wait()
        if not self.queue:
            return None
        message, self._delivering = self.queue.popleft()
        return message

    def take_queued(self) -> Any | None:
        """The next queued message without waiting (None when none is); it counts against
        the bound with the one `get` returned, until the next `get`."""
        if not self.queue:
            return None
        message, size = self.queue.popleft()
        self._delivering += size
        return message

    def waiting(self) -> Iterator[Any]:
        """The messages queued now, oldest first (still queued)."""
        return (message for message, _size in self.queue)

    def resync(self) -> None:
        """Deliver again after a lag. Call it *before* re-reading the database, so that
        nothing published during the re-read is lost (duplicates are dropped by seq)."""
        self.lagged = False


class Broker:
    """In-process publish/subscribe by topic name."""

    # Every message of its topics is published in this process, so a tap hears them all
    # (server.streams answers "nothing newer" after a lag from what its tap heard).
    single_process = True

    def __init__(self, subscriber_max_bytes: int = DEFAULT_MAX_BYTES) -> None:
        self._subscribers: dict[str, set[Subscription]] = defaultdict(set)
        self._taps: dict[str, list[Callable[[Any], None]]] = defaultdict(list)
        self.subscriber_max_bytes = subscriber_max_bytes

    def publish(self, topic: str, message: Any) -> None:
        """Hand `message` to every subscriber of `topic`; never blocks."""
        self.deliver(topic, message)

    def deliver(self, topic: str, message: Any) -> None:
        """Hand `message` to this process's subscribers of `topic` only; never blocks."""
        listeners = self._taps.get(topic)
        if listeners:
            for listener in tuple(listeners):
                listener(message)
        subscribers = self._subscribers.get(topic)
        if not subscribers:
            return
        size = message_bytes(message)  # once, not once per subscriber
        for subscription in tuple(subscribers):
            subscription.offer(message, size)

    @asynccontextmanager
    async def subscribe(self, topic: str) -> AsyncIterator[Subscription]:
        subscription = Subscription(topic, max_bytes=self.subscriber_max_bytes)
        self._subscribers[topic].add(subscription)
        try:
            yield subscription
        finally:
            subscribers = self._subscribers.get(topic)
            if subscribers is not None:
                subscribers.discard(subscription)
                if not subscribers:
                    del self._subscribers[topic]

    @contextmanager
    def tap(self, topic: str, listener: Callable[[Any], None]) -> Iterator[None]:
        """Call `listener` with every message delivered on `topic` in this process while
        the block runs, as it is delivered. Not a subscriber: it has no queue and never
        lags; it must not block, and it bounds what it keeps itself."""
        listeners = self._taps[topic]
        listeners.append(listener)
        try:
            yield
        finally:
            listeners.remove(listener)
            if not listeners and self._taps.get(topic) is listeners:
                del self._taps[topic]

    def publish_status(self, command_id: int, status: str) -> None:
        """Announce a committed status change to the command's and the global topic."""
        self.deliver_status(StatusChange(command_id, status))

    def deliver_status(self, change: StatusChange) -> None:
        """Hand a status change to this process's subscribers of its three topics."""
        self.deliver(command_topic(change.command_id), change)
        self.deliver(status_topic(change.command_id), change)
        self.deliver(STATUS_TOPIC, change)

    def lag_all(self) -> None:
        """Make every subscriber re-read the database (see `Subscription.lag`)."""
        for subscribers in self._subscribers.values():
            for subscription in subscribers:
                subscription.lag()

    async def close(self) -> None:
        """Let go of what the broker holds (the in-process one holds nothing)."""

    @property
    def listening(self) -> bool:
        """Whether other processes' messages are heard now (never: this broker is one
        process's; server.pgbroker's is while its LISTEN connection is up)."""
        return False

    @property
    def subscriber_count(self) -> int:
        """Subscribers connected now, over all topics."""
        return sum(len(subs) for subs in self._subscribers.values())
