"""The event broker: one interface, in-process fan-out now (PostgreSQL LISTEN/NOTIFY later).

Each subscriber has its own bounded queue, registered by a context manager. Publishing
never waits: a subscriber whose queue is full is marked `lagged` and gets no more
messages until it re-reads what it missed from the database (log lines and statuses are
stored before they are published, so the database is always the source of truth).
"""

from __future__ import annotations

import asyncio
from collections import defaultdict, deque
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

DEFAULT_QUEUE_SIZE = 2048
DEFAULT_MAX_WEIGHT = 100_000  # log lines a subscriber may hold before it counts as lagged


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


@dataclass(frozen=True)
class StatusChange:
    """A command's status changed (published after the change is committed)."""

    command_id: int
    status: str


@dataclass(eq=False)
class Subscription:
    """One subscriber's view of a topic."""

    topic: str
    queue: deque[Any] = field(default_factory=deque)
    max_size: int = DEFAULT_QUEUE_SIZE
    lagged: bool = False
    # Bounded by weight too: a batch of log lines weighs its number of lines.
    max_weight: int = DEFAULT_MAX_WEIGHT
    weight: int = 0
    _wake: asyncio.Event = field(default_factory=asyncio.Event)

    def offer(self, message: Any) -> None:
        if self.lagged:
            return
        weight = int(getattr(message, "weight", 1))
        if len(self.queue) >= self.max_size or self.weight + weight > self.max_weight:
            self.lagged = True
            self.queue = deque()
            self.weight = 0
        else:
            self.queue.append(message)
            self.weight += weight
        self._wake.set()

    async def get(self) -> Any | None:
        """The next message; None when the subscriber has lagged (re-read, then `resync`)."""
        while not self.queue and not self.lagged:
            self._wake.clear()
            await self._wake.wait()
        if not self.queue:
            return None
        message = self.queue.popleft()
        self.weight -= int(getattr(message, "weight", 1))
        return message

    def waiting(self) -> Iterator[Any]:
        """The messages queued now, oldest first (still queued)."""
        return iter(self.queue)

    def resync(self) -> None:
        """Deliver again after a lag. Call it *before* re-reading the database, so that
        nothing published during the re-read is lost (duplicates are dropped by seq)."""
        self.lagged = False


class Broker:
    """In-process publish/subscribe by topic name."""

    def __init__(self) -> None:
        self._subscribers: dict[str, set[Subscription]] = defaultdict(set)

    def publish(self, topic: str, message: Any) -> None:
        """Hand `message` to every subscriber of `topic`; never blocks."""
        for subscription in tuple(self._subscribers.get(topic, ())):
            subscription.offer(message)

    @asynccontextmanager
    async def subscribe(self, topic: str) -> AsyncIterator[Subscription]:
        subscription = Subscription(topic)
        self._subscribers[topic].add(subscription)
        try:
            yield subscription
        finally:
            subscribers = self._subscribers.get(topic)
            if subscribers is not None:
                subscribers.discard(subscription)
                if not subscribers:
                    del self._subscribers[topic]

    def publish_status(self, command_id: int, status: str) -> None:
        """Announce a committed status change to the command's and the global topic."""
        change = StatusChange(command_id, status)
        self.publish(command_topic(command_id), change)
        self.publish(status_topic(command_id), change)
        self.publish(STATUS_TOPIC, change)

    @property
    def subscriber_count(self) -> int:
        """Subscribers connected now, over all topics."""
        return sum(len(subs) for subs in self._subscribers.values())
