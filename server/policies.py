"""Rate-limit policies of services, overridable per profile link (issue 13).

A policy is a JSON object with camelCase keys, all optional:
`{"budget": {"requests": 5000, "windowSeconds": 3600}, "reserve": 100, "concurrency": 2,
"concurrencyScope": "service"|"token", "coolDownSeconds": 60, "probeIntervalSeconds": 300}`.
A link's keys override the service's key by key. The runner's gate reads the effective
policy at claim time (runner/gate.py); it is checked when it is saved (here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from server.errors import ErrorCode, InvalidInput, UserError
from server.validation import json_object_field

# Upper bounds: large enough for any provider's real figures, small enough to stay in a
# 32-bit column and in a timedelta.
COUNT_MAX = 2**31 - 1
WINDOW_MAX_SECONDS = 31 * 24 * 3600  # spends are counted over at most a month
SECONDS_MAX = 7 * 24 * 3600
SCOPES = ("service", "token")
INT_KEYS = {
    "reserve": COUNT_MAX,
    "concurrency": COUNT_MAX,
    "coolDownSeconds": SECONDS_MAX,
    "probeIntervalSeconds": SECONDS_MAX,
}
BUDGET_KEYS = {"requests": COUNT_MAX, "windowSeconds": WINDOW_MAX_SECONDS}
POLICY_KEYS = frozenset({"budget", "concurrencyScope", *INT_KEYS})


@dataclass(frozen=True, slots=True)
class Budget:
    """At most `requests` runs started in any `window_seconds`."""

    requests: int
    window_seconds: int


@dataclass(frozen=True, slots=True)
class ServicePolicy:
    """A checked policy; None: no such limit."""

    budget: Budget | None = None
    reserve: int = 0
    concurrency: int | None = None
    concurrency_scope: str = "service"
    cool_down_seconds: int | None = None
    probe_interval_seconds: int | None = None

    @property
    def limits_anything(self) -> bool:
        """Whether the gate has anything to hold a run for (a reserve alone does, with an
        observation; so does any other key but the probe interval)."""
        return bool(
            self.budget or self.reserve or self.concurrency or self.cool_down_seconds is not None
        )


def parse_policy(raw: Any, field: tuple[str, ...] = ("rateLimitPolicy",)) -> ServicePolicy:
    """The policy `raw` stands for; InvalidInput with the path of every bad key."""
    errors: list[UserError] = []
    if not isinstance(raw, dict):
        raise InvalidInput.one(field, "the policy must be a JSON object", ErrorCode.INVALID)
    for key in sorted(set(raw) - POLICY_KEYS):
        errors.append(_unknown(field, key, POLICY_KEYS))
    ints = {key: _int(raw, key, high, field, errors) for key, high in INT_KEYS.items()}
    budget = _budget(raw.get("budget"), (*field, "budget"), errors)
    scope = raw.get("concurrencyScope", "service")
    if scope not in SCOPES:
        errors.append(
            UserError(
                (*field, "concurrencyScope"),
                f"concurrencyScope must be one of {', '.join(SCOPES)}",
                ErrorCode.INVALID,
            )
        )
    if errors:
        raise InvalidInput(errors)
    return ServicePolicy(
        budget=budget,
        reserve=ints["reserve"] or 0,
        concurrency=ints["concurrency"],
        concurrency_scope=scope,
        cool_down_seconds=ints["coolDownSeconds"],
        probe_interval_seconds=ints["probeIntervalSeconds"],
    )


def policy_field(api_name: str) -> Callable[[Any], dict[str, Any]]:
    """A FieldSpec check: a bounded JSON object (server.validation), then a policy that
    parses; problems carry their path under `api_name`."""

    def check(raw: Any) -> dict[str, Any]:
        value = json_object_field(raw)
        parse_policy(value, (api_name,))
        return value

    return check


def effective_policy(
    service_policy: dict[str, Any] | None, link_policy: dict[str, Any] | None
) -> ServicePolicy:
    """The policy a profile's use of a service follows: the link's keys over the service's.
    Stored policies were checked when saved; one that no longer parses (saved before the
    rule) limits nothing rather than stopping every run."""
    merged = {**(service_policy or {}), **(link_policy or {})}
    try:
        return parse_policy(merged)
    except InvalidInput:
        return ServicePolicy()


def token_label(service_name: str, profile_name: str | None) -> str:
    """A token as wait reasons and the usage page name it: `github token (shared)`, or
    `github token of profile 'P'` for a profile's own."""
    if profile_name is None:
        return f"{service_name} token (shared)"
    return f"{service_name} token of profile {profile_name!r}"


def _unknown(field: tuple[str, ...], key: str, known: frozenset[str] | set[str]) -> UserError:
    return UserError(
        (*field, key),
        f"unknown key {key[:100]!r} (known: {', '.join(sorted(known))})",
        ErrorCode.INVALID,
    )


def _int(
    raw: dict[str, Any], key: str, high: int, field: tuple[str, ...], errors: list[UserError]
) -> int | None:
    value = raw.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        errors.append(UserError((*field, key), f"{key} must be an integer", ErrorCode.INVALID))
        return None
    low = 0 if key == "reserve" else 1
    if not low <= value <= high:
        errors.append(
            UserError(
                (*field, key),
                f"{key} must be between {low} and {high} (got {value})",
                ErrorCode.OUT_OF_RANGE,
            )
        )
        return None
    return value


def _budget(raw: Any, field: tuple[str, ...], errors: list[UserError]) -> Budget | None:
    if raw is None:
        return None
    if not isinstance(raw, dict):
        errors.append(
            UserError(
                field,
                'budget must be an object: {"requests": N, "windowSeconds": S}',
                ErrorCode.INVALID,
            )
        )
        return None
    for key in sorted(set(raw) - set(BUDGET_KEYS)):
        errors.append(_unknown(field, key, set(BUDGET_KEYS)))
    values = {}
    for key, high in BUDGET_KEYS.items():
        if key not in raw or raw[key] is None:
            errors.append(UserError((*field, key), f"budget.{key} is required", ErrorCode.REQUIRED))
            continue
        values[key] = _int(raw, key, high, field, errors)
    requests, window = values.get("requests"), values.get("windowSeconds")
    if requests is None or window is None:
        return None
    return Budget(requests, window)
