"""The supervisor: claims queued commands, runs each as a process group, streams its lines,
enforces timeouts, cancels, retries with backoff, renews leases and recovers dead runners.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from runner.attempt import AttemptExecution
from runner.attempt_state import Attempt, StopReason
from runner.claims import ClaimRequest, ClaimResult, ClaimTerms
from runner.drain import Drain
from runner.leases import Leases, runner_identity
from runner.loading import AttemptSetup, runner_sandbox
from runner.logstore import LogStore
from runner.oskit.subreaper import become_subreaper
from runner.process import Spawner, use_pidfd_child_watcher
from runner.proxy_checks import ProxyCheckSchedule
from runner.recovery import LIVE_RUNNERS
from runner.redaction import KnownSecrets
from runner.renderpool import RenderPool
from runner.sandbox import NONE, Sandbox, check_reachable
from runner.schedules import ProbeSchedule
from runner.store_errors import ClaimConflict
from runner.workdirs import Workdirs
from server import __version__
from server.broker import (
    CANCEL_TOPIC,
    DRAIN_TOPIC,
    QUEUE_TOPIC,
    SECRETS_TOPIC,
    Broker,
)
from server.events import log_event
from server.known_secrets import process_secrets
from server.metrics import Metrics
from server.models import (
    CommandStatus,
    utcnow,
)
from server.secretbox import SecretBox
from server.settings import Settings
from server.storage import prepare_workspace

TICK_SECONDS = 0.5  # the claim loop's tick on SQLite (and while NOTIFY is not heard)
CONFLICT_RETRY_SECONDS = 0.5  # a claim that lost a race with another runner tries again
GATE_SLACK_SECONDS = 0.05  # a claim at a gate's opening comes just after it, not before


class Supervisor:
    """Runs queued commands. One per `corral serve` (embedded) or `corral runner` process."""

    def __init__(
        self,
        settings: Settings,
        sessionmaker: async_sessionmaker[AsyncSession],
        secret_box: SecretBox,
        broker: Broker,
        metrics: Metrics | None = None,
        render_pool: RenderPool | None = None,
    ) -> None:
        self.settings = settings
        self.sessionmaker = sessionmaker
        self.box = secret_box
        self.broker = broker
        self.metrics = metrics
        self.name = settings.resolved_runner_name
        self.labels = settings.resolved_runner_labels
        self.host = socket.gethostname()
        self.runner_id = f"{self.host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.attempts: dict[int, Attempt] = {}
        self._wake = asyncio.Event()
        self._pins_due = asyncio.Event()  # queued commands to tell if no runner matches
        self._claims: set[asyncio.Task[None]] = set()  # claims out, waiting for the store
        self._claiming = 0  # slots those claims are for
        self._open_claim: ClaimRequest | None = None  # the claim that has not run yet
        self._queue_changed = True  # commands were queued since the last claim
        self._gate_timer: asyncio.TimerHandle | None = None  # when a closed gate opens
        self._stopping = False
        self._stopped = False
        self.stopped = asyncio.Event()  # set once `stop` is done
        self._task: asyncio.Task[None] | None = None
        engine: AsyncEngine = sessionmaker.kw["bind"]
        self.store = LogStore(engine, broker, metrics, self.runner_id, sessionmaker)
        self.gateway = self.store.gateway  # the runner's reads and writes (runner/store.py)
        self.leases = Leases(
            settings,
            self.gateway,
            broker,
            runner_identity(self.runner_id, self.host, settings, __version__),
            self.attempts,
            self._wake,
            self._pins_due,
            on_drain_requested=self._drain_requested,
            lose=lambda attempt: self.execution.lose(attempt),
        )
        self._drain = Drain(self.runner_id, self.gateway, self.attempts, self._claims, self.stop)
        self.claim_terms = ClaimTerms.of_runner(settings, self.runner_id, self.host, self.name)
        self.sandbox = Sandbox(NONE)
        self.workdirs = Workdirs(settings.commands_dir)
        self.spawner = Spawner()
        # Templates render in worker processes: the app's pool, else one of its own.
        self._owns_render_pool = render_pool is None
        self.render_pool = render_pool or RenderPool.from_settings(settings)
        self.proxy_checks = ProxyCheckSchedule(settings, sessionmaker, secret_box, broker)
        self.schedule = ProbeSchedule(settings, sessionmaker, secret_box, broker)
        self.secrets = KnownSecrets(
            sessionmaker,
            secret_box,
            process_secrets(settings, secret_box),
            settings.secrets_refresh_seconds,
        )
        self._attempt_parts()

    def _attempt_parts(self) -> None:
        """What loads and runs attempts, given this runner's sandbox and render pool (both
        chosen again at each start)."""
        self.setup = AttemptSetup(
            self.settings,
            self.gateway,
            self.box,
            self.runner_id,
            self.sandbox,
            self.render_pool,
            self.workdirs,
        )
        self.execution = AttemptExecution(
            self.settings,
            self.setup,
            self.store,
            self.secrets,
            self.broker,
            self.metrics,
            self.runner_id,
            self.sandbox,
            self.workdirs,
            attempts=self.attempts,
            wake=self._wake,
            claim_free_slots=self.claim_free_slots,
            announce_requeued=self.announce_requeued,
            spawner=self.spawner,
        )

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Recover what a dead runner left, then start the claim loop in the background."""
        self._stopping = self._stopped = False
        self.stopped = asyncio.Event()
        self._drain = Drain(self.runner_id, self.gateway, self.attempts, self._claims, self.stop)
        self.sandbox = await asyncio.to_thread(runner_sandbox, self.settings)
        await asyncio.to_thread(prepare_workspace, self.settings)
        if self.sandbox.run_as is not None:
            check_reachable(self.settings.commands_dir, self.sandbox.run_as)
        # What leaves a command's session comes back to this process (see oskit/subreaper.py), and
        # so does bwrap's PID-namespace init, which its monitor leaves behind unreaped: a
        # zombie of the command's group that the host's init may take seconds to collect.
        become_subreaper()
        LIVE_RUNNERS.add(self.runner_id)
        use_pidfd_child_watcher()
        if self._owns_render_pool and self.render_pool.closed:  # started again after a stop
            self.render_pool = RenderPool.from_settings(self.settings)
        self._attempt_parts()
        self.workdirs.start()
        self.spawner.start()
        self.store.start()
        await self.leases.register()
        await self.leases.recover()
        await self.secrets.refresh_or_keep()  # the first claim does not pay for decrypting them all
        self._task = asyncio.create_task(self._main(), name=f"supervisor-{self.runner_id}")
        if self.settings.schedules:
            self.proxy_checks.start()
            await self.schedule.start()
        log_event("runner_started", runner=self.runner_id, name=self.name, labels=self.labels)
        log_event(
            "protection",
            level="info" if self.sandbox.protected else "warning",
            mode=self.sandbox.mode,
            detail=self.sandbox.describe(),
        )

    @property
    def draining(self) -> bool:
        """It was asked to drain (it claims nothing more), or is stopping."""
        return self._drain.draining or self._stopping

    def begin_drain(self, seconds: float | None = None) -> asyncio.Task[None]:
        """Drain in the background (runner/drain.py) for up to `seconds`
        (CORRAL_DRAIN_SECONDS), then `stop`. Once begun, the same drain."""
        if self._gate_timer is not None:
            self._gate_timer.cancel()
        return self._drain.begin(self.settings.drain_seconds if seconds is None else seconds)

    async def drain(self, seconds: float | None = None) -> None:
        """`begin_drain` (or the drain already begun), and wait until the runner stopped."""
        if self._stopped and self._drain.task is None:  # stopping without a drain
            await self.stopped.wait()
            return
        await asyncio.shield(self.begin_drain(seconds))

    def on_shutdown_signal(self) -> None:
        """SIGTERM or SIGINT: the first begins the drain, the next stops what runs now."""
        if self._gate_timer is not None:
            self._gate_timer.cancel()
        self._drain.on_signal(self.settings.drain_seconds)

    def _drain_requested(self) -> None:
        """`corral runner --drain` named this runner (its heartbeat read the request)."""
        if not self.draining:
            log_event("drain_requested", runner=self.runner_id, name=self.name)
            self.begin_drain()

    async def stop(self) -> None:
        """Stop claiming; stop every child (TERM, grace, KILL) and put its command back."""
        if self._stopped:  # stopped, or stopping: its end
            await self.stopped.wait()
            return
        self._stopped = True
        try:
            await self._stop()
        finally:
            self.stopped.set()

    async def _stop(self) -> None:
        self._stopping = True
        self.store.shutting_down()  # a database that stays down must not hold the stop up
        await self.schedule.stop()
        # The claim loop goes first, then the claims already out land (a claim in the
        # store's queue is committed all the same): what they took is put back unstarted.
        if self._gate_timer is not None:
            self._gate_timer.cancel()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        await self.proxy_checks.stop()
        if self._claims:
            await asyncio.gather(*self._claims, return_exceptions=True)
        for attempt in list(self.attempts.values()):
            attempt.request_stop(StopReason.SHUTDOWN)
        tasks = [a.task for a in self.attempts.values() if a.task is not None]
        if tasks:
            await asyncio.gather(*tasks, return_exceptions=True)
        with contextlib.suppress(Exception):  # a database that is down: it shows as dead
            await self.gateway.mark_runner_stopped(self.runner_id)
        await self.store.close()
        if self._owns_render_pool:
            await self.render_pool.close()
        self.workdirs.stop()
        self.spawner.stop()
        LIVE_RUNNERS.discard(self.runner_id)
        log_event("runner_stopped", runner=self.runner_id)

    async def _main(self) -> None:
        async with (
            self.broker.subscribe(QUEUE_TOPIC) as queued,
            self.broker.subscribe(CANCEL_TOPIC) as cancels,
            self.broker.subscribe(SECRETS_TOPIC) as secret_changes,
            self.broker.subscribe(DRAIN_TOPIC) as drain_requests,
        ):
            listeners = [
                asyncio.create_task(self._forward_wakeups(queued)),
                asyncio.create_task(self.leases.listen_cancels(cancels)),
                asyncio.create_task(
                    self.secrets.watch(secret_changes, lambda: bool(self.attempts))
                ),
                asyncio.create_task(self.leases.loop()),
                asyncio.create_task(self.leases.explain_pinned()),
                asyncio.create_task(self.leases.listen_drain(drain_requests)),
            ]
            try:
                while not self._stopping:
                    self._wake.clear()
                    self.claim_free_slots()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), self._tick())
            finally:
                for task in listeners:
                    task.cancel()
                await asyncio.gather(*listeners, return_exceptions=True)

    async def _forward_wakeups(self, subscription: Any) -> None:
        while True:
            await subscription.get()
            subscription.resync()
            self._queue_changed = True
            self._pins_due.set()
            self._wake.set()

    def _look_again(self) -> None:
        self._queue_changed = True
        self._wake.set()

    def _tick(self) -> float:
        """How long the claim loop waits for a wake-up: on PostgreSQL, while the broker
        listens, queue wake-ups come by NOTIFY and the tick is a safety net
        (CORRAL_CLAIM_POLL_SECONDS); on SQLite and while the broker reconnects, short."""
        return self.settings.claim_poll_seconds if self.broker.listening else TICK_SECONDS

    # -- claiming ----------------------------------------------------------------------

    def claim_free_slots(self) -> None:
        """Claim a command for every free slot that no claim is out for yet. The claim
        goes with the next flush of the log store: a command that is finishing asks for it
        before it queues its final state, so both land in one transaction and its slot is
        not idle for a flush of its own. Slots that free up while a claim waits for its
        flush join that claim (one claim a flush)."""
        busy = sum(1 for attempt in self.attempts.values() if not attempt.finishing)
        free = self.settings.max_concurrency - busy - self._claiming
        if self.draining:
            return
        if free <= 0:
            # No slot: a command queued meanwhile still hears why it waits (one claim of
            # no slots, which only reads the head of the queue and writes its reasons).
            if not self._queue_changed or self._open_claim is not None:
                return
            free = 0
        self._queue_changed = False
        self._claiming += free
        job = self._open_claim
        if job is not None and job.claimed_for is None:
            job.free += free
            return
        job = self._open_claim = ClaimRequest(self.claim_terms, free)
        task = asyncio.create_task(self._start_claimed(job, self.store.submit(job)))
        self._claims.add(task)
        task.add_done_callback(self._claims.discard)

    async def _start_claimed(self, job: ClaimRequest, result: asyncio.Future[ClaimResult]) -> None:
        try:
            outcome = await result
        except ClaimConflict:
            # Another runner took a command of the same profile at the same moment: look
            # again soon (on PostgreSQL the tick is slow, and no wake-up follows a race).
            log_event("claim_conflict", runner=self.runner_id)
            asyncio.get_running_loop().call_later(CONFLICT_RETRY_SECONDS, self._look_again)
            return
        except Exception as exc:  # keep the runner alive; the next tick claims again
            log_event("claim_failed", level="error", error=repr(exc))
            return
        finally:
            self._claiming -= job.free
            if self._open_claim is job:
                self._open_claim = None
            if self._queue_changed or (job.claimed_for is not None and job.claimed_for < job.free):
                # Slots joined as it ran, or commands queued as it ran were not seen: next.
                self._wake.set()
        claimed, upcoming = outcome.claimed, outcome.upcoming
        outcome.announce(self.broker, self.runner_id)
        if outcome.wake_at is not None:
            self._wake_at(outcome.wake_at)
        self.workdirs.prepare([c.command.id for c in claimed], upcoming, self.sandbox.run_as)
        for claim in claimed:
            command = claim.command
            self.broker.publish_status(command.id, CommandStatus.RUNNING.value)
            attempt = Attempt(
                command.id,
                command.attempts,
                command.max_attempts,
                command.backoff_seconds,
                command.uncounted_attempts,
                fence=command.fence,
            )
            if self.draining:  # claimed as the runner stops: it goes back to the queue
                attempt.request_stop(StopReason.SHUTDOWN)
            earlier = self.attempts.get(command.id)
            # Recovered while this runner was away, and claimed by it again: the earlier
            # attempt is lost. (One that is finishing wrote its state: its own retry.)
            if earlier is not None and not earlier.finishing:
                self.execution.lose(earlier)
            self.attempts[command.id] = attempt
            attempt.task = asyncio.create_task(self.execution.run(attempt, claim))
        if self.metrics is not None:
            self.metrics.running.set(len(self.attempts))

    def _wake_at(self, moment: datetime) -> None:
        """Claim again when the earliest closed gate opens (a timer, not a poll)."""
        delay = max((moment - utcnow()).total_seconds(), 0.0) + GATE_SLACK_SECONDS
        loop = asyncio.get_running_loop()
        when = loop.time() + delay
        timer = self._gate_timer
        if timer is not None and not timer.cancelled() and timer.when() <= when:
            return
        if timer is not None:
            timer.cancel()
        self._gate_timer = loop.call_at(when, self._wake.set)

    def announce_requeued(self, command_id: int, not_before: datetime | None) -> None:
        """A command this runner put back in the queue: at once (a drain, a shutdown), every
        runner hears it; after a backoff, this one looks again then (the others' safety
        net covers a runner that has stopped by then)."""
        if not_before is None:
            self.broker.publish(QUEUE_TOPIC, command_id)
        elif not self.draining:
            delay = max((not_before - utcnow()).total_seconds(), 0.0) + GATE_SLACK_SECONDS
            asyncio.get_running_loop().call_later(delay, self._wake.set)
