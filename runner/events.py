"""`::corral::{json}` events from a child's stdout, checked in full before the log store sees
them: whatever a child prints, an event either fits every column it goes to or is refused
with a reason (shown in its own command's log), so it can never fail a flush that carries
other commands' lines and states too (issue 10).
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from server.models import CommandEvent
from server.providers.common import answer_detail

EVENT_PREFIX = "::corral::"
MAX_EVENT_CHARS = 16 * 1024  # the JSON text after the prefix
MAX_EVENT_DEPTH = 8  # objects and arrays inside one another, the event itself included
MAX_EVENTS_PER_ATTEMPT = 10_000  # more are refused: each costs rows of its own
TYPE_MAX: int = getattr(CommandEvent.__table__.c.type.type, "length", 64)  # String(64)
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# ServiceUsage's counters are INTEGER columns: 32 bits on PostgreSQL.
COUNTER_MAX = 2**31 - 1
USAGE_COUNTERS = ("units", "remaining", "limit")
RATE_LIMITED, UNAUTHORIZED = 429, 401  # a usage event's `status`: what it says of the token


class EventRejected(ValueError):
    """An event that cannot be stored; its message says why, for the command's log."""


@dataclass(frozen=True, slots=True)
class UsageReport:
    """A usage event's observation of one of the command's own services."""

    service_id: int
    units: int | None
    remaining: int | None
    limit: int | None
    reset_at: datetime | None
    token_valid: bool | None
    # `HTTP 429` when the run's request was refused: what the gate's cool-down and its
    # invalid-token reason read (server/providers/common.answered).
    detail: str | None = None


@dataclass(frozen=True, slots=True)
class ChildEvent:
    """A checked event: every value fits the columns it is stored in."""

    type: str
    data: dict[str, Any]
    usage: UsageReport | None = None


def parse_event(payload: str, service_ids: dict[str, int]) -> ChildEvent | None:
    """The event in `payload` (the text after the prefix); None when it is no event at all
    (not a JSON object with a string `type`: a plain log line). Raises EventRejected when
    it is an event that cannot be stored. `service_ids`: the command's own services."""
    if len(payload) > MAX_EVENT_CHARS:
        raise EventRejected(f"it is {len(payload)} characters long (at most {MAX_EVENT_CHARS})")
    try:
        data = json.loads(payload)
    except RecursionError:
        raise EventRejected(f"it is nested too deeply (at most {MAX_EVENT_DEPTH} levels)") from None
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("type"), str):
        return None
    _check_values(data)
    kind: str = data["type"]
    if not kind or len(kind) > TYPE_MAX:
        raise EventRejected(f"its type must be 1 to {TYPE_MAX} characters")
    usage = _usage(data, service_ids) if kind == "usage" else None
    return ChildEvent(kind, data, usage)


def _check_values(data: dict[str, Any]) -> None:
    """Depth, integers (64-bit), floats (finite) and strings (storable text) of the whole
    event, without recursion (a deep one must not cost the stack)."""
    stack: list[tuple[Any, int, str]] = [(data, 1, "event")]
    while stack:
        value, depth, where = stack.pop()
        if isinstance(value, dict | list):
            if depth > MAX_EVENT_DEPTH:
                raise EventRejected(f"it is nested too deeply (at most {MAX_EVENT_DEPTH} levels)")
            items = value.items() if isinstance(value, dict) else enumerate(value)
            for key, item in items:
                if isinstance(key, str):
                    _check_text(key, where)
                stack.append((item, depth + 1, key if isinstance(key, str) else where))
        elif isinstance(value, str):
            _check_text(value, where)
        elif isinstance(value, bool) or value is None:
            continue
        elif isinstance(value, int):
            if not INT64_MIN <= value <= INT64_MAX:
                raise EventRejected(f"{where} is out of range (a 64-bit integer at most)")
        elif isinstance(value, float) and not math.isfinite(value):
            raise EventRejected(f"{where} is not a finite number")


def _check_text(text: str, where: str) -> None:
    if "\x00" in text:
        raise EventRejected(f"{where} holds a NUL character")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        raise EventRejected(f"{where} holds an unpaired surrogate (\\ud800-\\udfff)") from None


def _usage(data: dict[str, Any], service_ids: dict[str, int]) -> UsageReport:
    """A usage event may only speak of one of the command's own services."""
    service = data.get("service")
    if not isinstance(service, str) or not service:
        raise EventRejected("a usage event needs a service (one of the command's own)")
    service_id = service_ids.get(service.lower())
    if service_id is None:
        raise EventRejected(f"service {service[:100]!r} is not one of this command's services")
    counters = {name: _counter(data, name) for name in USAGE_COUNTERS}
    valid = data.get("tokenValid")
    if valid is not None and not isinstance(valid, bool):
        raise EventRejected("tokenValid must be true, false or null")
    status = _status(data.get("status"))
    remaining = counters["remaining"]
    if status == RATE_LIMITED and remaining is None:  # a 429 says: none left until the reset
        remaining = 0
    if status == UNAUTHORIZED and valid is None:
        valid = False
    return UsageReport(
        service_id=service_id,
        units=counters["units"],
        remaining=remaining,
        limit=counters["limit"],
        reset_at=_reset_at(data.get("resetAt")),
        token_valid=valid,
        detail=None if status is None or status < 400 else answer_detail(status),
    )


def _status(value: Any) -> int | None:
    """The HTTP status the child's request got (`status`), when the event gives one."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 100 <= value <= 599:
        raise EventRejected("status must be an HTTP status code (100 to 599) or null")
    return value


def _counter(data: dict[str, Any], name: str) -> int | None:
    value = data.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise EventRejected(f"{name} must be an integer or null")
    if not 0 <= value <= COUNTER_MAX:
        raise EventRejected(f"{name} is out of range (0 to {COUNTER_MAX})")
    return value


def _reset_at(value: Any) -> datetime | None:
    if value is None:
        return None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
            if parsed.tzinfo is not None:
                return parsed.astimezone(UTC)  # out of range near year 1 or 9999
        except (ValueError, OverflowError):
            pass
    raise EventRejected("resetAt must be an ISO 8601 time with a time zone, or null")
