"""This runner's presence in the database: its row in the runners table and its heartbeat,
its commands' leases (renewed; the cancels asked for meanwhile come back with them), the
commands pinned to no alive runner (they wait, saying which runner), and the recovery of
what dead runners left (runner/recovery.py decides).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from datetime import timedelta
from typing import Any

from runner.attempt_state import Attempt, StopReason
from runner.markers import kill_runs_of
from runner.oskit.subreaper import reap_orphans
from runner.recovery import Recovery, runner_process_gone
from runner.store import RunnerInfo, RunnerStore
from runner.store_errors import retryable_database_error
from server.broker import QUEUE_TOPIC, Broker
from server.events import log_event
from server.models import CommandStatus, utcnow
from server.runners import alive_window
from server.settings import Settings

PINNED_LOOK_SECONDS = 0.5  # at most one look for pinned commands a supervisor tick


def runner_identity(runner_id: str, host: str, settings: Settings, version: str) -> RunnerInfo:
    """What this runner process registers about itself."""
    return RunnerInfo(
        runner_id=runner_id,
        name=settings.resolved_runner_name,
        labels=settings.resolved_runner_labels,
        version=version,
        max_concurrency=settings.max_concurrency,
        host=host,
        pid=os.getpid(),
    )


class Leases:
    """The lease pass of one supervisor, given its identity, its gateway, its running
    attempts (stopped when a cancel comes back) and the event that wakes its claims."""

    def __init__(
        self,
        settings: Settings,
        gateway: RunnerStore,
        broker: Broker,
        identity: RunnerInfo,
        attempts: dict[int, Attempt],
        wake: asyncio.Event,
        pins_due: asyncio.Event,
        *,
        on_drain_requested: Callable[[], None],
        lose: Callable[[Attempt], None],
    ) -> None:
        self.settings = settings
        self.gateway = gateway
        self.broker = broker
        self.identity = identity
        self.runner_id = identity.runner_id
        self.host = identity.host
        self.attempts = attempts
        self.wake = wake  # set when recovery put commands back
        self.pins_due = pins_due  # set when commands were queued
        self.on_drain_requested = on_drain_requested  # `corral runner --drain` named it
        self.lose = lose  # an attempt whose fence a renewal found refused
        self.earlier: list[tuple[str, int]] = []  # earlier runs of it that died (id, pid)

    async def loop(self) -> None:
        """Every third of a lease: renew, heartbeat, recover (forever; cancel it)."""
        interval = max(self.settings.lease_seconds / 3, 0.2)
        while True:
            await asyncio.sleep(interval)
            reap_orphans()
            try:
                await self.renew()
                await self.heartbeat()
                await self.recover()
            except Exception as exc:
                # A database that is down is the log store's to report (once an outage).
                level = "debug" if retryable_database_error(exc) else "error"
                log_event("lease_pass_failed", level=level, error=repr(exc))

    async def register(self) -> None:
        """Add this runner to the runners table (GraphQL `runners`, the panel); its earlier
        runs on this host that died are swept after the first recovery."""
        earlier = await self.gateway.register_runner(self.identity, utcnow() - self.alive_window)
        self.earlier = [(rid, pid) for rid, pid in earlier if runner_process_gone(rid, pid)]

    @property
    def alive_window(self) -> timedelta:
        """A runner whose last heartbeat is older than this is not alive."""
        return alive_window(self.settings.lease_seconds)

    async def heartbeat(self) -> None:
        """Say this runner is alive (with its running count), and drain if someone asked it
        to; make the commands pinned to no alive runner wait, saying which one they wait for."""
        if await self.gateway.heartbeat(self.runner_id, len(self.attempts)):
            self.on_drain_requested()
        await self.wait_for_runners()

    async def wait_for_runners(self) -> None:
        """Commands pinned (by their profile's affinity) to no alive runner wait, saying
        which runner they wait for."""
        for command_id in await self.gateway.wait_for_runners(utcnow() - self.alive_window):
            self.broker.publish_status(command_id, CommandStatus.WAITING.value)

    async def explain_pinned(self) -> None:
        """As commands are queued, those pinned to no alive runner hear why at once, not
        at the next lease pass (at most one look a tick)."""
        while True:
            await self.pins_due.wait()
            self.pins_due.clear()
            try:
                await self.wait_for_runners()
            except Exception as exc:  # the lease pass says it again, and reports outages
                log_event("pinned_check_failed", level="debug", error=repr(exc))
            await asyncio.sleep(PINNED_LOOK_SECONDS)

    async def listen_cancels(self, subscription: Any) -> None:
        """Stop the attempts whose cancel the broker carries (forever; cancel it)."""
        while True:
            message = await subscription.get()
            subscription.resync()
            if isinstance(message, int) and message in self.attempts:
                self.attempts[message].request_stop(StopReason.CANCEL)
            elif message is None:  # missed ones (the broker reconnected): the flags say
                with contextlib.suppress(Exception):  # else the next lease pass does it
                    await self.renew()

    async def listen_drain(self, subscription: Any) -> None:
        """Someone asked runners to drain: is it this one? (Its heartbeat reads its row;
        the next lease pass asks again in any case.) Forever; cancel it."""
        while True:
            await subscription.get()
            subscription.resync()
            with contextlib.suppress(Exception):
                await self.heartbeat()

    async def renew(self) -> None:
        """Extend this runner's leases; stop the attempts someone asked to cancel; lose
        those whose fence was refused (recovered elsewhere)."""
        fences = {
            command_id: attempt.fence
            for command_id, attempt in self.attempts.items()
            if attempt.fence is not None and not attempt.finishing
        }
        if not fences:
            return
        expires = utcnow() + timedelta(seconds=self.settings.lease_seconds)
        renewal = await self.gateway.renew_leases(self.runner_id, fences, expires)
        for command_id in renewal.cancel:
            if command_id in self.attempts:
                self.attempts[command_id].request_stop(StopReason.CANCEL)
        for command_id in renewal.lost:
            attempt = self.attempts.get(command_id)
            # One that began finishing meanwhile wrote its final state: not lost.
            if attempt is None or attempt.finishing or attempt.fence != fences[command_id]:
                continue
            self.lose(attempt)

    async def recover(self) -> None:
        """Re-queue (or fail) commands whose runner died: lease expired, or on this host
        a runner process that no longer exists. Their leftover processes here are killed."""
        recovery = Recovery(self.settings, self.runner_id, self.host, utcnow())
        orphans = await self.gateway.recover_orphans(self.runner_id, recovery.recover)
        for command_id, status in orphans:
            self.broker.publish_status(command_id, status)
        if any(status == CommandStatus.QUEUED.value for _, status in orphans):
            self.broker.publish(QUEUE_TOPIC, None)  # other runners may have the free slots
        if orphans:
            self.wake.set()
        earlier, self.earlier = self.earlier, []
        for runner_id in (runner_id for runner_id, _ in earlier):
            # Its commands may have been recovered and finished by a runner on another host
            # (which cannot reach these processes): whatever of its runs is left here goes.
            if killed := await asyncio.to_thread(kill_runs_of, runner_id):
                log_event("leftovers_killed", previous_runner=runner_id, processes=killed)
