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
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import IO, Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from runner import policy
from runner.claims import Claimed, ClaimedCommand, ClaimRequest, ClaimResult, ClaimTerms
from runner.compose import CompositionError
from runner.lines import LineSplitter
from runner.logstore import LogStore
from runner.logwriter import LogWriter
from runner.process import (
    RUN_MARKER,
    SIDECAR_MARKER,
    Child,
    become_subreaper,
    kill_adopted_escapees,
    leader_exit,
    pipe_chunks,
    reap_orphans,
    run_marker,
    stop_group,
    sweep_run,
    use_pidfd_child_watcher,
)
from runner.proxy_checks import ProxyCheckSchedule
from runner.recovery import LIVE_RUNNERS, Recovery, limits
from runner.redaction import KnownSecrets
from runner.renderpool import RenderPool
from runner.sandbox import NONE, RunAs, Sandbox, check_reachable, choose_sandbox
from runner.schedules import ProbeSchedule
from runner.store_errors import retryable_database_error
from server.broker import CANCEL_TOPIC, QUEUE_TOPIC, SECRETS_TOPIC, Broker
from server.commands import (
    PROXY_URL_ENV,
    browser_settings,
    command_context,
)
from server.events import log_event
from server.known_secrets import process_secrets
from server.metrics import Metrics
from server.models import (
    CommandStatus,
    LogStream,
    Profile,
    Proxy,
    Service,
    utcnow,
)
from server.profiles import user_data_dir
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


# How an attempt ended, by the status its outcome carries (QUEUED: a runner shutdown).
_ENDINGS = {
    CommandStatus.SUCCEEDED: policy.Ending.SUCCEEDED,
    CommandStatus.FAILED: policy.Ending.FAILED,
    CommandStatus.TIMED_OUT: policy.Ending.TIMED_OUT,
    CommandStatus.CANCELLED: policy.Ending.CANCELLED,
    CommandStatus.QUEUED: policy.Ending.SHUTDOWN,
}


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
        rows = await self.gateway.load_attempt(command, self.box)
        profile, proxy, services, tokens = rows.profile, rows.proxy, rows.services, rows.tokens
        chain, routing, own = rows.chain, rows.routing, rows.own
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
            limits(self.settings, attempt.max_attempts, attempt.backoff_seconds),
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
        for command_id in await self.gateway.renew_leases(self.runner_id, expires):
            if command_id in self.attempts:
                self.attempts[command_id].request_stop(StopReason.CANCEL)

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


def _exit_message(code: int) -> str:
    if code < 0:
        return f"killed by signal {-code}"
    return f"exited with status {code}"
