"""Scheduled proxy health checks (issue 13), run by each runner beside its supervisor.

Every proxy is checked each `CORRAL_PROXY_CHECK_INTERVAL` seconds (±10%), at most
`CORRAL_PROXY_CHECK_CONCURRENCY` at once (each check starts a real sidecar). The due time
lives in `proxies.next_check_at` and a runner takes a due check with one conditional UPDATE
(`server.proxy_health.take_due_check`), so of several runners on one PostgreSQL exactly one
runs it. Between checks the loop sleeps until the next due time (at most an interval or a
minute, so proxies added meanwhile are seen), or until a running check ends.
"""

from __future__ import annotations

import asyncio
import contextlib

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from runner.store_errors import retryable_database_error
from server.broker import QUEUE_TOPIC, Broker
from server.errors import InvalidInput
from server.events import log_event
from server.models import utcnow
from server.proxies import check_proxy
from server.proxy_health import (
    CheckTrigger,
    clamp_due_times,
    due_proxies,
    next_due_at,
    take_due_check,
)
from server.secretbox import SecretBox
from server.settings import Settings

MAX_SLEEP_SECONDS = 60.0
MIN_SLEEP_SECONDS = 0.05
RETRY_AFTER_ERROR_SECONDS = 5.0
# A check (or a pass of the loop) cancelled in the middle of opening a connection can leave
# its socket or database connection to the garbage collector; a short wait on stop lets the
# usual, quick one end by itself.
STOP_GRACE_SECONDS = 1.0


class ProxyCheckSchedule:
    """The scheduled checks of one runner process; `start()` it, `await stop()` it."""

    def __init__(
        self,
        settings: Settings,
        sessionmaker: async_sessionmaker[AsyncSession],
        secret_box: SecretBox,
        broker: Broker | None = None,
    ) -> None:
        self.settings = settings
        self.broker = broker  # a passing check wakes the claims held for a flagged proxy
        self.sessionmaker = sessionmaker
        self.box = secret_box
        self.interval = float(settings.proxy_check_interval)
        self.concurrency = settings.proxy_check_concurrency
        self.running: dict[int, asyncio.Task[None]] = {}  # proxy id -> its check
        self._slot_freed = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._stopping = False

    @property
    def enabled(self) -> bool:
        return self.interval > 0

    def start(self) -> None:
        """Start the schedule in the background (nothing when the interval is `never`)."""
        if self.enabled and self._task is None:
            self._stopping = False
            self._task = asyncio.create_task(self._main(), name="proxy-check-schedule")

    async def stop(self) -> None:
        """Stop the schedule; the checks under way get a moment to end (most take a few
        milliseconds), then are cancelled (each stops its sidecar and waits for it)."""
        task, self._task = self._task, None
        if task is not None:  # a pass under way ends by itself first (see STOP_GRACE_SECONDS)
            self._stopping = True
            self._slot_freed.set()
            _, pending = await asyncio.wait({task}, timeout=STOP_GRACE_SECONDS)
            if pending:
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        checks = list(self.running.values())
        if checks:
            _, pending = await asyncio.wait(checks, timeout=STOP_GRACE_SECONDS)
            for check in pending:
                check.cancel()
            await asyncio.gather(*checks, return_exceptions=True)
        self.running.clear()

    async def _main(self) -> None:
        async with self.sessionmaker() as session, session.begin():
            await clamp_due_times(session, utcnow(), self.interval)
        while not self._stopping:
            self._slot_freed.clear()
            try:
                due = await self._take_due()
                if self._stopping:
                    break
                self._start_due(due)
                wait = await self._seconds_to_wait()
            except Exception as exc:
                level = "warning" if retryable_database_error(exc) else "error"
                log_event("proxy_schedule_failed", level=level, error=repr(exc))
                wait = RETRY_AFTER_ERROR_SECONDS
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._slot_freed.wait(), wait)

    async def _take_due(self) -> list[int]:
        """The due checks this runner takes now (as many as it has free slots)."""
        free = self.concurrency - len(self.running)
        if free <= 0:
            return []
        now = utcnow()
        taken: list[int] = []
        async with self.sessionmaker() as session, session.begin():
            for proxy_id in await due_proxies(session, now, self.interval, free):
                if proxy_id not in self.running and await take_due_check(
                    session, proxy_id, now, self.interval
                ):
                    taken.append(proxy_id)
        return taken

    def _start_due(self, proxy_ids: list[int]) -> None:
        for proxy_id in proxy_ids:
            task = asyncio.create_task(self._check(proxy_id), name=f"proxy-check-{proxy_id}")
            self.running[proxy_id] = task

    async def _seconds_to_wait(self) -> float:
        """Until the next due check; with every slot busy, until one frees up."""
        # A proxy added meanwhile is due an interval after it was made: a look at least
        # once an interval (and a minute) sees it in time.
        longest = min(MAX_SLEEP_SECONDS, self.interval)
        if len(self.running) >= self.concurrency:
            return longest
        async with self.sessionmaker() as session:
            due = await next_due_at(session, self.interval)
        if due is None:
            return longest
        seconds = (due - utcnow()).total_seconds()
        return min(max(seconds, MIN_SLEEP_SECONDS), longest)

    async def _check(self, proxy_id: int) -> None:
        """One scheduled check, recorded like `checkProxy`'s (its trigger: schedule)."""
        try:
            async with self.sessionmaker() as session, session.begin():
                proxy = await check_proxy(
                    session,
                    self.sessionmaker,
                    self.settings,
                    self.box,
                    proxy_id,
                    CheckTrigger.SCHEDULE,
                )
                ok, failures = proxy.health_ok, proxy.health_failures
            log_event("proxy_checked", proxy=proxy_id, ok=ok, failures=failures)
            if ok and self.settings.hold_on_flagged_proxy and self.broker is not None:
                # Commands held for this proxy may go now: every runner looks (on
                # PostgreSQL the claim loop waits for wake-ups, not a short tick).
                self.broker.publish(QUEUE_TOPIC, None)
        except InvalidInput as exc:  # deleted meanwhile, or no Xray binary on this host
            message = "; ".join(error.message for error in exc.errors)
            log_event("proxy_check_skipped", proxy=proxy_id, reason=message)
        except Exception as exc:
            level = "warning" if retryable_database_error(exc) else "error"
            log_event("proxy_check_failed", level=level, proxy=proxy_id, error=repr(exc))
        finally:
            self.running.pop(proxy_id, None)
            self._slot_freed.set()
