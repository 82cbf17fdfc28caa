"""The rate-limit gate at claim time (issue 13): which queued commands may start now, given
their services' policies and what is known of each token's budget.

A command uses each of its services through one token: the profile's own when its link has
one, else the service's shared one. Per token the gate knows the latest observation
(`service_usage`: remaining, reset, validity), Corral's own count of runs started with it
(`service_spend`), and the commands running with it. A command waits (with a reason) when a
token has no budget left, its service or token is at its concurrency cap, or it cools down
after a rate-limit answer (an observation recording a 429, or a 403 that left none: a budget
merely seen at zero waits for its reset instead); it fails at once when the token is known
to be invalid, saying what the provider answered and when.

The gate does no I/O: `gate_reads` is a generator that yields the reads it needs (by name,
`ReadName`; their statements are the store gateway's, runner/statements.py) and gets their
rows back, so the SQLite and the PostgreSQL claims drive the same rules. On PostgreSQL it
first takes a transaction-level advisory lock per service, so that two runners' claims
decide one after the other and never both spend the last unit.
"""

from __future__ import annotations

import json
from collections.abc import Generator, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from server.policies import ServicePolicy, effective_policy, token_label
from server.providers.common import answered, is_rate_limit_answer

# pg_advisory_xact_lock(LOCK_CLASS, service_id): the gate's decisions on one service.
LOCK_CLASS = 0x436F72  # "Cor"
MESSAGE_SHOWN = 100  # characters of a provider's message an invalid-token reason quotes

# The reads the gate asks for, by name; their statements are the store's
# (runner/statements.py GATE_READS), rendered for each driver.
ReadName = Literal[
    "uses", "lock", "running", "observed_shared", "observed_own", "spent_shared", "spent_own"
]
Read = tuple[ReadName, tuple[Any, ...]]
TokenKey = tuple[int, int | None]  # service id, profile id of its own token (None: shared)


@dataclass(frozen=True, slots=True)
class Use:
    """A command's use of one service, through one token."""

    service_id: int
    service_name: str
    token: TokenKey
    profile_name: str | None
    policy: ServicePolicy

    @property
    def label(self) -> str:
        return token_label(self.service_name, None if self.token[1] is None else self.profile_name)


@dataclass(slots=True)
class Observation:
    remaining: int | None
    limit: int | None
    reset_at: datetime | None
    token_valid: bool | None
    observed_at: datetime
    detail: str | None = None


@dataclass(slots=True)
class TokenState:
    """What is known of one token, plus what this claim has spent of it so far."""

    observation: Observation | None = None
    spent_since_observation: int = 0
    windows: dict[int, tuple[int, datetime | None]] = field(default_factory=dict)
    running: int = 0


@dataclass(frozen=True, slots=True)
class Verdict:
    """A command that may not start now: it waits (until `until`, when that is known), or
    it fails (`fail`)."""

    reason: str
    until: datetime | None = None
    fail: bool = False


