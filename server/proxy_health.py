"""Proxy health over time (issue 13): each check's history row, failures in a row, the flag,
the schedule's due times (taken exactly once across runners), and the hold reasons."""

from __future__ import annotations

import random
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import delete, func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from server.models import Proxy, ProxyCheck
from xray.health import HealthResult

PROXY_CHECKS_KEPT = 50  # history rows per proxy; older ones are pruned as new ones come
JITTER = 0.1  # scheduled checks spread over ±10% of the interval
REASON_ERROR_MAX = 200


class CheckTrigger:
    SCHEDULE = "schedule"
    MANUAL = "manual"


def is_flagged(proxy: Proxy, flag_after: int) -> bool:
    """Whether the proxy failed its last `flag_after` checks (or more) in a row."""
    return (proxy.health_failures or 0) >= flag_after


async def add_check(
    session: AsyncSession, proxy: Proxy, result: HealthResult, trigger: str, at: datetime
) -> None:
    """Count the outcome (failures in a row) and keep it in the bounded history."""
    proxy.health_failures = 0 if result.ok else (proxy.health_failures or 0) + 1
    session.add(
        ProxyCheck(
            proxy_id=proxy.id,
            checked_at=at,
            ok=result.ok,
            latency_ms=result.latency_ms,
            exit_ip=result.exit_ip,
            error=result.error,
            trigger=trigger,
        )
    )
    await session.flush()
    oldest_kept = (
        select(ProxyCheck.id)
        .where(ProxyCheck.proxy_id == proxy.id)
        .order_by(ProxyCheck.id.desc())
        .offset(PROXY_CHECKS_KEPT - 1)
        .limit(1)
        .scalar_subquery()
    )
    await session.execute(
        delete(ProxyCheck).where(ProxyCheck.proxy_id == proxy.id, ProxyCheck.id < oldest_kept)
    )


async def recent_checks(session: AsyncSession, proxy_id: int, last: int) -> list[ProxyCheck]:
    """The proxy's last `last` checks, newest first."""
    found = await session.scalars(
        select(ProxyCheck)
        .where(ProxyCheck.proxy_id == proxy_id)
        .order_by(ProxyCheck.id.desc())
        .limit(last)
    )
    return list(found)


# --- the schedule ----------------------------------------------------------------------


def next_check_time(now: datetime, interval: float) -> datetime:
    """When a proxy checked (or first seen) now is checked again: the interval, ±10%."""
    spread = random.uniform(1 - JITTER, 1 + JITTER)  # noqa: S311 - jitter, not cryptography
    return now + timedelta(seconds=interval * spread)


def _due(now: datetime, interval: float) -> object:
    """Due proxies: their time has come, or (never scheduled) created an interval ago."""
    first_due = now - timedelta(seconds=interval)
    return (Proxy.next_check_at <= now) | (
        Proxy.next_check_at.is_(None) & (Proxy.created_at <= first_due)
    )


async def due_proxies(
    session: AsyncSession, now: datetime, interval: float, limit: int
) -> list[int]:
    """Ids of up to `limit` proxies whose scheduled check is due, the most overdue first."""
    found = await session.scalars(
        select(Proxy.id)
        .where(_due(now, interval))  # type: ignore[arg-type]
        .order_by(Proxy.next_check_at.is_not(None), Proxy.next_check_at, Proxy.id)
        .limit(limit)
    )
    return list(found)


async def take_due_check(
    session: AsyncSession, proxy_id: int, now: datetime, interval: float
) -> bool:
    """Move the proxy's due time on, only if it is still due: of two runners that saw it
    due, one conditional UPDATE wins and checks it, the other skips it."""
    taken = await session.execute(
        update(Proxy)
        .where(Proxy.id == proxy_id, _due(now, interval))  # type: ignore[arg-type]
        .values(next_check_at=next_check_time(now, interval))
        .execution_options(synchronize_session=False)
    )
    return bool(getattr(taken, "rowcount", 0))


async def next_due_at(session: AsyncSession, interval: float) -> datetime | None:
    """When the next scheduled check falls due (None: no proxy)."""
    scheduled, first_created = (
        await session.execute(
            select(
                func.min(Proxy.next_check_at),
                select(func.min(Proxy.created_at))
                .where(Proxy.next_check_at.is_(None))
                .scalar_subquery(),
            )
        )
    ).one()
    candidates: list[datetime] = []
    if scheduled is not None:
        candidates.append(_aware(scheduled))
    if first_created is not None:
        candidates.append(_aware(first_created) + timedelta(seconds=interval))
    return min(candidates, default=None)


def _aware(value: datetime) -> datetime:
    """An aggregate's timestamp (SQLite gives it back naive, in UTC)."""
    if isinstance(value, str):  # SQLite's min() of a column answers its text
        value = datetime.fromisoformat(value)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


async def clamp_due_times(session: AsyncSession, now: datetime, interval: float) -> None:
    """Due times set under a longer interval come no later than one new interval away."""
    latest = now + timedelta(seconds=interval * (1 + JITTER))
    await session.execute(
        update(Proxy)
        .where(Proxy.next_check_at > latest)
        .values(next_check_at=next_check_time(now, interval))
        .execution_options(synchronize_session=False)
    )


# --- holding runs on flagged proxies ----------------------------------------------------


@dataclass(frozen=True)
class FlaggedProxy:
    id: int
    name: str
    failures: int
    error: str | None


def hold_reason(flagged: FlaggedProxy) -> str:
    """What a command held by this flagged proxy waits for, in words."""
    latest = (flagged.error or "no answer").strip()
    if len(latest) > REASON_ERROR_MAX:
        latest = latest[: REASON_ERROR_MAX - 1] + "…"
    return (
        f"proxy {flagged.name!r} failed its last {flagged.failures} checks "
        f"(latest: {latest}); held until a check passes"
    )


def held_proxies(
    flagged: Iterable[FlaggedProxy], via_links: Iterable[tuple[int, int]]
) -> dict[int, str]:
    """Proxy id -> why a command through it is held: the flagged proxies, and every proxy
    whose chain (`via`, as (proxy id, via id) pairs) reaches a flagged one."""
    reasons = {proxy.id: hold_reason(proxy) for proxy in flagged}
    if not reasons:
        return {}
    via = dict(via_links)
    for start in via:
        current: int | None = start
        seen: set[int] = set()
        while current is not None and current not in seen:
            if current in reasons:
                reasons[start] = reasons[current]
                break
            seen.add(current)
            current = via.get(current)
    return reasons
