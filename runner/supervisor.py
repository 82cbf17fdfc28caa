"""The supervisor: claims queued commands, runs each as a process group, streams its lines,
enforces timeouts, cancels, retries with backoff, renews leases and recovers dead runners.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import shlex
import socket
import sqlite3
import time
import uuid
from collections.abc import Generator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO, Any

from sqlalchemy import JSON, Connection, or_, select, update
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from runner import policy
from runner.compose import CompositionError
from runner.gate import FAIL, FAIL_LINE, SPEND, STATEMENTS, Gate, Read, gate_reads, spend_rows
from runner.lines import LineSplitter
from runner.logwriter import LogStore, LogWriter, retryable_database_error
from runner.process import (
    RUN_MARKER,
    SIDECAR_MARKER,
    Child,
    become_subreaper,
    kill_adopted_escapees,
    kill_leftovers,
    leader_exit,
    pipe_chunks,
    reap_orphans,
    run_marker,
    stop_group,
    sweep_run,
    use_pidfd_child_watcher,
)
from runner.proxy_checks import ProxyCheckSchedule
from runner.redaction import KnownSecrets
from runner.renderpool import RenderPool
from runner.sandbox import NONE, RunAs, Sandbox, check_reachable, choose_sandbox
from runner.schedules import ProbeSchedule
from server.broker import CANCEL_TOPIC, QUEUE_TOPIC, SECRETS_TOPIC, Broker
from server.commands import (
    PROXY_URL_ENV,
    browser_settings,
    choose_tokens,
    command_context,
    own_tokens,
)
from server.db import sqlite_timestamp
from server.events import log_event
from server.known_secrets import process_secrets
from server.metrics import Metrics
from server.models import (
    Command,
    CommandService,
    CommandStatus,
    LogStream,
    Profile,
    Proxy,
    Service,
    utcnow,
)
from server.profiles import user_data_dir
from server.proxies import proxy_chain
from server.proxy_health import FlaggedProxy, held_proxies
from server.routing import run_routing
from server.secretbox import SecretBox
from server.settings import Settings
from server.storage import prepare_workspace, profile_dir_problem
from xray.binary import XrayBinary, XrayBinaryError, find_binary
from xray.config import Hop
from xray.probe import url_target
from xray.routing import Routing
from xray.sidecar import SidecarError, SidecarProcess

RUNNER_BIN = Path(__file__).resolve().parent / "bin"
RUNNER_JS = Path(__file__).resolve().parent / "js"
# What a sandboxed command may read of Corral's own code: its tools and the Playwright host
# (node_modules may be a symlink to elsewhere: its real place is readable too).
RUNNER_CODE = (RUNNER_BIN, RUNNER_JS, RUNNER_JS / "node_modules")
WORKDIR_MODE = 0o700
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
READ_CHUNK = 64 * 1024
TICK_SECONDS = 0.5
WORKDIRS_REMEMBERED = 10_000
PIPES_GRACE_SECONDS = 5.0
GATE_SLACK_SECONDS = 0.05  # a claim at a gate's opening comes just after it, not before
UNIQUE_VIOLATION = "23505"  # SQLSTATE
# Runner ids of the supervisors alive in this process (several can share one process).
LIVE_RUNNERS: set[str] = set()


class StopReason:
    CANCEL = "cancel"
    SHUTDOWN = "shutdown"


@dataclass
class Attempt:
    """One running attempt, as the supervisor tracks it."""

    command_id: int
    number: int
    max_attempts: int = 1
    backoff_seconds: float = 5.0
    uncounted: int = 0  # earlier attempts not held against max_attempts
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    reason: str | None = None
    task: asyncio.Task[None] | None = None
    finishing: bool = False  # its final state is on its way to the database: slot is free

    def request_stop(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self.stop.set()


@dataclass(slots=True)
class ClaimedCommand:
    """What running a command takes from its row (read by the claim)."""

    id: int
    source: str
    params: dict[str, Any]
    env: dict[str, Any]
    profile_id: int | None
    profile_name: str | None
    proxy_id: int | None
    proxy_name: str | None
    attempts: int
    max_attempts: int
    timeout_seconds: int | None
    backoff_seconds: float
    last_seq: int
    uncounted_attempts: int


@dataclass
class Claimed:
    """A command this runner just claimed, as the claim read it."""

    command: ClaimedCommand
    queued_since: Any
    has_services: bool


@dataclass(slots=True)
class ClaimResult:
    """What a claim did: the commands it started, those it marked waiting (or failed at
    the gate), the next runnable ones, and when the earliest closed gate opens."""

    claimed: list[Claimed]
    waiting: list[int] = field(default_factory=list)
    upcoming: list[int] = field(default_factory=list)
    failed: list[int] = field(default_factory=list)
    wake_at: datetime | None = None


class ClaimJob:
    """A claim for the log store: it runs in the store's transaction, after its writes."""

    def __init__(self, supervisor: Supervisor, free: int) -> None:
        self.supervisor = supervisor
        self.free = free  # slots it is for; raised by slots that free up before it runs
        self.claimed_for: int | None = None  # the slots it claimed for, once it ran

    def __call__(self, connection: Connection) -> ClaimResult:
        self.claimed_for = self.free
        return self.supervisor.claim_on_sqlite(self.claimed_for, connection)

    async def on_driver(self, driver: Any) -> ClaimResult:
        self.claimed_for = self.free
        return await self.supervisor.claim_on_driver(self.claimed_for, driver)


