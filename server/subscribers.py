"""How many live subscribers (SSE log streams, GraphQL subscriptions) may be open at once.

Each one holds a database replay, a bounded queue and a socket, so their number is capped
in total and per client. A client is named by a key chosen by the handler: its address for
now; with API tokens, the token's id (one key per credential, whatever address it uses).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager


class TooManySubscribers(Exception):
    """A new subscriber would pass a limit; the message says which (shown to the client)."""


class SubscriberLimits:
    """Counts live subscribers per client key and in total; refuses one past a limit."""

    def __init__(self, total: int, per_client: int) -> None:
        self.total = total
        self.per_client = per_client
        self._by_client: Counter[str] = Counter()

    @property
    def count(self) -> int:
        """Live subscribers now, over all clients."""
        return self._by_client.total()

    def of(self, client: str) -> int:
        """Live subscribers of one client now."""
        return self._by_client[client]

    def check(self, client: str) -> None:
        """Raise TooManySubscribers when `client` may not open one more now."""
        if self._by_client[client] >= self.per_client:
            raise TooManySubscribers(
                f"too many live subscriptions from this client (at most {self.per_client}); "
                "close one first"
            )
        if self.count >= self.total:
            raise TooManySubscribers(
                f"the server has its maximum of {self.total} live subscriptions; try again later"
            )

    def acquire(self, client: str) -> None:
        """Count one more subscriber of `client` (TooManySubscribers past a limit)."""
        self.check(client)
        self._by_client[client] += 1

    def release(self, client: str) -> None:
        """Count one subscriber of `client` less."""
        self._by_client[client] -= 1
        if self._by_client[client] <= 0:
            del self._by_client[client]

    @contextmanager
    def admit(self, client: str) -> Iterator[None]:
        """One subscriber of `client` for the block's duration."""
        self.acquire(client)
        try:
            yield
        finally:
            self.release(client)
