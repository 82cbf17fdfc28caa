"""Which queued commands a claim takes: the request, what it returns, and the pure choice
among the candidates (priority then FIFO, one per profile, none through a held proxy, none
the rate-limit gate holds). The statements that read and write them are the store's
(runner/store_sqlite.py, runner/store_postgres.py); this module does no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from runner.gate import Gate
from server.broker import USAGE_TOPIC, Broker, UsageRecorded
from server.events import log_event
from server.models import CommandStatus
from server.runners import runner_affinities
from server.settings import Settings

# Claim rounds: when busy profiles or closed gates fill the claim's window, it looks again
# in a window four times as large (so the commands behind them are not blocked).
CLAIM_ROUNDS = 3


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
    fence: int  # the attempt's fence token (raised by this claim): its writes carry it


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
    spent: list[int] = field(default_factory=list)  # services a started command counts on

    def announce(self, broker: Broker, runner_id: str) -> None:
        """Tell the subscribers what the claim did (statuses, Corral's count of the tokens
        moved on), and say it in the runner's log."""
        for command_id in self.waiting:
            broker.publish_status(command_id, CommandStatus.WAITING.value)
        for command_id in self.failed:
            log_event("failed_at_gate", command=command_id, runner=runner_id)
            broker.publish_status(command_id, CommandStatus.FAILED.value)
        for service_id in self.spent:
            broker.publish(USAGE_TOPIC, UsageRecorded(service_id))
        if self.claimed:
            commands = ",".join(str(claim.command.id) for claim in self.claimed)
            log_event("claimed", commands=commands, runner=runner_id)


@dataclass(frozen=True, slots=True)
class ClaimTerms:
    """What every claim of one runner is made with (its identity and settings)."""

    runner_id: str
    host: str
    runner_name: str
    max_concurrency: int
    lease_seconds: float
    hold_on_flagged_proxy: bool
    proxy_flag_after: int
    labels: tuple[str, ...] = ()

    @classmethod
    def of_runner(cls, settings: Settings, runner_id: str, host: str, name: str) -> ClaimTerms:
        return cls(
            runner_id=runner_id,
            host=host,
            runner_name=name,
            max_concurrency=settings.max_concurrency,
            lease_seconds=settings.lease_seconds,
            hold_on_flagged_proxy=settings.hold_on_flagged_proxy,
            proxy_flag_after=settings.proxy_flag_after,
            labels=tuple(settings.resolved_runner_labels),
        )

    @property
    def affinities(self) -> list[str]:
        """The profile affinities this runner answers to."""
        return runner_affinities(self.runner_name, self.labels)

    def lease(self, now: datetime) -> datetime:
        return now + timedelta(seconds=self.lease_seconds)


class ClaimRequest:
    """A claim that rides in the log store's next flush: the store runs it through its
    gateway (`RunnerStore.claim`) in the flush's transaction, after the flush's writes."""

    def __init__(self, terms: ClaimTerms, free: int) -> None:
        self.terms = terms
        self.free = free  # slots it is for; raised by slots that free up before it runs
        self.claimed_for: int | None = None  # the slots it claimed for, once it ran

    def begin(self) -> int:
        """The slots the claim is for, fixed as it runs."""
        self.claimed_for = self.free
        return self.claimed_for

    def slots(self, free: int) -> Slots:
        return Slots(free, self.terms.max_concurrency, self.terms.runner_name)


@dataclass
class Choice:
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
            [] if self.gate is None else self.gate.services_of(list(by_id)),
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


def choose(
    candidates: Any,
    busy: dict[int, int],
    slots: Slots,
    gate: Gate | None,
    held: dict[int, str] | None = None,
) -> Choice:
    """Which candidates to claim (priority then FIFO, one per profile, none of a busy
    profile, none through a held proxy, none the rate-limit gate holds), which wait (and
    why, written only when it changes), which come next."""
    choice = Choice({}, [], [], gate=gate)
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


def gated(candidates: Any) -> list[int]:
    """The candidates that have services (only those does the gate judge)."""
    return [row[0] for row in candidates if row[8]]


def needs_busy(candidates: Any) -> bool:
    """Whether a candidate has a profile (then the busy profiles are read)."""
    return any(row[1] is not None for row in candidates)


def needs_held(terms: ClaimTerms, candidates: Any) -> bool:
    """Whether the hold policy applies and a candidate goes through a proxy."""
    return terms.hold_on_flagged_proxy and any(row[9] is not None for row in candidates)


def look_further(choice: Choice, candidates: Any, free: int, limit: int) -> bool:
    """Whether the window was full of commands that cannot start, with slots left over."""
    return len(choice.chosen) < free and len(candidates) == limit and choice.blocked > 0


def first_window(free: int) -> int:
    return free * 2 + 8


def _wait(
    choice: Choice,
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