@dataclass
class _Choice:
    chosen: dict[int, Any]  # command id -> queued since
    # (status, reason, not before, id) of the commands whose state or reason changes
    waiting: list[tuple[str, str, datetime | None, int]]
    upcoming: list[int]
    failed: list[tuple[int, str]] = field(default_factory=list)  # failed at the gate
    gate: Gate | None = None

    def result(self, rows: Any) -> ClaimResult:
        """The claimed commands, in the order chosen, from the claim's returned rows."""
        by_id = {row[0]: row for row in rows}
        claimed = []
        for command_id, queued_since in self.chosen.items():
            returned = by_id.get(command_id)
            if returned is not None:
                values: tuple[Any, ...] = tuple(returned)
                claimed.append(
                    Claimed(ClaimedCommand(*values[:-1]), queued_since, bool(values[-1]))
                )
        return ClaimResult(
            claimed,
            [item[-1] for item in self.waiting if item[0] == CommandStatus.WAITING.value],
            self.upcoming,
            [command_id for command_id, _ in self.failed],
            None if self.gate is None else self.gate.opens_at,
        )

    @property
    def blocked(self) -> int:
        """Candidates the gate or a busy profile held back (the claim may look further)."""
        return len(self.waiting) + len(self.failed)


@dataclass(frozen=True, slots=True)
class Slots:
    """The runner's slots as a claim sees them, for the reason of those left in line."""

    free: int
    limit: int
    runner: str


def _choose(
    candidates: Any,
    busy: dict[int, int],
    slots: Slots,
    gate: Gate | None,
    held: dict[int, str] | None = None,
) -> _Choice:
    """Which candidates to claim (priority then FIFO, one per profile, none of a busy
    profile, none through a held proxy, none the rate-limit gate holds), which wait (and
    why, written only when it changes), which come next."""
    choice = _Choice({}, [], [], gate=gate)
    for row in candidates:
        command_id, profile_id, profile_name, status, wait_reason, next_at, created_at = row[:7]
        reason = _held_reason(row[9], held)
        if reason is None and profile_id is not None and profile_id in busy:
            reason = f"profile {profile_name!r} is busy with command {busy[profile_id]}"
        if reason is not None:
            _wait(choice, command_id, status, wait_reason, reason)
            continue
        verdict = gate.verdict(command_id) if gate is not None and row[8] else None
        if verdict is not None:
            if verdict.fail:
                choice.failed.append((command_id, verdict.reason))
            else:
                _wait(choice, command_id, status, wait_reason, verdict.reason, verdict.until)
            continue
        if len(choice.chosen) >= slots.free:
            choice.upcoming.append(command_id)
            running = slots.limit - slots.free + len(choice.chosen)
            where = f" on runner {slots.runner!r}" if row[7] else ""
            reason = f"waiting for a free slot{where} ({running} of {slots.limit} running)"
            if wait_reason != reason or status != CommandStatus.QUEUED.value:
                choice.waiting.append((CommandStatus.QUEUED.value, reason, None, command_id))
            continue
        if profile_id is not None:
            busy[profile_id] = command_id
        if gate is not None:
            gate.spend(command_id)
        choice.chosen[command_id] = next_at or created_at
    return choice


# How an attempt ended, by the status its outcome carries (QUEUED: a runner shutdown).
_ENDINGS = {
    CommandStatus.SUCCEEDED: policy.Ending.SUCCEEDED,
    CommandStatus.FAILED: policy.Ending.FAILED,
    CommandStatus.TIMED_OUT: policy.Ending.TIMED_OUT,
    CommandStatus.CANCELLED: policy.Ending.CANCELLED,
    CommandStatus.QUEUED: policy.Ending.SHUTDOWN,
}


def _wait(
    choice: _Choice,
    command_id: int,
    status: str,
    old_reason: str | None,
    reason: str,
    until: datetime | None = None,
) -> None:
    # A wait that ends at a known time leaves the candidates until then (next_attempt_at),
    # so that it neither fills the claim's window nor is judged again every tick.
    if until is not None or status != CommandStatus.WAITING.value or old_reason != reason:
        choice.waiting.append((CommandStatus.WAITING.value, reason, until, command_id))


def _held_reason(proxy_id: int | None, held: dict[int, str] | None) -> str | None:
    """Why a command through this proxy is held (CORRAL_HOLD_ON_FLAGGED_PROXY), or None."""
    if not held or proxy_id is None:
        return None
    return held.get(proxy_id)


@dataclass
class Outcome:
    status: CommandStatus
    exit_code: int | None = None
    error: str | None = None
    retryable: bool = True


@dataclass
class Loaded:
    """What an attempt needs from the database, secrets decrypted."""

    command: ClaimedCommand
    profile: Profile | None
    proxy: Proxy | None
    services: list[Service]
    tokens: dict[str, str | None]
    chain: list[Hop]
    secrets: list[str]
    service_ids: dict[str, int]
    routing: Routing | None = None
    own_token_services: frozenset[int] = frozenset()  # used with the profile's own token


@dataclass
class Prepared:
    argv: list[str]
    env: dict[str, str]
    writable: list[str] = field(default_factory=list)  # besides its working directory


def child_path() -> str:
    """PATH for children: Corral's own tools first (e.g. corral-playwright), then the system."""
    return f"{RUNNER_BIN}:{SYSTEM_PATH}"


def backoff_delay(base: float, attempt: int, ceiling: float) -> float:
    """Exponential backoff with full jitter: uniform in [base, base * 2**(attempt-1)]."""
    return policy.backoff_delay(base, attempt, ceiling, _jitter())


def _attempt_of(attempt: Attempt) -> str:
    """`2 of 3`, or with attempts that were not counted `3 of 4 (1 earlier not counted)`."""
    of = f"{attempt.number} of {attempt.max_attempts + attempt.uncounted}"
    return of + (f" ({attempt.uncounted} earlier not counted)" if attempt.uncounted else "")


