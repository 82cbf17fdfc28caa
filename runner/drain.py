"""A runner's graceful stop: claim nothing more, let the running commands finish for up to
CORRAL_DRAIN_SECONDS, then stop the runner (what still runs is stopped and put back in the
queue without the attempt counting: runner/policy.py's SHUTDOWN). SIGTERM or SIGINT begins
it (the next signal stops what runs at once), and so does `corral runner --drain` through
the runners table and a broker wake-up.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Awaitable, Callable

from runner.attempt_state import Attempt
from runner.store import RunnerStore
from server.events import log_event


class Drain:
    """The drain of one supervisor, given its id, gateway, running attempts, the claims it
    has out (what they take goes back unstarted) and its `stop`."""

    def __init__(
        self,
        runner_id: str,
        gateway: RunnerStore,
        attempts: dict[int, Attempt],
        claims: set[asyncio.Task[None]],
        stop: Callable[[], Awaitable[None]],
    ) -> None:
        self.runner_id = runner_id
        self.gateway = gateway
        self.attempts = attempts
        self.claims = claims
        self.stop = stop
        self.draining = False  # it claims nothing more
        self.task: asyncio.Task[None] | None = None  # the drain, once it began
        self.hurry = asyncio.Event()  # stop what still runs now, not at the deadline

    def begin(self, seconds: float) -> asyncio.Task[None]:
        """Drain in the background (once begun, the same drain)."""
        if self.task is None:
            self.task = asyncio.create_task(
                self._then_stop(seconds), name=f"drain-{self.runner_id}"
            )
        return self.task

    def on_signal(self, seconds: float) -> None:
        """SIGTERM or SIGINT: the first begins the drain, the next stops what runs now."""
        if self.task is None:
            self.begin(seconds)
        else:
            log_event("runner_hurried", runner=self.runner_id, running=len(self.attempts))
            self.hurry.set()

    async def _then_stop(self, seconds: float) -> None:
        self.draining = True
        log_event("runner_draining", runner=self.runner_id, running=len(self.attempts))
        marking = asyncio.create_task(self.gateway.mark_runner_draining(self.runner_id))
        hurry = asyncio.create_task(self.hurry.wait())
        loop = asyncio.get_running_loop()
        deadline = loop.time() + seconds
        try:
            # The claims already out land too: what they took goes back unstarted.
            while (self.attempts or self.claims) and not self.hurry.is_set():
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                running = {a.task for a in self.attempts.values() if a.task is not None}
                await asyncio.wait(
                    {*running, *self.claims, hurry},
                    timeout=remaining,
                    return_when="FIRST_COMPLETED",
                )
        finally:
            hurry.cancel()
            if not marking.done():  # a database that is away must not hold the drain up
                marking.cancel()
            with contextlib.suppress(BaseException):
                await marking
        if self.attempts:
            log_event("drain_deadline", runner=self.runner_id, running=len(self.attempts))
        await self.stop()
