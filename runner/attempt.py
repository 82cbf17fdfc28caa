"""Running one attempt of a command: its child in a process group with a pump per pipe,
its end (exit, cancel, shutdown, timeout), the reaping of its group, and its final state
(runner/attempt_state.final_values) queued with the claim for its slot. The supervisor
(runner/supervisor.py) holds one `AttemptExecution` and starts `run` for each claim.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import shlex
import time
from collections.abc import Callable
from datetime import datetime
from typing import IO

from runner.attempt_state import Attempt, Outcome, StopReason, attempt_of, final_values
from runner.claims import Claimed, ClaimedCommand
from runner.host_cause import HostCause, Seen
from runner.loading import AttemptSetup, Loaded, Prepared
from runner.logstore import LogStore
from runner.logwriter import LogWriter
from runner.markers import run_marker, sweep_run
from runner.oskit.exits import leader_exit
from runner.oskit.groups import stop_group
from runner.oskit.splitter import LineSplitter
from runner.oskit.subreaper import is_subreaper, kill_adopted_escapees
from runner.process import Child, Spawner, pipe_chunks
from runner.redaction import KnownSecrets
from runner.sandbox import Sandbox
from runner.template_env import CompositionError
from runner.workdirs import Workdirs, profile_dir
from server.broker import Broker
from server.events import log_event
from server.metrics import Metrics
from server.models import (
    CommandStatus,
    LogStream,
    utcnow,
)
from server.profiles import user_data_dir
from server.settings import Settings
from server.storage import profile_dir_problem
from xray.sidecar import SidecarError

READ_CHUNK = 64 * 1024
# Errors starting a child that say the host is short (of processes, memory, descriptors),
# not that the command is wrong: fork's EAGAIN, ENOMEM, EMFILE/ENFILE from its pipes.
HOST_SHORTAGES = frozenset({errno.EAGAIN, errno.ENOMEM, errno.EMFILE, errno.ENFILE})
PIPES_GRACE_SECONDS = 5.0


class AttemptExecution:
    """Running, reaping and finishing attempts, given what they need: the runner's settings,
    its `AttemptSetup`, log store, known secrets, broker and metrics, its id, the sandbox and
    the working directories; and of the supervisor its running attempts (an attempt leaves
    them when it ends), the event that wakes its claims, `claim_free_slots` (called as an
    attempt's slot frees) and `announce_requeued` (an attempt put back in the queue)."""

    def __init__(
        self,
        settings: Settings,
        setup: AttemptSetup,
        store: LogStore,
        secrets: KnownSecrets,
        broker: Broker,
        metrics: Metrics | None,
        runner_id: str,
        sandbox: Sandbox,
        workdirs: Workdirs,
        *,
        attempts: dict[int, Attempt],
        wake: asyncio.Event,
        claim_free_slots: Callable[[], None],
        announce_requeued: Callable[[int, datetime | None], None],
        spawner: Spawner | None = None,
    ) -> None:
        self.settings = settings
        self.setup = setup
        self.store = store
        self.secrets = secrets
        self.broker = broker
        self.metrics = metrics
        self.runner_id = runner_id
        self.sandbox = sandbox
        self.workdirs = workdirs
        self.attempts = attempts
        self._wake = wake
        self.claim_free_slots = claim_free_slots
        self.announce_requeued = announce_requeued
        self.spawner = spawner or Spawner()  # (not started: children start in the loop)

    # -- running one attempt -----------------------------------------------------------

    async def run(self, attempt: Attempt, claim: Claimed) -> None:
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
            fence=command.fence,
        )
        writer.on_lost = attempt.lose
        attempt.writer = writer
        outcome = Outcome(CommandStatus.FAILED, error="the runner failed unexpectedly")
        try:
            if attempt.reason == StopReason.SHUTDOWN:  # claimed as the runner stopped
                outcome = Outcome(CommandStatus.QUEUED, error="interrupted by runner shutdown")
                return
            loaded = await self.setup.load(claim)
            await self.secrets.refresh_or_keep()
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
                    self.setup.sidecar(loaded.chain, writer, loaded.command.id, loaded.routing)
                )
                proxy_url = sidecar.url
                await writer.add(
                    LogStream.SYSTEM,
                    f"proxy sidecar for {loaded.chain[0].name!r} listening on {sidecar.url} "
                    f"(started in {1000 * (sidecar.started_in or 0):.0f} ms)",
                )
            prepared = await self.setup.render(loaded, proxy_url)
            if loaded.profile is not None:
                path = user_data_dir(loaded.profile, self.settings)
                problem = loaded.profile.user_data_dir and profile_dir_problem(path, self.settings)
                if problem:  # saved before the rule, or by another Corral's settings
                    await writer.add(LogStream.SYSTEM, f"cannot run: {problem}")
                    return Outcome(CommandStatus.FAILED, error=problem, retryable=False)
                try:
                    prepared.writable.append(profile_dir(path, self.sandbox.run_as))
                except OSError as exc:
                    message = f"cannot prepare the profile dir {path}: {exc.strerror or exc}"
                    await writer.add(LogStream.SYSTEM, message)
                    return Outcome(CommandStatus.FAILED, error=message, retryable=False)
            return await self._execute(attempt, loaded.command, prepared, writer)
        raise AssertionError("unreachable")  # pragma: no cover - the stack never swallows

    async def _execute(
        self, attempt: Attempt, command: ClaimedCommand, prepared: Prepared, writer: LogWriter
    ) -> Outcome:
        workdir = self.workdirs.path(command.id)
        if attempt.lost:  # lost while loading: no child to start
            return Outcome(CommandStatus.QUEUED, error="lost its fence")
        try:
            self.sandbox.check_program(prepared.argv[0], prepared.env["PATH"], workdir)
            process = await self.spawner.child(
                self.sandbox.wrap(prepared.argv, workdir, prepared.writable),
                prepared.env,
                workdir,
                **self.sandbox.popen_options(),
            )
        except OSError as exc:
            start = f"attempt {attempt.number}: cannot start {prepared.argv[0]!r}"
            if exc.errno in HOST_SHORTAGES:  # not the command's fault: it may start later
                # (Its log line is the policy's note: the error and when it is tried again.)
                message = f"{start}: the host is out of resources ({exc.strerror or exc})"
                return Outcome(CommandStatus.FAILED, error=message, host_short=True)
            message = f"{start}: {exc.strerror or exc}"
            if exc.filename and exc.filename != prepared.argv[0]:  # its working directory
                message += f" ({exc.filename})"
            await writer.add(LogStream.SYSTEM, message)
            return Outcome(CommandStatus.FAILED, error=message, retryable=False)
        pgid = process.pid
        cause = HostCause()
        # The pumps run from the loop's next round: the line below is queued before theirs.
        pumps = [
            asyncio.create_task(self._pump(process.stdout, LogStream.STDOUT, writer)),
            asyncio.create_task(self._pump(process.stderr, LogStream.STDERR, writer, cause.see)),
        ]
        try:
            await writer.add(
                LogStream.SYSTEM,
                f"attempt {attempt_of(attempt)}: {shlex.join(prepared.argv)}",
                command_values={"pgid": pgid, "argv": prepared.argv},
            )
            log_event("started", command=command.id, attempt=attempt.number, pid=process.pid)
            outcome = await self._wait(attempt, command, process, writer)
        finally:
            # A lost attempt whose command this runner claimed again shares its run marker
            # with the newer attempt: no sweep by the marker (it would find the newer one's).
            newer = self.attempts.get(command.id)
            sweep = newer is None or newer is attempt
            reap = self._reap(command.id, pgid, process, pumps, attempt.lost, sweep=sweep)
            await asyncio.shield(reap)
        if outcome.exit_code and outcome.error:  # the pumps have read all of stderr by now
            outcome.error = cause.explain(outcome.error, writer.redactor)
        return outcome

    async def _reap(
        self,
        command_id: int,
        pgid: int,
        process: Child,
        pumps: list[asyncio.Task[None]],
        lost: bool = False,
        sweep: bool = True,
    ) -> None:
        # A lost attempt's group is killed at once: a newer attempt runs elsewhere (maybe
        # on the same profile), and nothing this one prints is stored any more.
        grace = 0.0 if lost else self.settings.kill_grace_seconds
        if lost:
            for pump in pumps:
                pump.cancel()
        try:
            gone = await stop_group(pgid, process, grace)
        finally:
            process.release()
        escaped = 0
        # Once the group is gone, no process of the run is left to look for by its marker (a
        # look at every younger PID's environment: 1.4 ms p50, 14 ms p90 of each command's
        # end on a busy host) when a sandbox's PID namespace died with the group, or when
        # this process is a subreaper: then the oldest living process of every subtree the
        # run left has lost its parent and came to this process, where the adopted ones are
        # killed just below (their children come up in turn).
        if sweep and not (gone and (self.sandbox.contains_processes or is_subreaper())):
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
        if attempt.lost:  # nothing is written for it: _finish says so in the runner's log
            return Outcome(CommandStatus.QUEUED, error="lost its fence")
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

    async def _pump(
        self, pipe: IO[bytes], kind: LogStream, writer: LogWriter, see: Seen = lambda _: None
    ) -> None:
        splitter = LineSplitter(self.settings.max_line_bytes)
        try:
            async with contextlib.aclosing(pipe_chunks(pipe, READ_CHUNK)) as chunks:
                async for chunk in chunks:
                    lines = list(splitter.feed(chunk))
                    see(lines)
                    await writer.add_lines(kind, lines, len(chunk))
        except OSError as exc:  # the pipe failed (EIO ...): keep what was read
            log_event(
                "pipe_failed",
                level="warning",
                command=writer.command_id,
                stream=kind.value,
                error=repr(exc),
            )
        lines = list(splitter.close())
        see(lines)
        await writer.add_lines(kind, lines)

    # -- finishing ---------------------------------------------------------------------

    async def _finish(
        self, attempt: Attempt, outcome: Outcome, writer: LogWriter, elapsed: float
    ) -> None:
        try:
            if attempt.lost or writer.lost:
                self._lost(attempt, writer)
                return
            if outcome.error is not None:  # it may quote a child's or a sidecar's words
                outcome.error = writer.redactor(outcome.error)
            status, values, note = final_values(attempt, outcome, self.settings)
            # The note and the new state go in one transaction, with the claim that takes
            # this slot: the slot counts as free from now on.
            attempt.finishing = True
            self.claim_free_slots()
            await writer.add(LogStream.SYSTEM, note, command_values=values)
            await writer.close()
            if writer.lost:  # the final state itself was refused: the row is another's
                self._lost(attempt, writer)
                return
            self.broker.publish_status(attempt.command_id, status.value)
            if status is CommandStatus.QUEUED:
                self.announce_requeued(attempt.command_id, values.get("next_attempt_at"))
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
            # No cycle outlives the attempt (attempt -> writer -> on_lost -> attempt): the
            # cyclic collector's work would grow with every command run.
            writer.on_lost, attempt.writer = None, None
            if self.attempts.get(attempt.command_id) is attempt:  # (a newer claim of it stays)
                del self.attempts[attempt.command_id]
            if self.metrics is not None:
                self.metrics.running.set(len(self.attempts))
            self._wake.set()

    def lose(self, attempt: Attempt) -> None:
        """The attempt's fence was refused: its writer takes nothing more, it stops."""
        if attempt.writer is not None:
            self.store.lose(attempt.writer)  # calls attempt.lose
        else:
            attempt.lose()

    def _lost(self, attempt: Attempt, writer: LogWriter) -> None:
        """An attempt whose fence was refused: its group is gone (reaped), nothing of it is
        written; one warning, and its slot is free."""
        self.store.lose(writer)
        attempt.finishing = True
        log_event(
            "attempt_lost",
            level="warning",
            command=attempt.command_id,
            attempt=attempt.number,
            fence=attempt.fence,
            reason="its fence token was refused: the command was recovered after its lease",
        )
        if self.metrics is not None:
            self.metrics.attempts.labels("lost").inc()
        self.claim_free_slots()


def _exit_message(code: int) -> str:
    if code < 0:
        return f"killed by signal {-code}"
    return f"exited with status {code}"
