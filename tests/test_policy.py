"""runner/policy.decide as a table: how an attempt ended, which attempt, the limits -> the
command's next state."""

from __future__ import annotations

import pytest

from runner.policy import AttemptState, Ending, Limits, backoff_delay, decide
from server.models import CommandStatus

QUEUED, FAILED = CommandStatus.QUEUED, CommandStatus.FAILED
THREE = Limits(max_attempts=3, backoff_seconds=2.0, backoff_ceiling=600.0, max_runner_losses=2)
ONE = Limits(max_attempts=1, max_runner_losses=2)
NO_LOSSES = Limits(max_attempts=1, max_runner_losses=0)
NO_SHORTAGES = Limits(max_attempts=1, max_host_shortages=0)


@pytest.mark.parametrize(
    ("ending", "attempt", "limits", "retryable", "status", "counted", "delayed"),
    [
        # succeeded, cancelled: final whatever is left
        (Ending.SUCCEEDED, AttemptState(1), THREE, True, CommandStatus.SUCCEEDED, True, False),
        (Ending.CANCELLED, AttemptState(1), THREE, True, CommandStatus.CANCELLED, True, False),
        # failed or timed out with attempts left: back in the queue after a backoff
        (Ending.FAILED, AttemptState(1), THREE, True, QUEUED, True, True),
        (Ending.TIMED_OUT, AttemptState(2), THREE, True, QUEUED, True, True),
        (Ending.FAILED, AttemptState(3), THREE, True, FAILED, True, False),
        (Ending.TIMED_OUT, AttemptState(3), THREE, True, CommandStatus.TIMED_OUT, True, False),
        # not retryable (a template that cannot compose, a program that does not exist)
        (Ending.FAILED, AttemptState(1), THREE, False, FAILED, True, False),
        # attempts not counted before give their places back
        (Ending.FAILED, AttemptState(4, uncounted=2), THREE, True, QUEUED, True, True),
        (Ending.FAILED, AttemptState(5, uncounted=2), THREE, True, FAILED, True, False),
        # a shutdown is never held against it, even on its only attempt
        (Ending.SHUTDOWN, AttemptState(1), ONE, True, QUEUED, False, False),
        (Ending.SHUTDOWN, AttemptState(9, uncounted=8), ONE, True, QUEUED, False, False),
        # a lost runner: not counted up to max_runner_losses times, then counted
        (Ending.RUNNER_LOST, AttemptState(1), ONE, True, QUEUED, False, False),
        (Ending.RUNNER_LOST, AttemptState(2, 1, 1), ONE, True, QUEUED, False, False),
        (Ending.RUNNER_LOST, AttemptState(3, 2, 2), ONE, True, FAILED, True, False),
        (Ending.RUNNER_LOST, AttemptState(3, 2, 2), THREE, True, QUEUED, True, False),
        (Ending.RUNNER_LOST, AttemptState(1), NO_LOSSES, True, FAILED, True, False),
        # the host short of resources at the start: not counted, after a backoff, while
        # fewer than max_host_shortages attempts were uncounted; then a failed attempt
        (Ending.HOST_SHORT, AttemptState(1), ONE, True, QUEUED, False, True),
        (Ending.HOST_SHORT, AttemptState(5, uncounted=4), ONE, True, QUEUED, False, True),
        (Ending.HOST_SHORT, AttemptState(6, uncounted=5), ONE, True, FAILED, True, False),
        (Ending.HOST_SHORT, AttemptState(6, uncounted=5), THREE, True, QUEUED, True, True),
        (Ending.HOST_SHORT, AttemptState(1), NO_SHORTAGES, True, FAILED, True, False),
    ],
)
def test_decision_table(
    ending: Ending,
    attempt: AttemptState,
    limits: Limits,
    retryable: bool,
    status: CommandStatus,
    counted: bool,
    delayed: bool,
) -> None:
    decision = decide(ending, attempt, limits, retryable=retryable, error="exit 3")
    assert (decision.status, decision.counted, decision.delay > 0) == (status, counted, delayed)
    assert decision.final == status.is_final
    assert decision.note  # every decision leaves a line in the log


def test_retry_reason_names_the_next_attempt_and_the_delay() -> None:
    decision = decide(Ending.FAILED, AttemptState(1), THREE, error="exit 3", jitter=1.0)
    assert decision.delay == 2.0  # second attempt: up to base * 2**0
    assert decision.reason == "retrying in 2.0s (attempt 2 of 3)"
    assert decision.note == "exit 3; retrying in 2.0s"


def test_final_failure_keeps_the_error() -> None:
    decision = decide(Ending.FAILED, AttemptState(3), THREE, error="exit 3")
    assert decision.reason == "exit 3"
    assert decision.note == "finished: FAILED (exit 3)"


def test_a_runner_that_keeps_dying_stops_the_loop() -> None:
    decision = decide(Ending.RUNNER_LOST, AttemptState(3, 2, 2), ONE)
    assert decision.reason == (
        "its runner died 3 times (at most 2 are not counted) and no attempts are left"
    )


def test_a_short_host_is_named_and_backed_off() -> None:
    error = "attempt 2: cannot start 'x': the host is out of resources (Too many open files)"
    first = decide(Ending.HOST_SHORT, AttemptState(1), THREE, error=error, jitter=1.0)
    later = decide(Ending.HOST_SHORT, AttemptState(4, 3), THREE, error=error, jitter=1.0)
    assert (first.delay, later.delay) == (2.0, 16.0)  # base * 2**uncounted
    assert later.note == (
        f"{error}; tried again in 16.0s "
        "(not counted against the command: 4 of 5 uncounted attempts allowed)"
    )
    assert later.reason == (
        "the host was out of resources; trying again in 16.0s, not counted against it"
    )


def test_a_host_that_stays_short_ends_the_loop() -> None:
    error = "cannot start 'x': the host is out of resources (Cannot allocate memory)"
    decision = decide(Ending.HOST_SHORT, AttemptState(6, 5), ONE, error=error)
    assert decision.reason == error
    assert decision.note == f"finished: FAILED ({error})"


@pytest.mark.parametrize(
    ("attempt", "jitter", "expected"),
    [(1, 0.0, 2.0), (1, 1.0, 2.0), (3, 0.0, 2.0), (3, 1.0, 8.0), (3, 0.5, 5.0), (30, 1.0, 60.0)],
)
def test_backoff_grows_and_is_capped(attempt: int, jitter: float, expected: float) -> None:
    assert backoff_delay(2.0, attempt, 60.0, jitter) == expected