class Gate:
    """The gate's view for one claim: rules applied to what GateReads gathered."""

    def __init__(self, now: datetime) -> None:
        self.now = now
        self.uses: dict[int, list[Use]] = {}
        self.tokens: dict[TokenKey, TokenState] = {}
        self.service_running: dict[int, int] = {}
        self.opens_at: datetime | None = None

    def verdict(self, command_id: int) -> Verdict | None:
        """Why the command may not start now; None: it may."""
        for use in self.uses.get(command_id, ()):
            found = self._verdict(use)
            if found is None:
                continue
            if found.until is not None and (self.opens_at is None or found.until < self.opens_at):
                self.opens_at = found.until
            return found
        return None

    def spend(self, command_id: int) -> list[TokenKey]:
        """Count a command this claim starts (so the next candidate sees it)."""
        keys = []
        for use in self.uses.get(command_id, ()):
            state = self.tokens.setdefault(use.token, TokenState())
            state.running += 1
            state.spent_since_observation += 1
            state.windows = {
                window: (count + 1, oldest or self.now)
                for window, (count, oldest) in state.windows.items()
            }
            self.service_running[use.service_id] = self.service_running.get(use.service_id, 0) + 1
            keys.append(use.token)
        return keys

    def services_of(self, command_ids: list[int]) -> list[int]:
        """The services these (started) commands use, each once."""
        return sorted(
            {use.service_id for command_id in command_ids for use in self.uses.get(command_id, ())}
        )

    def _verdict(self, use: Use) -> Verdict | None:
        state = self.tokens.get(use.token, TokenState())
        seen = state.observation
        if seen is not None and seen.token_valid is False:
            return Verdict(f"{use.label} is invalid{_refusal(seen)}; set a new token", fail=True)
        policy = use.policy
        for check in (self._budget_left, self._window, self._cooling, self._cap):
            found = check(use, policy, state)
            if found is not None:
                return found
        return None

    def _budget_left(self, use: Use, policy: ServicePolicy, state: TokenState) -> Verdict | None:
        seen = state.observation
        if seen is None or seen.remaining is None:
            return None
        if seen.reset_at is None or seen.reset_at <= self.now:
            return None  # the budget it saw has been renewed since (or when is unknown)
        left = seen.remaining - state.spent_since_observation
        if left > policy.reserve:
            return None
        of = "" if seen.limit is None else f" of {seen.limit:,}"
        reserve = f" ({policy.reserve:,} kept in reserve)" if policy.reserve else ""
        return Verdict(
            f"{use.label}: {max(left, 0):,}{of} left{reserve}, resets {_clock(seen.reset_at)}",
            until=seen.reset_at,
        )

    def _window(self, use: Use, policy: ServicePolicy, state: TokenState) -> Verdict | None:
        if policy.budget is None:
            return None
        count, oldest = state.windows.get(policy.budget.window_seconds, (0, None))
        if count < policy.budget.requests:
            return None
        until = (oldest or self.now) + timedelta(seconds=policy.budget.window_seconds)
        return Verdict(
            f"{use.label}: {count:,} of {policy.budget.requests:,} runs started in the last "
            f"{_duration(policy.budget.window_seconds)}, next one at {_clock(until)}",
            until=until,
        )

    def _cooling(self, use: Use, policy: ServicePolicy, state: TokenState) -> Verdict | None:
        seen = state.observation
        if policy.cool_down_seconds is None or seen is None:
            return None
        if not is_rate_limit_answer(seen.remaining, seen.detail):
            return None  # a budget seen at zero waits for its reset (_budget_left), no more
        until = seen.observed_at + timedelta(seconds=policy.cool_down_seconds)
        if until <= self.now:
            return None
        return Verdict(
            f"{use.label}: cooling down after a rate-limit answer until {_clock(until, True)}",
            until=until,
        )

    def _cap(self, use: Use, policy: ServicePolicy, state: TokenState) -> Verdict | None:
        if policy.concurrency is None:
            return None
        if policy.concurrency_scope == "token":
            running, what = state.running, use.label
        else:
            running, what = self.service_running.get(use.service_id, 0), use.service_name
        if running < policy.concurrency:
            return None
        return Verdict(f"{what}: {running} of {policy.concurrency} running (concurrency cap)")