def _jitter() -> float:
    return random.random()  # noqa: S311 - jitter, not cryptography


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
        self.host = socket.gethostname()
        self.runner_id = f"{self.host}:{os.getpid()}:{uuid.uuid4().hex[:8]}"
        self.attempts: dict[int, Attempt] = {}
        self._wake = asyncio.Event()
        self._claims: set[asyncio.Task[None]] = set()  # claims out, waiting for the store
        self._claiming = 0  # slots those claims are for
        self._open_claim: ClaimJob | None = None  # the claim that has not run yet
        self._queue_changed = True  # commands were queued since the last claim
        self._gate_timer: asyncio.TimerHandle | None = None  # when a closed gate opens
        self._stopping = False
        self._task: asyncio.Task[None] | None = None
        self._is_postgres = False
        self._xray: XrayBinary | None = None
        engine: AsyncEngine = sessionmaker.kw["bind"]
        self.store = LogStore(engine, broker, metrics, self.runner_id)
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
        async with self.sessionmaker() as session:
            self._is_postgres = session.get_bind().dialect.name == "postgresql"
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
        await self.recover()
        await self._refresh_secrets()  # the first claim does not pay for decrypting them all
        self._task = asyncio.create_task(self._main(), name=f"supervisor-{self.runner_id}")
        if self.settings.schedules:
            self.proxy_checks.start()
            await self.schedule.start()
        log_event("runner_started", runner=self.runner_id, name=self.name)
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
        job = self._open_claim = ClaimJob(self, free)
        task = asyncio.create_task(self._start_claimed(job, self.store.submit(job)))
        self._claims.add(task)
        task.add_done_callback(self._claims.discard)

    async def _start_claimed(self, job: ClaimJob, result: asyncio.Future[ClaimResult]) -> None:
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
            )
            if self._stopping:  # claimed as the runner stops: it goes back to the queue
                attempt.request_stop(StopReason.SHUTDOWN)
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
            _make_workdirs(self._commands_dir, missing, self.sandbox.run_as)
        ahead = [command_id for command_id in upcoming if command_id not in self._workdirs]
        if not ahead or self._files is None:
            return
        self._workdirs.update(ahead)
        made = asyncio.get_running_loop().run_in_executor(
            self._files, _make_workdirs, self._commands_dir, ahead, self.sandbox.run_as
        )
        made.add_done_callback(self._workdirs_made)

    def _workdirs_made(self, made: asyncio.Future[None]) -> None:
        if made.cancelled() or made.exception() is not None:
            self._workdirs.clear()  # not sure which exist: make them when claimed

    def _claim_params(self, now: Any) -> dict[str, Any]:
        return {
            "runner": self.runner_id,
            "host": self.host,
            "lease": now + timedelta(seconds=self.settings.lease_seconds),
            "now": now,
        }

    def _slots(self, free: int) -> Slots:
        return Slots(free, self.settings.max_concurrency, self.name)

    def claim_on_sqlite(self, free: int, connection: Connection) -> ClaimResult:
        """Claim up to `free` commands: priority then FIFO, due ones only, one running
        command per profile, none the rate-limit gate holds; also says which runnable ones
        come next, and why the others wait. SQLite, in the log store's thread, through the
        sqlite3 connection itself (SQLAlchemy's share of a claim was most of a short
        command's flush)."""
        raw: Any = connection.connection.driver_connection
        now = utcnow()
        limit = free * 2 + 8
        for _ in range(CLAIM_ROUNDS):
            candidates = raw.execute(
                _SQLITE_CANDIDATES, (sqlite_timestamp(now), self.name, limit)
            ).fetchall()
            if not candidates:
                return ClaimResult([])
            busy: dict[int, int] = {}
            if any(row[1] is not None for row in candidates):
                busy = dict(raw.execute(_BUSY).fetchall())
            held: dict[int, str] = {}
            if self.settings.hold_on_flagged_proxy and any(
                row[9] is not None for row in candidates
            ):
                flagged = raw.execute(_SQLITE_FLAGGED, (self.settings.proxy_flag_after,)).fetchall()
                if flagged:
                    held = held_proxies(
                        (FlaggedProxy(*row) for row in flagged), raw.execute(_VIA_LINKS)
                    )
            gate = None
            if any(row[8] for row in candidates):
                gate = _drive_sqlite(raw, gate_reads(_gated(candidates), now, lock=False))
            choice = _choose(candidates, busy, self._slots(free), gate, held)
            if not _look_further(choice, candidates, free, limit):
                break
            limit *= 4
        if choice.waiting:
            raw.executemany(
                _SQLITE_MARK,
                [
                    (status, reason, until and sqlite_timestamp(until), command_id)
                    for status, reason, until, command_id in choice.waiting
                ],
            )
        for command_id, error in choice.failed:
            _fail_on_sqlite(raw, command_id, error, now)
        if not choice.chosen:
            return choice.result([])
        choice.chosen = {key: _sqlite_datetime(since) for key, since in choice.chosen.items()}
        params = self._claim_params(now)
        try:
            rows = raw.execute(
                _SQLITE_CLAIM,
                (
                    params["runner"],
                    params["host"],
                    sqlite_timestamp(params["lease"]),
                    sqlite_timestamp(now),
                    json.dumps(list(choice.chosen)),
                ),
            ).fetchall()
        except sqlite3.IntegrityError as exc:  # say it as SQLAlchemy does
            raise IntegrityError("claim", None, exc) from exc
        if choice.gate is not None:
            spends = spend_rows(choice.gate, [row[0] for row in rows], now)
            raw.executemany(_sqlite(SPEND), [_sqlite_params(row) for row in spends])
        return choice.result([_decode_json_columns(row) for row in rows])

    async def claim_on_driver(self, free: int, driver: Any) -> ClaimResult:
        """The same claim through the PostgreSQL driver itself (no SQLAlchemy on the way:
        on a runner of short commands, its share of the claim was the biggest). The gate's
        decisions on a service are serialized across runners by an advisory lock."""
        now = utcnow()
        limit = free * 2 + 8
        for _ in range(CLAIM_ROUNDS):
            candidates = await driver.fetch(_PG_CANDIDATES, now, self.name, limit)
            if not candidates:
                return ClaimResult([])
            busy: dict[int, int] = {}
            if any(row[1] is not None for row in candidates):
                busy = {row[0]: row[1] for row in await driver.fetch(_BUSY)}
            held: dict[int, str] = {}
            if self.settings.hold_on_flagged_proxy and any(
                row[9] is not None for row in candidates
            ):
                flagged = await driver.fetch(_PG_FLAGGED, self.settings.proxy_flag_after)
                if flagged:
                    links = [(row[0], row[1]) for row in await driver.fetch(_VIA_LINKS)]
                    held = held_proxies((FlaggedProxy(*row) for row in flagged), links)
            gate = None
            if any(row[8] for row in candidates):
                gate = await _drive_pg(driver, gate_reads(_gated(candidates), now, lock=True))
            choice = _choose(candidates, busy, self._slots(free), gate, held)
            if not _look_further(choice, candidates, free, limit):
                break
            limit *= 4
        if choice.waiting:
            await driver.executemany(_PG_MARK, choice.waiting)
        for command_id, error in choice.failed:
            await _fail_on_pg(driver, command_id, error, now)
        if not choice.chosen:
            return choice.result([])
        params = self._claim_params(now)
        try:
            rows = await driver.fetch(
                _PG_CLAIM,
                list(choice.chosen),
                params["runner"],
                params["host"],
                params["lease"],
                params["now"],
            )
        except Exception as exc:
            if getattr(exc, "sqlstate", None) == UNIQUE_VIOLATION:  # say it as SQLAlchemy does
                raise IntegrityError("claim", None, exc) from exc
            raise
        if choice.gate is not None:
            spends = spend_rows(choice.gate, [row[0] for row in rows], now)
            if spends:
                await driver.executemany(_pg(SPEND), spends)
        return choice.result(rows)

    # -- running one attempt -----------------------------------------------------------

    async def _run_attempt(self, attempt: Attempt, claim: Claimed) -> None:
        started = time.monotonic()
        if self.metrics is not None:
            wait = (utcnow() - claim.queued_since).total_seconds()
            self.metrics.queue_wait.observe(max(wait, 0))
        command = claim.command
        # Every known secret masked from the first line (an error while loading included);
        # `secrets.attach` adds the command's own once they are loaded.
        writer = self.store.writer(
            command.id,
            attempt.number,
            command.last_seq,
            self.secrets.redactor,
            profile_id=command.profile_id,
        )
        outcome = Outcome(CommandStatus.FAILED, error="the runner failed unexpectedly")
        try:
            if attempt.reason == StopReason.SHUTDOWN:  # claimed as the runner stopped
                outcome = Outcome(CommandStatus.QUEUED, error="interrupted by runner shutdown")
                return
            loaded = await self._load(claim)
            await self._refresh_secrets()
            self.secrets.attach(writer, loaded.secrets)
            writer.service_ids = loaded.service_ids
            writer.own_token_services = loaded.own_token_services
            outcome = await self._run_loaded(attempt, loaded, writer)
        except CompositionError as exc:
            outcome = Outcome(CommandStatus.FAILED, error=str(exc), retryable=False)
            await writer.add(LogStream.SYSTEM, f"cannot compose the command: {exc}")
        except SidecarError as exc:
            outcome = Outcome(CommandStatus.FAILED, error=str(exc))
            await writer.add(LogStream.SYSTEM, f"not started, nothing went out: {exc}")
        except Exception as exc:
            error = writer.redactor(repr(exc))  # the log gets no secret a message may hold
            log_event("attempt_crashed", level="error", command=attempt.command_id, error=error)
            outcome = Outcome(CommandStatus.FAILED, error=f"runner error: {exc}")
        finally:
            await asyncio.shield(self._finish(attempt, outcome, writer, time.monotonic() - started))

    async def _run_loaded(self, attempt: Attempt, loaded: Loaded, writer: LogWriter) -> Outcome:
        """Start the proxy sidecar (when the command has a proxy), then the child."""
        async with contextlib.AsyncExitStack() as stack:
            proxy_url = None
            if loaded.chain:
                sidecar = await stack.enter_async_context(
                    self._sidecar(loaded.chain, writer, loaded.command.id, loaded.routing)
                )
                proxy_url = sidecar.url
                await writer.add(
                    LogStream.SYSTEM,
                    f"proxy sidecar for {loaded.chain[0].name!r} listening on {sidecar.url} "
                    f"(started in {1000 * (sidecar.started_in or 0):.0f} ms)",
                )
            prepared = await self._render(loaded, proxy_url)
            if loaded.profile is not None:
                path = user_data_dir(loaded.profile, self.settings)
                problem = loaded.profile.user_data_dir and profile_dir_problem(path, self.settings)
                if problem:  # saved before the rule, or by another Corral's settings
                    await writer.add(LogStream.SYSTEM, f"cannot run: {problem}")
                    return Outcome(CommandStatus.FAILED, error=problem, retryable=False)
                try:
                    prepared.writable.append(_profile_dir(path, self.sandbox.run_as))
                except OSError as exc:
                    message = f"cannot prepare the profile dir {path}: {exc.strerror or exc}"
                    await writer.add(LogStream.SYSTEM, message)
                    return Outcome(CommandStatus.FAILED, error=message, retryable=False)
            return await self._execute(attempt, loaded.command, prepared, writer)
        raise AssertionError("unreachable")  # pragma: no cover - the stack never swallows

    def _sidecar(
        self, chain: list[Hop], writer: LogWriter, command_id: int, routing: Routing | None
    ) -> SidecarProcess:
        async def on_line(line: str) -> None:
            await writer.add(LogStream.SYSTEM, line)

        if self._xray is None:
            try:
                self._xray = find_binary(self.settings.xray_bin)
            except XrayBinaryError as exc:
                raise SidecarError(str(exc)) from exc
        return SidecarProcess(
            self._xray,
            chain,
            on_line=on_line,
            start_timeout=self.settings.sidecar_start_timeout,
            grace=min(self.settings.kill_grace_seconds, 2.0),
            # The marker lets a restarted runner find and stop it after a kill -9.
            env={"PATH": SYSTEM_PATH, SIDECAR_MARKER: run_marker(self.runner_id, command_id)},
            routing=routing,
            assets_dir=self.settings.xray_assets_dir,
            log_level=self.settings.sidecar_log_level,
            trace=self.settings.routing_trace,
            # A harmless CONNECT for the pre-flight probe of the first hop's credentials.
            probe_target=url_target(self.settings.proxy_check_url),
            probe_timeout=self.settings.proxy_probe_timeout,
        )

    async def _load(self, claim: Claimed) -> Loaded:
        """The command's profile, proxy chain and services' tokens (a plain command with
        none of them needs no database at all)."""
        command = claim.command
        if (
            command.profile_id is None
            and command.proxy_id is None
            and command.proxy_name is None
            and not claim.has_services
        ):
            return Loaded(command, None, None, [], {}, [], [], {})
        async with self.sessionmaker() as session:
            profile = await session.get(Profile, command.profile_id) if command.profile_id else None
            proxy = await session.get(Proxy, command.proxy_id) if command.proxy_id else None
            services = list(
                await session.scalars(
                    select(Service)
                    .join(CommandService, CommandService.service_id == Service.id)
                    .where(CommandService.command_id == command.id)
                    .order_by(Service.name)
                )
            )
            own = await own_tokens(session, command.profile_id, services)
            tokens = choose_tokens(self.box, services, own)
            chain = [] if proxy is None else await proxy_chain(session, self.box, proxy)
            routing = (
                None if proxy is None else await run_routing(session, self.box, proxy.routing_rules)
            )
        if command.proxy_name is not None and proxy is None:
            raise CompositionError(
                f"its proxy {command.proxy_name!r} was deleted; refusing to run without it"
            )
        missing = [name for name, token in tokens.items() if token is None]
        if missing:
            raise CompositionError(f"no token any more for {', '.join(missing)}")
        secrets = [token for token in tokens.values() if token]
        hops = [
            *chain,
            *(hop for via in (routing.via_chains if routing else {}).values() for hop in via),
        ]
        secrets += [secret for hop in hops for secret in (hop.password, hop.username) if secret]
        return Loaded(
            command=command,
            profile=profile,
            proxy=proxy,
            services=services,
            tokens=tokens,
            chain=chain,
            routing=routing,
            secrets=secrets,
            service_ids={s.name.lower(): s.id for s in services}
            | {s.kind.lower(): s.id for s in services},
            own_token_services=frozenset(own),
        )

    async def _render(self, loaded: Loaded, proxy_url: str | None) -> Prepared:
        """Render the argv (with the sidecar's URL) and build the child's environment."""
        command = loaded.command
        context = command_context(
            self.settings, loaded.profile, loaded.proxy, loaded.services, command.params, proxy_url
        )
        argv = await self.render_pool.render(command.source, context)
        env = self._child_env(command, loaded.tokens)
        if proxy_url is not None:
            env[PROXY_URL_ENV] = proxy_url
        if loaded.profile is not None:
            env["CORRAL_BROWSER_SETTINGS"] = json.dumps(browser_settings(loaded.profile))
        return Prepared(argv=argv, env=env)

    def _child_env(self, command: ClaimedCommand, tokens: dict[str, str | None]) -> dict[str, str]:
        """A minimal environment: no Corral settings or keys, only what the child needs."""
        home = os.environ.get("HOME", "/tmp")  # noqa: S108 - a fallback HOME only
        if self.sandbox.protected:  # the server's HOME is not the command's to see
            home = f"{self._commands_dir}/{command.id}"
        env = {
            "PATH": child_path(),
            "HOME": home,
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "CORRAL_COMMAND_ID": str(command.id),
            RUN_MARKER: run_marker(self.runner_id, command.id),
            "CORRAL_ATTEMPT": str(command.attempts),
            "CORRAL_CHROMIUM_PATH": self.settings.chromium_path,
        }
        if self.settings.scripts_dir is not None:
            env["CORRAL_SCRIPTS_DIR"] = str(self.settings.scripts_dir.resolve())
        env.update({str(k): str(v) for k, v in command.env.items()})
        env.update({name: token for name, token in tokens.items() if token is not None})
        return env

    async def _execute(
        self, attempt: Attempt, command: ClaimedCommand, prepared: Prepared, writer: LogWriter
    ) -> Outcome:
        workdir = f"{self._commands_dir}/{command.id}"
        try:
            self.sandbox.check_program(prepared.argv[0], prepared.env["PATH"], workdir)
            process = Child.start(
                self.sandbox.wrap(prepared.argv, workdir, prepared.writable),
                prepared.env,
                workdir,
                **self.sandbox.popen_options(),
            )
        except OSError as exc:
            message = (
                f"attempt {attempt.number}: cannot start {prepared.argv[0]!r}: "
                f"{exc.strerror or exc}"
            )
            await writer.add(LogStream.SYSTEM, message)
            return Outcome(CommandStatus.FAILED, error=message, retryable=False)
        pgid = process.pid
        # The pumps run from the loop's next round: the line below is queued before theirs.
        pumps = [
            asyncio.create_task(self._pump(process.stdout, LogStream.STDOUT, writer)),
            asyncio.create_task(self._pump(process.stderr, LogStream.STDERR, writer)),
        ]
        try:
            await writer.add(
                LogStream.SYSTEM,
                f"attempt {_attempt_of(attempt)}: {shlex.join(prepared.argv)}",
                command_values={"pgid": pgid, "argv": prepared.argv},
            )
            log_event("started", command=command.id, attempt=attempt.number, pid=process.pid)
            return await self._wait(attempt, command, process, writer)
        finally:
            await asyncio.shield(self._reap(command.id, pgid, process, pumps))

    async def _reap(
        self,
        command_id: int,
        pgid: int,
        process: Child,
        pumps: list[asyncio.Task[None]],
    ) -> None:
        try:
            gone = await stop_group(pgid, process, self.settings.kill_grace_seconds)
        finally:
            process.release()
        escaped = 0
        # A sandbox's PID namespace died with the group: no process of the run is left to
        # look for by its marker (a look at every younger PID's environment: 1.4 ms p50,
        # 14 ms p90 of each command's end on a busy host).
        if not (gone and self.sandbox.contains_processes):
            escaped = await sweep_run(run_marker(self.runner_id, command_id), pgid)
        escaped += await kill_adopted_escapees(process.started_at)
        if escaped:
            log_event("killed_escaped", command=command_id, processes=escaped)
        # The pipes close once the last process holding them is gone; one that hid even
        # from the sweep (it cleared its environment) is not waited for.
        pending = {pump for pump in pumps if not pump.done()}  # (usually read to the end)
        if pending:
            _, pending = await asyncio.wait(pending, timeout=PIPES_GRACE_SECONDS)
        for pump in pending:
            pump.cancel()
        if pending:
            log_event("pipes_left_open", level="warning", command=command_id)

    async def _wait(
        self,
        attempt: Attempt,
        command: ClaimedCommand,
        process: Child,
        writer: LogWriter,
    ) -> Outcome:
        exited = asyncio.create_task(leader_exit(process))
        stop = asyncio.create_task(attempt.stop.wait())
        timeout = command.timeout_seconds
        try:
            done, _ = await asyncio.wait(
                {exited, stop}, timeout=timeout, return_when="FIRST_COMPLETED"
            )
        finally:
            stop.cancel()
        if exited in done:
            code = process.returncode
            assert code is not None
            if code == 0:
                return Outcome(CommandStatus.SUCCEEDED, exit_code=0)
            return Outcome(CommandStatus.FAILED, exit_code=code, error=_exit_message(code))
        exited.cancel()
        if attempt.reason == StopReason.CANCEL:
            await writer.add(LogStream.SYSTEM, "cancelled: stopping the process group")
            return Outcome(CommandStatus.CANCELLED, error="cancelled", retryable=False)
        if attempt.reason == StopReason.SHUTDOWN:
            await writer.add(
                LogStream.SYSTEM, "the runner is shutting down: stopping the process group"
            )
            return Outcome(CommandStatus.QUEUED, error="interrupted by runner shutdown")
        await writer.add(
            LogStream.SYSTEM, f"timed out after {timeout}s: stopping the process group"
        )
        return Outcome(CommandStatus.TIMED_OUT, error=f"timed out after {timeout}s")

    async def _pump(self, pipe: IO[bytes], kind: LogStream, writer: LogWriter) -> None:
        splitter = LineSplitter(self.settings.max_line_bytes)
        try:
            async with contextlib.aclosing(pipe_chunks(pipe, READ_CHUNK)) as chunks:
                async for chunk in chunks:
                    await writer.add_lines(kind, list(splitter.feed(chunk)), len(chunk))
        except OSError as exc:  # the pipe failed (EIO ...): keep what was read
            log_event(
                "pipe_failed",
                level="warning",
                command=writer.command_id,
                stream=kind.value,
                error=repr(exc),
            )
        await writer.add_lines(kind, list(splitter.close()))

    # -- finishing ---------------------------------------------------------------------

    async def _finish(
        self, attempt: Attempt, outcome: Outcome, writer: LogWriter, elapsed: float
    ) -> None:
        try:
            if outcome.error is not None:  # it may quote a child's or a sidecar's words
                outcome.error = writer.redactor(outcome.error)
            status, values, note = self._final_values(attempt, outcome)
            # The note and the new state go in one transaction, with the claim that takes
            # this slot: the slot counts as free from now on.
            attempt.finishing = True
            self.claim_free_slots()
            await writer.add(LogStream.SYSTEM, note, command_values=values)
            await writer.close()
            self.broker.publish_status(attempt.command_id, status.value)
            log_event(
                "finished" if status.is_final else "requeued",
                command=attempt.command_id,
                attempt=attempt.number,
                status=status.value,
                exit_code=outcome.exit_code,
                seconds=round(elapsed, 3),
            )
            if self.metrics is not None:
                self.metrics.run_time.observe(elapsed)
                self.metrics.attempts.labels(outcome.status.value.lower()).inc()
        except Exception as exc:
            log_event("finish_failed", level="error", command=attempt.command_id, error=repr(exc))
        finally:
            self.attempts.pop(attempt.command_id, None)
            if self.metrics is not None:
                self.metrics.running.set(len(self.attempts))
            self._wake.set()

    def _final_values(
        self, attempt: Attempt, outcome: Outcome
    ) -> tuple[CommandStatus, dict[str, Any], str]:
        """The command's next state (runner/policy.decide), as the values to store."""
        decision = policy.decide(
            _ENDINGS[outcome.status],
            policy.AttemptState(attempt.number, attempt.uncounted),
            self._limits(attempt.max_attempts, attempt.backoff_seconds),
            retryable=outcome.retryable,
            error=outcome.error,
            jitter=_jitter(),
        )
        values: dict[str, Any] = {
            "runner_id": None,
            "lease_expires_at": None,
            "pgid": None,
            "status": decision.status.value,
            "error": outcome.error,
        }
        if not decision.counted:
            values["uncounted_attempts"] = attempt.uncounted + 1
        if decision.final:
            values |= {
                "exit_code": outcome.exit_code,
                "finished_at": utcnow(),
                "wait_reason": None,
                "cancel_requested": False,
            }
        else:
            values["wait_reason"] = decision.reason
        if decision.delay:
            values |= {
                "exit_code": outcome.exit_code,
                "next_attempt_at": utcnow() + timedelta(seconds=decision.delay),
            }
        return decision.status, values, decision.note

    def _limits(self, max_attempts: int, backoff_seconds: float) -> policy.Limits:
        return policy.Limits(
            max_attempts=max_attempts,
            backoff_seconds=backoff_seconds,
            backoff_ceiling=self.settings.backoff_max_seconds,
            max_runner_losses=self.settings.max_runner_losses,
        )

    # -- leases and recovery -----------------------------------------------------------

    async def _lease_loop(self) -> None:
        interval = max(self.settings.lease_seconds / 3, 0.2)
        while True:
            await asyncio.sleep(interval)
            reap_orphans()
            try:
                await self.renew_leases()
                await self.recover()
            except Exception as exc:
                # A database that is down is the log store's to report (once an outage).
                level = "debug" if retryable_database_error(exc) else "error"
                log_event("lease_pass_failed", level=level, error=repr(exc))

    async def renew_leases(self) -> None:
        """Extend this runner's leases; stop the attempts someone asked to cancel."""
        if not self.attempts:
            return
        expires = utcnow() + timedelta(seconds=self.settings.lease_seconds)
        async with self.sessionmaker() as session, session.begin():
            await session.execute(
                update(Command)
                .where(
                    Command.runner_id == self.runner_id,
                    Command.status == CommandStatus.RUNNING.value,
                )
                .values(lease_expires_at=expires)
            )
            cancelled = await session.scalars(
                select(Command.id).where(
                    Command.runner_id == self.runner_id, Command.cancel_requested.is_(True)
                )
            )
            for command_id in cancelled:
                if command_id in self.attempts:
                    self.attempts[command_id].request_stop(StopReason.CANCEL)

    async def recover(self) -> None:
        """Re-queue (or fail) commands whose runner died: lease expired, or on this host
        a runner process that no longer exists. Their leftover processes here are killed."""
        now = utcnow()
        async with self.sessionmaker() as session, session.begin():
            stmt = select(Command).where(
                Command.status == CommandStatus.RUNNING.value,
                or_(Command.runner_id.is_(None), Command.runner_id != self.runner_id),
            )
            if self._is_postgres:
                stmt = stmt.with_for_update(skip_locked=True)
            orphans = [
                command
                for command in await session.scalars(stmt)
                if _lease_expired(command, now) or self._runner_gone(command)
            ]
            for command in orphans:
                await self._recover_one(session, command)
        for command in orphans:
            self.broker.publish_status(command.id, command.status)
        if orphans:
            self._wake.set()

    def _runner_gone(self, command: Command) -> bool:
        if command.runner_host != self.host or not command.runner_id:
            return False
        try:
            pid = int(command.runner_id.split(":")[1])
        except (IndexError, ValueError):
            return False
        if pid == os.getpid():
            return command.runner_id not in LIVE_RUNNERS  # this process: is that runner alive?
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            return False
        return False

    async def _recover_one(self, session: AsyncSession, command: Command) -> None:
        killed = 0
        if command.runner_host == self.host:
            killed = kill_leftovers(run_marker(command.runner_id or "", command.id))
        previous = command.runner_id
        note = f"runner {previous} stopped renewing its lease"
        if killed:
            note += f"; killed {killed} leftover process(es)"
        decision = policy.decide(
            policy.Ending.RUNNER_LOST,
            policy.AttemptState(
                command.attempts, command.uncounted_attempts, command.runner_losses
            ),
            self._limits(command.max_attempts, command.backoff_seconds),
        )
        command.status = decision.status.value
        command.runner_losses += 1
        if not decision.counted:
            command.uncounted_attempts += 1
        if decision.final:
            command.error = decision.reason
            command.finished_at = utcnow()
        else:
            command.wait_reason = decision.reason
        note += f"; {decision.note}"
        command.runner_id = None
        command.lease_expires_at = None
        command.pgid = None
        command.last_seq += 1
        session.add(
            _system_line(command.id, command.last_seq, command.attempts, note),
        )
        log_event("recovered", command=command.id, previous_runner=previous, status=command.status)


