"""One attempt as the supervisor tracks it (`Attempt`, why it was asked to stop), how it
ended (`Outcome`), and what its command becomes then: runner/policy.decide applied, as the
values to store.
"""

from __future__ import annotations

import asyncio
import random
from dataclasses import dataclass, field
from datetime import timedelta
from typing import TYPE_CHECKING, Any

from runner import policy
from runner.recovery import limits
from server.models import CommandStatus, utcnow
from server.settings import Settings

if TYPE_CHECKING:
    from runner.logwriter import LogWriter


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
    fence: int | None = None  # its fence token (from the claim)
    writer: LogWriter | None = None
    # Its fence was refused (by a flush or a lease renewal): recovered elsewhere, it is no
    # longer this runner's. Its group is killed and nothing more of it is written.
    lost: bool = False

    def request_stop(self, reason: str) -> None:
        if self.reason is None:
            self.reason = reason
        self.stop.set()

    def lose(self) -> None:
        self.lost = True
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
    host_short: bool = False  # not started: the host was short (policy.Ending.HOST_SHORT)


def attempt_of(attempt: Attempt) -> str:
    """`2 of 3`, or with attempts that were not counted `3 of 4 (1 earlier not counted)`."""
    of = f"{attempt.number} of {attempt.max_attempts + attempt.uncounted}"
    return of + (f" ({attempt.uncounted} earlier not counted)" if attempt.uncounted else "")


def jitter() -> float:
    return random.random()  # noqa: S311 - jitter, not cryptography


def backoff_delay(base: float, attempt: int, ceiling: float) -> float:
    """Exponential backoff with full jitter: uniform in [base, base * 2**(attempt-1)]."""
    return policy.backoff_delay(base, attempt, ceiling, jitter())


def final_values(
    attempt: Attempt, outcome: Outcome, settings: Settings
) -> tuple[CommandStatus, dict[str, Any], str]:
    """The command's next state (runner/policy.decide), as the values to store."""
    decision = policy.decide(
        policy.Ending.HOST_SHORT if outcome.host_short else _ENDINGS[outcome.status],
        policy.AttemptState(attempt.number, attempt.uncounted),
        limits(settings, attempt.max_attempts, attempt.backoff_seconds),
        retryable=outcome.retryable,
        error=outcome.error,
        jitter=jitter(),
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