def gate_reads(
    candidate_ids: list[int], now: datetime, *, lock: bool
) -> Generator[Read, Any, Gate]:
    """Gather what the gate needs about these candidates (the reads are yielded; each gets
    its rows back). `lock`: take the per-service advisory locks first (PostgreSQL)."""
    gate = Gate(now)
    rows = yield ("uses", (candidate_ids,))
    for row in rows:
        command_id, service_id, name, service_policy, link_policy, own, profile_id, profile = row
        token = (service_id, profile_id if own else None)
        policy = effective_policy(_json(service_policy), _json(link_policy))
        gate.uses.setdefault(command_id, []).append(Use(service_id, name, token, profile, policy))
    uses = [use for group in gate.uses.values() for use in group]
    if lock:
        for service_id in sorted({use.service_id for use in uses if use.policy.limits_anything}):
            yield ("lock", (LOCK_CLASS, service_id))
    if any(use.policy.concurrency for use in uses):
        for service_id, profile_id, own in (yield ("running", ())):
            key = (service_id, profile_id if own else None)
            gate.tokens.setdefault(key, TokenState()).running += 1
            gate.service_running[service_id] = gate.service_running.get(service_id, 0) + 1
    for key in {use.token for use in uses}:
        state = gate.tokens.setdefault(key, TokenState())
        yield from _read_token(state, key, [use.policy for use in uses if use.token == key], now)
    return gate


def _read_token(
    state: TokenState, key: TokenKey, policies: list[ServicePolicy], now: datetime
) -> Generator[Read, Any, None]:
    service_id, profile_id = key
    own = () if profile_id is None else (profile_id,)
    observed: ReadName = "observed_shared" if profile_id is None else "observed_own"
    spent: ReadName = "spent_shared" if profile_id is None else "spent_own"
    found = yield (observed, (service_id, *own))
    if found:
        remaining, limit, reset_at, valid, observed_at, detail = found[0]
        state.observation = Observation(
            remaining,
            limit,
            None if reset_at is None else _time(reset_at),
            None if valid is None else bool(valid),
            _time(observed_at),
            detail,
        )
        if state.observation.reset_at is not None and state.observation.reset_at > now:
            counted = yield (spent, (service_id, *own, state.observation.observed_at))
            state.spent_since_observation = int(counted[0][0])
    for window in {policy.budget.window_seconds for policy in policies if policy.budget}:
        since = now - timedelta(seconds=window)
        counted = yield (spent, (service_id, *own, since))
        count, oldest = counted[0]
        state.windows[window] = (int(count), None if oldest is None else _time(oldest))


def spend_rows(gate: Gate, claimed: Iterable[int], now: datetime) -> list[tuple[Any, ...]]:
    """The service_spend rows of the commands a claim started (service, token, command, at)."""
    return [
        (use.service_id, use.token[1], command_id, now)
        for command_id in claimed
        for use in gate.uses.get(command_id, ())
    ]


def _refusal(seen: Observation) -> str:
    """What the provider answered, as the invalid-token reason says it: `: the provider
    answered 401 at 14:02 UTC (Bad credentials)`; a bare time when no answer is recorded
    (a usage event's `tokenValid: false` without a status)."""
    found = answered(seen.detail)
    if found is None:
        return f" (reported at {_clock(seen.observed_at)})"
    status, message = found
    said = " ".join(message.split())[:MESSAGE_SHOWN]
    return f": the provider answered {status} at {_clock(seen.observed_at)}" + (
        f" ({said})" if said else ""
    )


def _json(value: Any) -> dict[str, Any] | None:
    if isinstance(value, str):
        value = json.loads(value)
    return value if isinstance(value, dict) else None


def _time(value: Any) -> datetime:
    """A timestamp as either driver gives it (SQLite: naive UTC text) as an aware one."""
    if isinstance(value, str):
        return datetime.fromisoformat(value).replace(tzinfo=UTC)
    assert isinstance(value, datetime)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _clock(moment: datetime, seconds: bool = False) -> str:
    """A time as a reason shows it: 14:32 UTC (the date too when it is not today's)."""
    moment = moment.astimezone(UTC)
    text = moment.strftime("%H:%M:%S" if seconds else "%H:%M") + " UTC"
    if moment.date() != datetime.now(UTC).date():
        text = moment.strftime("%Y-%m-%d ") + text
    return text


def _duration(seconds: int) -> str:
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds % size == 0:
            count = seconds // size
            return unit if count == 1 else f"{count} {unit}s"
    return f"{seconds} s"