def runner_sandbox(settings: Settings) -> Sandbox:
    """The protection this host gives commands (bwrap is probed once per process)."""
    return choose_sandbox(settings, RUNNER_CODE)


def _make_workdirs(commands_dir: Path, command_ids: list[int], run_as: RunAs | None) -> None:
    """The working directory of each command: `<workspace>/commands/<id>` (0700, the
    run-as user's when there is one)."""
    for command_id in command_ids:
        path = f"{commands_dir}/{command_id}"
        try:
            os.mkdir(path, WORKDIR_MODE)
        except FileExistsError:
            pass
        except FileNotFoundError:
            os.makedirs(path, WORKDIR_MODE, exist_ok=True)
        if run_as is not None:
            os.chown(path, run_as.uid, run_as.gid)


def _profile_dir(path: str, run_as: RunAs | None) -> str:
    """The profile's user-data-dir, made (0700) if missing and the run-as user's (all of it,
    when an earlier run left files of another owner)."""
    os.makedirs(path, WORKDIR_MODE, exist_ok=True)
    if run_as is not None and os.stat(path).st_uid != run_as.uid:
        for root, dirs, files in os.walk(path):
            for name in (root, *(os.path.join(root, entry) for entry in dirs + files)):
                with contextlib.suppress(FileNotFoundError):
                    os.chown(name, run_as.uid, run_as.gid, follow_symlinks=False)
    return path


