"""What happens to a command after an attempt: one pure decision, tested as a table.

An attempt ends in one of a few ways (`Ending`). Which state the command takes next —
final, queued again after a backoff, or queued again at once without the attempt being
held against it — depends only on how it ended, which attempt it was, and the command's
limits. Nothing here reads a clock, a database or a random source: the jitter of the
backoff comes in as a number.

Three endings are not the command's fault and are not counted against `maxAttempts`:
a runner shutdown (the operator's act), the loss of the runner (killed, host gone), and a
child that could not start because the host was short of processes, memory or file
descriptors. The last two are bounded (`Limits.max_runner_losses`,
`Limits.max_host_shortages`), so that a command that kills its own runner, or a host that
stays broken, cannot loop forever.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from server.models import BACKOFF_SECONDS_DEFAULT, CommandStatus


class Ending(enum.Enum):
    """How one attempt ended, as the supervisor (or the recovery of a dead runner) saw it."""

    SUCCEEDED = "succeeded"
    FAILED = "failed"  # a non-zero exit, a crash, a sidecar that would not start
    TIMED_OUT = "timed out"
    CANCELLED = "cancelled"
    SHUTDOWN = "shutdown"  # the runner stopped (drain, SIGTERM) before the attempt finished
    RUNNER_LOST = "runner lost"  # its runner stopped renewing its lease
    HOST_SHORT = "host short"  # not started: EAGAIN, ENOMEM, EMFILE, ENFILE from the host


_FINAL_STATUS = {
    Ending.SUCCEEDED: CommandStatus.SUCCEEDED,
    Ending.FAILED: CommandStatus.FAILED,
    Ending.TIMED_OUT: CommandStatus.TIMED_OUT,
    Ending.CANCELLED: CommandStatus.CANCELLED,
    Ending.RUNNER_LOST: CommandStatus.FAILED,
}


@dataclass(frozen=True)
class Limits:
    max_attempts: int
    backoff_seconds: float = BACKOFF_SECONDS_DEFAULT
    backoff_ceiling: float = 600.0
    max_runner_losses: int = 2
    # Host shortages are not counted while the command has fewer uncounted attempts (of
    # any kind: the row keeps no separate count of them) than this.
    max_host_shortages: int = 5


@dataclass(frozen=True)
class AttemptState:
    """The attempt that ended: its number (1 for the first), how many attempts before it
    were not counted, and how many of those were runner losses."""

    number: int
    uncounted: int = 0
    runner_losses: int = 0

    @property
    def counted(self) -> int:
        """Attempts held against `maxAttempts`, this one included."""
        return self.number - self.uncounted


@dataclass(frozen=True)
class Decision:
    """The command's next state. `status` is QUEUED for another attempt; `delay` is the
    wait before it (0: at once); `counted` whether this attempt is held against the
    command; `reason` the wait reason of a queued command or the error of a failed one;
    `note` the system line the log gets."""

    status: CommandStatus
    counted: bool = True
    delay: float = 0.0
    reason: str | None = None
    note: str = ""

    @property
    def final(self) -> bool:
        return self.status.is_final


def backoff_delay(base: float, attempt: int, ceiling: float, jitter: float) -> float:
    """Exponential backoff with full jitter: `jitter` in [0, 1] picks a point in
    [base, base * 2**(attempt-1)] (the top capped at `ceiling`)."""
    top: float = min(ceiling, base * 2.0 ** max(attempt - 1, 0))
    low = min(base, top)
    return low + (top - low) * min(max(jitter, 0.0), 1.0)


def decide(
    ending: Ending,
    attempt: AttemptState,
    limits: Limits,
    *,
    retryable: bool = True,
    error: str | None = None,
    jitter: float = 0.5,
) -> Decision:
    """The command's next state after `attempt` ended as `ending`."""
    if ending is Ending.SHUTDOWN:
        return Decision(
            CommandStatus.QUEUED,
            counted=False,
            reason="interrupted by a runner shutdown; not counted against it",
            note="put back in the queue; this attempt is not counted against it",
        )
    if ending is Ending.RUNNER_LOST:
        if attempt.runner_losses < limits.max_runner_losses:
            return Decision(
                CommandStatus.QUEUED,
                counted=False,
                reason="recovered from a dead runner; not counted against it",
                note="queued again; a runner's death is not counted against the command "
                f"({attempt.runner_losses + 1} of {limits.max_runner_losses} allowed)",
            )
        if attempt.counted < limits.max_attempts:
            return Decision(
                CommandStatus.QUEUED,
                reason="recovered from a dead runner",
                note=f"queued again (its runners died {attempt.runner_losses + 1} times; "
                "this one counts as an attempt)",
            )
        message = (
            "its runner died during the last attempt"
            if limits.max_runner_losses == 0
            else f"its runner died {attempt.runner_losses + 1} times "
            f"(at most {limits.max_runner_losses} are not counted) and no attempts are left"
        )
        return Decision(CommandStatus.FAILED, reason=message, note=f"{message}: failed")
    if ending is Ending.HOST_SHORT:
        if attempt.uncounted < limits.max_host_shortages:
            # Backed off by the shortages so far: a host that stays short is asked less often.
            delay = backoff_delay(
                limits.backoff_seconds, attempt.uncounted + 1, limits.backoff_ceiling, jitter
            )
            return Decision(
                CommandStatus.QUEUED,
                counted=False,
                delay=delay,
                reason=f"the host was out of resources; trying again in {delay:.1f}s, "
                "not counted against it",
                note=f"{error or 'the host is out of resources'}; tried again in {delay:.1f}s "
                f"(not counted against the command: {attempt.uncounted + 1} of "
                f"{limits.max_host_shortages} uncounted attempts allowed)",
            )
        ending = Ending.FAILED  # the host stays short: from now on it costs an attempt
    if (
        ending in (Ending.FAILED, Ending.TIMED_OUT)
        and retryable
        and attempt.counted < limits.max_attempts
    ):
        delay = backoff_delay(
            limits.backoff_seconds, attempt.counted, limits.backoff_ceiling, jitter
        )
        following = attempt.counted + 1
        return Decision(
            CommandStatus.QUEUED,
            delay=delay,
            reason=f"retrying in {delay:.1f}s (attempt {following} of {limits.max_attempts})",
            note=f"{error}; retrying in {delay:.1f}s" if error else f"retrying in {delay:.1f}s",
        )
    status = _FINAL_STATUS[ending]
    note = f"finished: {status.value}" + (f" ({error})" if error else "")
    return Decision(status, reason=error, note=note)
