"""Login rate limit: at most N bad passwords per user name and per client address within a
sliding window; the attempt after that is refused before its password is checked.

In memory, per process: several `corral serve` processes each count on their own (an
attacker spread over them gets N tries per process). Memory is bounded: each counter keeps
at most N timestamps, and at most `max_keys` names and `max_keys` addresses are tracked
(the least recently failed are forgotten first, so a flood of made-up names cannot grow it).
"""

from __future__ import annotations

import math
import time
from collections import OrderedDict, deque
from collections.abc import Callable
from dataclasses import dataclass

MAX_KEYS = 10_000
NAME_KEY_MAX = 64  # a longer name is counted by its first characters


class FailureCounter:
    """Recent failure times per key (newest keys last), bounded in keys and in times per key."""

    def __init__(self, max_failures: int, window: float, max_keys: int) -> None:
        self.max_failures = max_failures
        self.window = window
        self.max_keys = max_keys
        self._failures: OrderedDict[str, deque[float]] = OrderedDict()

    def __len__(self) -> int:
        return len(self._failures)

    def blocked_for(self, key: str, now: float) -> float:
        """Seconds until `key` may try again (0: it may now)."""
        stamps = self._failures.get(key)
        if stamps is None:
            return 0.0
        while stamps and stamps[0] <= now - self.window:
            stamps.popleft()
        if not stamps:
            del self._failures[key]
            return 0.0
        if len(stamps) < self.max_failures:
            return 0.0
        return stamps[0] + self.window - now

    def add(self, key: str, stamp: float) -> None:
        stamps = self._failures.pop(key, None) or deque(maxlen=self.max_failures)
        stamps.append(stamp)
        self._failures[key] = stamps  # now the most recent key
        while len(self._failures) > self.max_keys:
            self._failures.popitem(last=False)

    def discard(self, key: str, stamp: float) -> None:
        stamps = self._failures.get(key)
        if stamps is not None and stamp in stamps:
            stamps.remove(stamp)

    def clear(self, key: str) -> None:
        self._failures.pop(key, None)


@dataclass(frozen=True)
class Attempt:
    """A login attempt let through: counted as a failure until `LoginLimiter.succeeded`."""

    name: str
    address: str
    stamp: float


class LoginLimiter:
    """Per-name and per-address failure counting for the login form.

    An attempt is counted as a failure when it starts, and forgiven if the password was
    right: concurrent attempts cannot slip past the limit while their passwords are checked.
    """

    def __init__(
        self,
        max_failures: int,
        window_seconds: float,
        *,
        max_keys: int = MAX_KEYS,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.names = FailureCounter(max_failures, window_seconds, max_keys)
        self.addresses = FailureCounter(max_failures, window_seconds, max_keys)
        self.clock = clock
        self._last = 0.0

    def begin(self, name: str, address: str) -> Attempt | int:
        """The attempt, counted; or, when the name or the address is over the limit, the
        whole seconds to wait before trying again."""
        now = self._stamp()
        name_key = name.strip().lower()[:NAME_KEY_MAX]
        wait = max(self.names.blocked_for(name_key, now), self.addresses.blocked_for(address, now))
        if wait > 0:
            return max(1, math.ceil(wait))
        self.names.add(name_key, now)
        self.addresses.add(address, now)
        return Attempt(name_key, address, now)

    def succeeded(self, attempt: Attempt) -> None:
        """The password was right: the name starts afresh, and the attempt does not count
        against the address (other names' failures from it still do)."""
        self.names.clear(attempt.name)
        self.addresses.discard(attempt.address, attempt.stamp)

    def _stamp(self) -> float:
        # Distinct stamps, so that `succeeded` forgives exactly its own attempt.
        self._last = max(self.clock(), math.nextafter(self._last, math.inf))
        return self._last