# The claim's statements, for each driver. `{}`: where the placeholders differ.
# Columns: what _choose reads, then the profile's runner affinity and whether the command
# has services (only then does the gate read anything).
_CANDIDATES = (
    "SELECT c.id, c.profile_id, c.profile_name, c.status, c.wait_reason,"
    " c.next_attempt_at, c.created_at, p.runner_affinity,"
    " EXISTS (SELECT 1 FROM command_services s WHERE s.command_id = c.id), c.proxy_id"
    " FROM commands c"
    " LEFT OUTER JOIN profiles p ON p.id = c.profile_id"
    " WHERE c.status IN ('QUEUED', 'WAITING')"
    " AND (c.next_attempt_at IS NULL OR c.next_attempt_at <= {now})"
    " AND (p.runner_affinity IS NULL OR p.runner_affinity = {runner})"
    " ORDER BY c.priority DESC, c.id LIMIT {limit}"
)
_PG_CANDIDATES = _CANDIDATES.format(now="$1", runner="$2", limit="$3") + (
    " FOR UPDATE OF c SKIP LOCKED"
)
_SQLITE_CANDIDATES = _CANDIDATES.format(now="?", runner="?", limit="?")
_BUSY = "SELECT profile_id, id FROM commands WHERE status = 'RUNNING' AND profile_id IS NOT NULL"
_MARK = "UPDATE commands SET status = ?, wait_reason = ?, next_attempt_at = ? WHERE id = ?"
# The hold policy's proxies: the flagged ones, and the via links of chains.
_FLAGGED = (
    "SELECT id, name, health_failures, health_error FROM proxies WHERE health_failures >= {n}"
)
_PG_FLAGGED = _FLAGGED.format(n="$1")
_SQLITE_FLAGGED = _FLAGGED.format(n="?")
_VIA_LINKS = "SELECT id, via_id FROM proxies WHERE via_id IS NOT NULL"
# It returns ClaimedCommand's fields, then whether the command has services.
_CLAIM = (
    "UPDATE commands SET status = 'RUNNING', attempts = attempts + 1, runner_id = {runner},"  # noqa: S608
    " runner_host = {host}, lease_expires_at = {lease}, started_at = {now}, wait_reason = NULL,"
    " next_attempt_at = NULL, pgid = NULL WHERE id {chosen} RETURNING "
    + ", ".join(ClaimedCommand.__slots__)
    + ", EXISTS (SELECT 1 FROM command_services s WHERE s.command_id = commands.id)"
)
_PG_CLAIM = _CLAIM.format(
    chosen="= ANY($1::integer[])", runner="$2", host="$3", lease="$4", now="$5"
)
_SQLITE_CLAIM = _CLAIM.format(
    runner="?", host="?", lease="?", now="?", chosen="IN (SELECT value FROM json_each(?))"
)
# Claim rounds: when busy profiles or closed gates fill the claim's window, it looks again
# in a window four times as large (so the commands behind them are not blocked).
CLAIM_ROUNDS = 3


