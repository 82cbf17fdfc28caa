"""The supervisor: claims queued commands, runs each as a process group, streams its lines,
enforces timeouts, cancels, retries with backoff, renews leases and recovers dead runners.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import uuid
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from runner import policy
from runner.attempt import Attempt, AttemptExecution, StopReason, jitter
from runner.claims import ClaimRequest, ClaimResult, ClaimTerms
from runner.loading import RUNNER_CODE, make_workdirs
from runner.logstore import LogStore
from runner.process import (
    become_subreaper,
    reap_orphans,
    use_pidfd_child_watcher,
)
from runner.proxy_checks import ProxyCheckSchedule
from runner.recovery import LIVE_RUNNERS, Recovery
from runner.redaction import KnownSecrets
from runner.renderpool import RenderPool
from runner.sandbox import NONE, Sandbox, check_reachable, choose_sandbox
from runner.schedules import ProbeSchedule
from runner.store import RunnerInfo
from runner.store_errors import retryable_database_error
from server import __version__
from server.broker import (
    CANCEL_TOPIC,
    QUEUE_TOPIC,
    SECRETS_TOPIC,
    USAGE_TOPIC,
    Broker,
    UsageRecorded,
)
from server.events import log_event
from server.known_secrets import process_secrets
from server.metrics import Metrics
from server.models import (
    CommandStatus,
    utcnow,
)
from server.runners import alive_window
from server.secretbox import SecretBox
from server.settings import Settings
from server.storage import prepare_workspace
from xray.binary import XrayBinary

TICK_SECONDS = 0.5
WORKDIRS_REMEMBERED = 10_000
GATE_SLACK_SECONDS = 0.05  # a claim at a gate's opening comes just after it, not before
UNIQUE_VIOLATION = "23505"  # SQLSTATE


def backoff_delay(base: float, attempt: int, ceiling: float) -> float:
    """Exponential backoff with full jitter: uniform in [base, base * 2**(attempt-1)]."""
    return policy.backoff_delay(base, attempt, ceiling, jitter())


class Supervisor(AttemptExecution):
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
        self._task: asyncio.Task[None] | None = None
        self._xray: XrayBinary | None = None
        engine: AsyncEngine = sessionmaker.kw["bind"]
        self.store = LogStore(engine, broker, metrics, self.runner_id, sessionmaker)
        self.gateway = self.store.gateway  # the runner's reads and writes (runner/store.py)
        self.claim_terms = ClaimTerms(
            runner_id=self.runner_id,
            host=self.host,
            runner_name=self.name,
            max_concurrency=settings.max_concurrency,
            lease_seconds=settings.lease_seconds,
            hold_on_flagged_proxy=settings.hold_on_flagged_proxy,
            proxy_flag_after=settings.proxy_flag_after,
            labels=tuple(self.labels),
        )
        self._commands_dir = settings.commands_dir
        self.sandbox = Sandbox(NONE)
        self._files: ThreadPoolExecutor | None = None
        self._workdirs: set[int] = set()  # working directories made ahead of their claim
        # Templates render in worker processes: the app's pool, else one of its own.
        self._owns_render_pool = render_pool is None
        self.render_pool = render_pool or RenderPool.from_settings(settings)
        self._secrets_failing = False
        self.proxy_checks = ProxyCheckSchedule(settings, sessionmaker, secret_box)
        self.schedule = ProbeSchedule(settings, sessionmaker, secret_box, broker)
        self.secrets = KnownSecrets(
            sessionmaker,
            secret_box,
            process_secrets(settings, secret_box),
            settings.secrets_refresh_seconds,
        )

    # -- lifecycle ---------------------------------------------------------------------

    async def start(self) -> None:
        """Recover what a dead runner left, then start the claim loop in the background."""
        self._stopping = False
        self.sandbox = await asyncio.to_thread(runner_sandbox, self.settings)
        await asyncio.to_thread(prepare_workspace, self.settings)
        if self.sandbox.run_as is not None:
            check_reachable(self.settings.commands_dir, self.sandbox.run_as)
        # What leaves a command's session comes back to this process (see process.py), and
        # so does bwrap's PID-namespace init, which its monitor leaves behind unreaped: a
        # zombie of the command's group that the host's init may take seconds to collect.
        become_subreaper()
        LIVE_RUNNERS.add(self.runner_id)
        use_pidfd_child_watcher()
        if self._owns_render_pool and self.render_pool.closed:  # started again after a stop
            self.render_pool = RenderPool.from_settings(self.settings)
        self._files = ThreadPoolExecutor(1, thread_name_prefix="corral-files")
        self.store.start()
        await self.register()
        await self.recover()
        await self._refresh_secrets()  # the first claim does not pay for decrypting them all
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

    async def stop(self) -> None:
        """Stop claiming; stop every child (TERM, grace, KILL) and put its command back."""
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
        if self._files is not None:
            self._files.shutdown(wait=False)
        LIVE_RUNNERS.discard(self.runner_id)
        log_event("runner_stopped", runner=self.runner_id)

    async def _main(self) -> None:
        async with (
            self.broker.subscribe(QUEUE_TOPIC) as queued,
            self.broker.subscribe(CANCEL_TOPIC) as cancels,
            self.broker.subscribe(SECRETS_TOPIC) as secret_changes,
        ):
            listeners = [
                asyncio.create_task(self._forward_wakeups(queued)),
                asyncio.create_task(self._listen_cancels(cancels)),
                asyncio.create_task(self._watch_secrets(secret_changes)),
                asyncio.create_task(self._lease_loop()),
                asyncio.create_task(self._explain_pinned()),
            ]
            try:
                while not self._stopping:
                    self._wake.clear()
                    self.claim_free_slots()
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self._wake.wait(), TICK_SECONDS)
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

    async def _listen_cancels(self, subscription: Any) -> None:
        while True:
            message = await subscription.get()
            subscription.resync()
            if isinstance(message, int) and message in self.attempts:
                self.attempts[message].request_stop(StopReason.CANCEL)
            elif message is None:  # missed ones (the broker reconnected): the flags say
                with contextlib.suppress(Exception):  # else the next lease pass does it
                    await self.renew_leases()

    async def _watch_secrets(self, subscription: Any) -> None:
        """Reload the known secrets when the API changed one, and every refresh interval
        while commands run (for changes made by other processes)."""
        while True:
            try:
                await asyncio.wait_for(subscription.get(), self.secrets.refresh_seconds)
                subscription.resync()
                self.secrets.invalidate()
            except TimeoutError:
                if not self.attempts:
                    continue
            await self._refresh_secrets()

    async def _refresh_secrets(self) -> None:
        """Reload the known secrets; while the database is away, mask what is known (one
        WARNING when reloading starts failing, one INFO line when it works again)."""
        try:
            await self.secrets.refresh()
        except Exception as exc:
            level = "debug" if self._secrets_failing else "warning"
            self._secrets_failing = True
            log_event("secrets_reload_failed", level=level, error=type(exc).__name__)
            return
        if self._secrets_failing:
            self._secrets_failing = False
            log_event("secrets_reloaded")

    # -- claiming ----------------------------------------------------------------------

    def claim_free_slots(self) -> None:
        """Claim a command for every free slot that no claim is out for yet. The claim
        goes with the next flush of the log store: a command that is finishing asks for it
        before it queues its final state, so both land in one transaction and its slot is
        not idle for a flush of its own. Slots that free up while a claim waits for its
        flush join that claim (one claim a flush)."""
        busy = sum(1 for attempt in self.attempts.values() if not attempt.finishing)
        free = self.settings.max_concurrency - busy - self._claiming
        if self._stopping:
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
        except IntegrityError:
            # Another runner took a command of the same profile at the same moment.
            log_event("claim_conflict", runner=self.runner_id)
            return
        except Exception as exc:  # keep the runner alive; the next tick claims again
            log_event("claim_failed", level="error", error=repr(exc))
            return
        finally:
            self._claiming -= job.free
            if self._open_claim is job:
                self._open_claim = None
            if job.claimed_for is not None and job.claimed_for < job.free:
                self._wake.set()  # slots joined as it ran: they are claimed next
        claimed, upcoming = outcome.claimed, outcome.upcoming
        for command_id in outcome.waiting:
            self.broker.publish_status(command_id, CommandStatus.WAITING.value)
        for command_id in outcome.failed:
            log_event("failed_at_gate", command=command_id, runner=self.runner_id)
            self.broker.publish_status(command_id, CommandStatus.FAILED.value)
        for service_id in outcome.spent:  # Corral's count of the tokens moved on
            self.broker.publish(USAGE_TOPIC, UsageRecorded(service_id))
        if outcome.wake_at is not None:
            self._wake_at(outcome.wake_at)
        if claimed:
            log_event(
                "claimed",
                commands=",".join(str(claim.command.id) for claim in claimed),
                runner=self.runner_id,
            )
        self._prepare_workdirs([claim.command.id for claim in claimed], upcoming)
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
            if self._stopping:  # claimed as the runner stops: it goes back to the queue
                attempt.request_stop(StopReason.SHUTDOWN)
            earlier = self.attempts.get(command.id)
            # Recovered while this runner was away, and claimed by it again: the earlier
            # attempt is lost. (One that is finishing wrote its state: its own retry.)
            if earlier is not None and not earlier.finishing:
                self._lose(earlier)
            self.attempts[command.id] = attempt
            attempt.task = asyncio.create_task(self._run_attempt(attempt, claim))
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

    def _prepare_workdirs(self, claimed: list[int], upcoming: list[int]) -> None:
        """Working directories: the claimed commands' now (unless made ahead), the next
        ones' ahead of time in a thread (mkdir costs up to a millisecond on a busy disk)."""
        if len(self._workdirs) > WORKDIRS_REMEMBERED:
            self._workdirs.clear()
        missing = [command_id for command_id in claimed if command_id not in self._workdirs]
        if missing:
            make_workdirs(self._commands_dir, missing, self.sandbox.run_as)
        ahead = [command_id for command_id in upcoming if command_id not in self._workdirs]
        if not ahead or self._files is None:
            return
        self._workdirs.update(ahead)
        made = asyncio.get_running_loop().run_in_executor(
            self._files, make_workdirs, self._commands_dir, ahead, self.sandbox.run_as
        )
        made.add_done_callback(self._workdirs_made)

    def _workdirs_made(self, made: asyncio.Future[None]) -> None:
        if made.cancelled() or made.exception() is not None:
            self._workdirs.clear()  # not sure which exist: make them when claimed

    # -- leases and recovery -----------------------------------------------------------

    async def _lease_loop(self) -> None:
        interval = max(self.settings.lease_seconds / 3, 0.2)
        while True:
            await asyncio.sleep(interval)
            reap_orphans()
            try:
                await self.renew_leases()
                await self.heartbeat()
                await self.recover()
            except Exception as exc:
                # A database that is down is the log store's to report (once an outage).
                level = "debug" if retryable_database_error(exc) else "error"
                log_event("lease_pass_failed", level=level, error=repr(exc))

    async def register(self) -> None:
        """Add this runner to the runners table (GraphQL `runners`, the panel)."""
        info = RunnerInfo(
            runner_id=self.runner_id,
            name=self.name,
            labels=self.labels,
            version=__version__,
            max_concurrency=self.settings.max_concurrency,
            host=self.host,
            pid=os.getpid(),
        )
        await self.gateway.register_runner(info, utcnow() - self.alive_window)

    @property
    def alive_window(self) -> timedelta:
        """A runner whose last heartbeat is older than this is not alive."""
        return alive_window(self.settings.lease_seconds)

    async def heartbeat(self) -> None:
        """Say this runner is alive (with its running count); make the commands pinned to no
        alive runner wait, saying which one they wait for."""
        await self.gateway.heartbeat(self.runner_id, len(self.attempts))
        await self.wait_for_runners()

    async def wait_for_runners(self) -> None:
        """Commands pinned (by their profile's affinity) to no alive runner wait, saying
        which runner they wait for."""
        for command_id in await self.gateway.wait_for_runners(utcnow() - self.alive_window):
            self.broker.publish_status(command_id, CommandStatus.WAITING.value)

    async def _explain_pinned(self) -> None:
        """As commands are queued, those pinned to no alive runner hear why at once, not
        at the next lease pass (at most one look a tick)."""
        while True:
            await self._pins_due.wait()
            self._pins_due.clear()
            try:
                await self.wait_for_runners()
            except Exception as exc:  # the lease pass says it again, and reports outages
                log_event("pinned_check_failed", level="debug", error=repr(exc))
            await asyncio.sleep(TICK_SECONDS)

    async def renew_leases(self) -> None:
        """Extend this runner's leases; stop the attempts someone asked to cancel; kill
        those whose fence was refused (recovered elsewhere: lost)."""
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
            self._lose(attempt)

    def _lose(self, attempt: Attempt) -> None:
        """The attempt's fence was refused: its writer takes nothing more, it stops."""
        if attempt.writer is not None:
            self.store.lose(attempt.writer)  # calls attempt.lose
        else:
            attempt.lose()

    async def recover(self) -> None:
        """Re-queue (or fail) commands whose runner died: lease expired, or on this host
        a runner process that no longer exists. Their leftover processes here are killed."""
        recovery = Recovery(self.settings, self.runner_id, self.host, utcnow())
        orphans = await self.gateway.recover_orphans(self.runner_id, recovery.recover)
        for command_id, status in orphans:
            self.broker.publish_status(command_id, status)
        if orphans:
            self._wake.set()


def runner_sandbox(settings: Settings) -> Sandbox:
    """The protection this host gives commands (bwrap is probed once per process)."""
    return choose_sandbox(settings, RUNNER_CODE)
