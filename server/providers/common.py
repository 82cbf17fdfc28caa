"""What every provider reads the same way: the observation, rate-limit answers, durations."""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import httpx

DETAIL_MAX = 300  # characters of a provider's message kept in an observation
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


@dataclass(frozen=True, slots=True)
class Observation:
    """A token's budget as a provider answered it; all None when it gave no figures."""

    remaining: int | None = None
    limit: int | None = None
    reset_at: datetime | None = None
    token_valid: bool | None = None
    detail: str | None = None


def header_int(response: httpx.Response, name: str) -> int | None:
    """A non-negative integer header, or None (missing or malformed)."""
    value = response.headers.get(name, "").strip()
    return int(value) if value.isdigit() and len(value) <= 18 else None


def epoch_time(seconds: int | None) -> datetime | None:
    """A Unix time (GitHub's `reset`) as an aware UTC datetime; None when out of range."""
    if seconds is None:
        return None
    try:
        return datetime.fromtimestamp(seconds, UTC)
    except (OverflowError, OSError, ValueError):
        return None


def parse_duration(text: str) -> float | None:
    """OpenAI's reset durations (`6m0s`, `1.5s`, `20ms`, `1h2m3s`) in seconds, or None."""
    text = text.strip()
    if not text:
        return None
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(number + unit for number, unit in parts) != text:
        return None
    return sum(float(number) * _UNIT_SECONDS[unit] for number, unit in parts)


def after(seconds: float | None, now: datetime) -> datetime | None:
    """`now` plus a number of seconds (None stays None; absurd values too)."""
    if seconds is None or not 0 <= seconds <= 10 * 366 * 86400:
        return None
    return now + timedelta(seconds=seconds)


def retry_after(response: httpx.Response, now: datetime) -> datetime | None:
    """When a rate-limited answer says to come back (`retry-after`: seconds or an HTTP date)."""
    value = response.headers.get("retry-after", "").strip()
    if not value:
        return None
    if value.isdigit():
        return after(float(value), now)
    try:
        from email.utils import parsedate_to_datetime

        return parsedate_to_datetime(value).astimezone(UTC)
    except (TypeError, ValueError, IndexError):
        return None


def is_rate_limited(response: httpx.Response) -> bool:
    """429, or a 403 that says it is about the rate limit (GitHub's primary and secondary
    limits answer 403 with `x-ratelimit-remaining: 0` or a `retry-after`)."""
    if response.status_code == 429:
        return True
    if response.status_code != 403:
        return False
    return header_int(response, "x-ratelimit-remaining") == 0 or "retry-after" in response.headers


# An observation's detail starts with `HTTP <status>` when it records a non-200 answer (a
# probe's, or a run's request a usage event reported): the gate reads the status off it.
_ANSWER = re.compile(r"HTTP (\d{3})\b:? ?(.*)", re.DOTALL)
RATE_LIMIT_STATUSES = frozenset({403, 429})


def answer_detail(status: int, message: str = "") -> str:
    """An observation's detail for an HTTP answer: `HTTP 429: rate limit exceeded`."""
    return f"HTTP {status}: {message}"[:DETAIL_MAX] if message else f"HTTP {status}"


def answered(detail: str | None) -> tuple[int, str] | None:
    """(status, message) of the HTTP answer an observation's detail records, else None."""
    found = _ANSWER.fullmatch(detail or "")
    return None if found is None else (int(found.group(1)), found.group(2))


def is_rate_limit_answer(remaining: int | None, detail: str | None) -> bool:
    """Whether an observation records a real rate-limit answer (a 429, or a 403 that left
    none), not merely a budget that a count or a plain answer saw reach zero."""
    status = answered(detail)
    return remaining == 0 and status is not None and status[0] in RATE_LIMIT_STATUSES


def provider_message(response: httpx.Response) -> str:
    """`HTTP 401: Bad credentials` from a JSON `message` (GitHub) or `error.message`
    (OpenAI), else the status alone. The caller masks the token in it."""
    message = ""
    try:
        body = response.json()
    except ValueError:
        body = None
    if isinstance(body, dict):
        error = body.get("error")
        found = body.get("message") or (error.get("message") if isinstance(error, dict) else None)
        if isinstance(found, str):
            message = " ".join(found.split())
    return answer_detail(response.status_code, message)


def unauthorized(response: httpx.Response) -> Observation:
    """A 401: the token is not accepted."""
    return Observation(token_valid=False, detail=provider_message(response))