def _pg(statement: str) -> str:
    """A statement with `?` placeholders (and `[ids]`, a list of ints) for asyncpg."""
    statement = statement.replace("[ids]", "= ANY(?::integer[])")
    parts = statement.split("?")
    return "".join(f"{part}${index}" for index, part in enumerate(parts[:-1], 1)) + parts[-1]


def _sqlite(statement: str) -> str:
    return statement.replace("[ids]", "IN (SELECT value FROM json_each(?))")


def _sqlite_params(params: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(
        sqlite_timestamp(value)
        if isinstance(value, datetime)
        else json.dumps(value)
        if isinstance(value, list)
        else value
        for value in params
    )


_PG_MARK = _pg(_MARK)
_SQLITE_MARK = _sqlite(_MARK)
_PG_GATE = {name: _pg(statement) for name, statement in STATEMENTS.items()}
_SQLITE_GATE = {name: _sqlite(statement) for name, statement in STATEMENTS.items()}


def _gated(candidates: Any) -> list[int]:
    return [row[0] for row in candidates if row[8]]


def _look_further(choice: _Choice, candidates: Any, free: int, limit: int) -> bool:
    """Whether the window was full of commands that cannot start, with slots left over."""
    return len(choice.chosen) < free and len(candidates) == limit and choice.blocked > 0


def _drive_sqlite(raw: Any, reads: Generator[Read, Any, Gate]) -> Gate:
    """Run the gate's reads on a sqlite3 connection."""
    try:
        name, params = next(reads)
        while True:
            rows = raw.execute(_SQLITE_GATE[name], _sqlite_params(params)).fetchall()
            name, params = reads.send(rows)
    except StopIteration as done:
        gate: Gate = done.value
        return gate


async def _drive_pg(driver: Any, reads: Generator[Read, Any, Gate]) -> Gate:
    """Run the gate's reads through asyncpg."""
    try:
        name, params = next(reads)
        while True:
            rows = await driver.fetch(_PG_GATE[name], *params)
            name, params = reads.send(rows)
    except StopIteration as done:
        gate: Gate = done.value
        return gate


def _fail_on_sqlite(raw: Any, command_id: int, error: str, now: datetime) -> None:
    """A command the gate fails (its token is invalid), with the reason in its log."""
    stamp = sqlite_timestamp(now)
    row = raw.execute(_sqlite(FAIL), (error, stamp, command_id)).fetchone()
    if row is not None:
        line = (command_id, row[1], row[2], stamp, f"not started: {error}")
        raw.execute(_sqlite(FAIL_LINE), line)


async def _fail_on_pg(driver: Any, command_id: int, error: str, now: datetime) -> None:
    row = await driver.fetchrow(_pg(FAIL), error, now, command_id)
    if row is not None:
        line = (command_id, row[1], row[2], now, f"not started: {error}")
        await driver.execute(_pg(FAIL_LINE), *line)


_JSON_FIELDS = [
    index
    for index, name in enumerate(ClaimedCommand.__slots__)
    if isinstance(Command.__table__.c[name].type, JSON)
]


def _decode_json_columns(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """A claimed row from sqlite3: its JSON columns (params, env) are still text."""
    values = list(row)
    for index in _JSON_FIELDS:
        if values[index] is not None:
            values[index] = json.loads(values[index])
    return tuple(values)


def _sqlite_datetime(value: str) -> datetime:
    """A timestamp as SQLite keeps it (naive UTC text), as the aware datetime it stands for."""
    return datetime.fromisoformat(value).replace(tzinfo=UTC)


def _lease_expired(command: Command, now: Any) -> bool:
    return command.lease_expires_at is None or command.lease_expires_at < now


def _system_line(command_id: int, seq: int, attempt: int, text: str) -> Any:
    from server.models import LogLine

    return LogLine(
        command_id=command_id,
        seq=seq,
        attempt=attempt,
        stream=LogStream.SYSTEM.value,
        ts=utcnow(),
        text=text,
    )


def _exit_message(code: int) -> str:
    if code < 0:
        return f"killed by signal {-code}"
    return f"exited with status {code}"
