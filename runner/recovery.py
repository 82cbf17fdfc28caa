"""Recovery: what a runner does to a command RUNNING on a runner that died (its lease
expired, or on this host its process is gone): kill what is left of it here, then put it
back in line or fail it (runner/policy.decide with RUNNER_LOST), with a note in its log.
The store gateway (`RunnerStore.recover_orphans`) reads and writes the rows.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import datetime

from runner import policy
from runner.markers import kill_leftovers, run_marker
from server.events import log_event
from server.models import Command, utcnow
from server.settings import Settings

# Runner ids of the supervisors alive in this process (several can share one process).
LIVE_RUNNERS: set[str] = set()


def limits(settings: Settings, max_attempts: int, backoff_seconds: float) -> policy.Limits:
    """A command's retry limits, with the runner's backoff ceiling, loss and shortage
    limits."""
    return policy.Limits(
        max_attempts=max_attempts,
        backoff_seconds=backoff_seconds,
        backoff_ceiling=settings.backoff_max_seconds,
        max_runner_losses=settings.max_runner_losses,
        max_host_shortages=settings.max_host_shortages,
    )


@dataclass(frozen=True)
class Recovery:
    """One runner's view of the others' commands (see `recover`)."""

    settings: Settings
    runner_id: str
    host: str
    now: datetime

    def recover(self, command: Command) -> str | None:
        """None when the command's runner is alive; else put it back (or fail it) and the
        note for its log (a system line the gateway adds)."""
        if not (_lease_expired(command, self.now) or self._runner_gone(command)):
            return None
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
            limits(self.settings, command.max_attempts, command.backoff_seconds),
        )
        command.status = decision.status
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
        command.fence += 1  # the lost attempt's late writes are refused from now on
        log_event("recovered", command=command.id, previous_runner=previous, status=command.status)
        return note

    def _runner_gone(self, command: Command) -> bool:
        if command.runner_host != self.host or not command.runner_id:
            return False
        try:
            pid = int(command.runner_id.split(":")[1])
        except (IndexError, ValueError):
            return False
        return runner_process_gone(command.runner_id, pid)


def _lease_expired(command: Command, now: datetime) -> bool:
    return command.lease_expires_at is None or command.lease_expires_at < now


def runner_process_gone(runner_id: str, pid: int) -> bool:
    """Whether the process of a runner of this host is gone (a runner of this process: not
    among those running in it)."""
    if pid == os.getpid():
        return runner_id not in LIVE_RUNNERS
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:
        return False
    return False
