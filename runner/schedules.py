"""Scheduled work of a runner: each service's probe every `probeIntervalSeconds`.

Every runner process runs a `ProbeSchedule`; they share the due times in the database
(`services.next_probe_at`), and a due probe is run by the one runner whose conditional
UPDATE took it (server/probes.py). Between due times the loop sleeps: until the earliest
due time, a wake-up (a saved policy made a probe due), or `RESCAN_SECONDS` at most (a
policy written by a process whose wake-up cannot reach this one).
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from server.broker import SCHEDULE_TOPIC, Broker
from server.db import READ_ONLY
from server.events import log_event
from server.models import utcnow
from server.probes import due_probes, run_scheduled_probe, take_due_probe
from server.secretbox import SecretBox
from server.settings import Settings

RESCAN_SECONDS = 300.0
RETRY_SECONDS = 5.0  # after a pass that failed (the database away)
# Stopping lets a pass under way end by itself first: a task cancelled while its database
# driver opens a connection can leave that connection to the garbage collector (aiosqlite).
STOP_GRACE_SECONDS = 2.0


class ProbeSchedule:
    """Runs the services' due probes, each once across all runners on one database."""

    def __init__(
        self,
        settings: Settings,
        sessionmaker: async_sessionmaker[AsyncSession],
        secret_box: SecretBox,
        broker: Broker,
    ) -> None:
        self.settings = settings
        self.sessionmaker = sessionmaker
        self.box = secret_box
        self.broker = broker
        self._wake = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._probes: set[asyncio.Task[None]] = set()
        self._failing = False
        self._stopping = False

    async def start(self) -> None:
        """Start the loop in the background."""
        self._stopping = False
        self._task = asyncio.create_task(self._main(), name="probe-schedule")

    async def stop(self) -> None:
        """Stop the loop (a pass under way ends first) and the probes under way (nothing
        of them is recorded)."""
        self._stopping = True
        self._wake.set()
        main, self._task = self._task, None
        if main is not None:
            _, pending = await asyncio.wait({main}, timeout=STOP_GRACE_SECONDS)
            for task in pending:
                task.cancel()
        tasks = [task for task in (main, *self._probes) if task is not None]
        for task in self._probes:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _main(self) -> None:
        async with self.broker.subscribe(SCHEDULE_TOPIC) as wakeups:
            listener = asyncio.create_task(self._forward_wakeups(wakeups))
            try:
                while not self._stopping:
                    self._wake.clear()
                    delay = await self._pass()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), delay)
            finally:
                listener.cancel()
                await asyncio.gather(listener, return_exceptions=True)

    async def _forward_wakeups(self, subscription: Any) -> None:
        while True:
            await subscription.get()
            subscription.resync()
            self._wake.set()

    async def _pass(self) -> float:
        """Take and start the due probes; seconds until the next one is due."""
        try:
            delay = await self.run_due()
        except Exception as exc:
            level = "debug" if self._failing else "warning"
            self._failing = True
            log_event("schedule_failed", level=level, error=type(exc).__name__)
            return RETRY_SECONDS
        if self._failing:
            self._failing = False
            log_event("schedule_resumed")
        return delay

    async def run_due(self) -> float:
        """One pass: start every due probe this runner takes; seconds until the next."""
        now = utcnow()
        async with self.sessionmaker() as session:
            await session.connection(execution_options=READ_ONLY)
            due, later = await due_probes(session, now)
        for service_id in due:
            if self._stopping:
                break
            async with self.sessionmaker() as session, session.begin():
                taken = await take_due_probe(session, service_id, now)
            if taken:
                self._start_probe(service_id)
        if later is None:
            return RESCAN_SECONDS
        return min(max((later - utcnow()).total_seconds(), 0.0), RESCAN_SECONDS)

    def _start_probe(self, service_id: int) -> None:
        task = asyncio.create_task(self._probe(service_id), name=f"probe-{service_id}")
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    async def _probe(self, service_id: int) -> None:
        try:
            await run_scheduled_probe(
                self.sessionmaker, self.settings, self.box, service_id, self.broker
            )
        except Exception as exc:  # the database went away between the answer and the write
            log_event("probe_failed", level="warning", service=service_id, error=type(exc).__name__)
