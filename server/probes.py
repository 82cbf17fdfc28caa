"""Probes: ask a service's provider for the budget of each of its tokens (the shared one and
every linked profile's own) and record what it answers as observations (`source='probe'`).

On demand (`probeService`) and on a schedule (`probeIntervalSeconds` of the service's
policy; `runner/schedules.py` runs it): a due probe is taken by moving `next_probe_at` on
with one conditional UPDATE, so two runners on one database never both run it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import httpx
from sqlalchemy import or_, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from server.broker import USAGE_TOPIC, Broker, UsageRecorded
from server.db import READ_ONLY
from server.errors import ErrorCode, InvalidInput
from server.events import log_event
from server.models import Profile, ProfileService, Service, ServiceUsage, UsageSource, utcnow
from server.providers import Observation, Provider, provider_for
from server.providers.common import DETAIL_MAX
from server.secretbox import SecretBox
from server.settings import Settings
from server.unit_of_work import announce

MASK = "[token]"
HISTORY_MAX = 2000  # observations of one token a usage history answers (the latest)
INTERVAL_KEY = "probeIntervalSeconds"


@dataclass(frozen=True, slots=True)
class ProbeTarget:
    """One token to ask about: the shared one (`profile_id` None) or a profile's own."""

    profile_id: int | None
    token: str


@dataclass(frozen=True, slots=True)
class ProbePlan:
    """What one probe of a service needs, read before any request goes out."""

    service_id: int
    name: str
    provider: Provider
    base_url: str
    targets: list[ProbeTarget]


def probe_interval(policy: dict[str, Any] | None) -> int | None:
    """The policy's `probeIntervalSeconds` (a positive integer), else None: never.
    (The policy as a whole is checked where it is saved, `server/policies.py`.)"""
    value = (policy or {}).get(INTERVAL_KEY)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        return None
    return value


def next_probe_after(policy: dict[str, Any] | None, now: datetime) -> datetime | None:
    """When the scheduled probe is next due after `now` (None: the policy asks for none)."""
    interval = probe_interval(policy)
    return None if interval is None else now + timedelta(seconds=interval)


def reschedule(service: Service, now: datetime | None = None) -> None:
    """A saved policy's probe is due at once (or never, without an interval)."""
    service.next_probe_at = (
        None if probe_interval(service.rate_limit_policy) is None else (now or utcnow())
    )


def mask_token(text: str, token: str) -> str:
    """`text` with the token (should a provider or a library quote it) masked."""
    return text.replace(token, MASK) if token else text


# -- planning --------------------------------------------------------------------------


async def plan_probe(
    session: AsyncSession, box: SecretBox, service_id: int, *, field: str = "id"
) -> ProbePlan:
    """The service's provider and tokens; a user error when it has neither."""
    service = await session.get(Service, service_id)
    if service is None:
        raise InvalidInput.one(field, "no such service", ErrorCode.NOT_FOUND)
    provider = provider_for(service.kind)
    if provider is None:
        raise InvalidInput.one(field, f"no provider for kind {service.kind!r}", ErrorCode.INVALID)
    targets = await probe_targets(session, box, service)
    if not targets:
        raise InvalidInput.one(
            field,
            f"service {service.name!r} has no token to probe (no shared token, and no linked "
            "profile has its own)",
            ErrorCode.INVALID,
        )
    base_url = service.base_url or provider.default_base_url
    return ProbePlan(service.id, service.name, provider, base_url, targets)


async def probe_targets(
    session: AsyncSession, box: SecretBox, service: Service
) -> list[ProbeTarget]:
    """The shared token (when set), then each linked profile's own token, by profile name."""
    targets = []
    if service.token_encrypted is not None:
        targets.append(ProbeTarget(None, box.decrypt(service.token_encrypted)))
    rows = await session.execute(
        select(ProfileService.profile_id, ProfileService.token_encrypted)
        .join(Profile, Profile.id == ProfileService.profile_id)
        .where(
            ProfileService.service_id == service.id,
            ProfileService.token_encrypted.is_not(None),
        )
        .order_by(Profile.name)
    )
    targets += [
        ProbeTarget(profile_id, box.decrypt(token)) for profile_id, token in rows.all() if token
    ]
    return targets


# -- asking ----------------------------------------------------------------------------


async def observe(
    provider: Provider, base_url: str, token: str, client: httpx.AsyncClient
) -> Observation:
    """One provider answer; a timeout or a failure is an observation with a detail and no
    figures (never an exception, never the token)."""
    try:
        found = await provider.probe(base_url, token, client)
    except httpx.TimeoutException:
        found = Observation(detail=f"no answer within {client.timeout.read or 0:g}s")
    except httpx.HTTPError as exc:
        found = Observation(detail=f"request failed: {type(exc).__name__}: {exc}"[:DETAIL_MAX])
    if found.detail is None:
        return found
    return Observation(
        remaining=found.remaining,
        limit=found.limit,
        reset_at=found.reset_at,
        token_valid=found.token_valid,
        detail=mask_token(found.detail, token),
    )


async def run_plan(plan: ProbePlan, settings: Settings) -> list[tuple[ProbeTarget, Observation]]:
    """Ask the provider about every token of the plan, a few at a time."""
    gate = asyncio.Semaphore(settings.probe_concurrency)

    async def one(target: ProbeTarget) -> tuple[ProbeTarget, Observation]:
        async with gate:
            return target, await observe(plan.provider, plan.base_url, target.token, client)

    timeout = httpx.Timeout(settings.probe_timeout)
    async with httpx.AsyncClient(timeout=timeout, follow_redirects=False) as client:
        return list(await asyncio.gather(*(one(target) for target in plan.targets)))


def record_observations(
    session: AsyncSession,
    service_id: int,
    results: list[tuple[ProbeTarget, Observation]],
    now: datetime | None = None,
) -> list[ServiceUsage]:
    """Add one `probe` observation per token asked."""
    observed_at = now or utcnow()
    rows = [
        ServiceUsage(
            service_id=service_id,
            profile_id=target.profile_id,
            remaining=found.remaining,
            limit=found.limit,
            reset_at=found.reset_at,
            token_valid=found.token_valid,
            detail=found.detail,
            source=UsageSource.PROBE,
            observed_at=observed_at,
        )
        for target, found in results
    ]
    session.add_all(rows)
    return rows


async def probe_service(
    session: AsyncSession,
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    box: SecretBox,
    service_id: int,
) -> Service:
    """Probe every token of the service now and record the answers (`probeService`).

    The tokens are read through a session of their own and the requests go out before
    `session` is first used: the unit of work must not hold a write lock for seconds.
    """
    async with sessions() as reading:
        await reading.connection(execution_options=READ_ONLY)
        plan = await plan_probe(reading, box, service_id)
    results = await run_plan(plan, settings)
    _log_failures(plan, results)
    record_observations(session, plan.service_id, results)
    announce(session, USAGE_TOPIC, UsageRecorded(plan.service_id))
    await session.flush()
    return await session.get_one(Service, plan.service_id)


def _log_failures(plan: ProbePlan, results: list[tuple[ProbeTarget, Observation]]) -> None:
    for target, found in results:
        if found.token_valid is False or (found.remaining is None and found.detail):
            log_event(
                "probe_failed",
                level="info",
                service=plan.name,
                profile=target.profile_id,
                detail=found.detail,
            )


# -- the schedule ----------------------------------------------------------------------


async def due_probes(session: AsyncSession, now: datetime) -> tuple[list[int], datetime | None]:
    """The services whose probe is due at `now` (a policy with an interval but no due time
    yet, saved before probes existed or written past `update_service`, is due now), and the
    earliest due time after `now`."""
    rows = await session.execute(
        select(Service.id, Service.rate_limit_policy, Service.next_probe_at)
    )
    due, later = [], None
    for service_id, policy, at in rows.all():
        if at is None:
            if probe_interval(policy) is not None:
                due.append(service_id)
        elif at <= now:
            due.append(service_id)
        elif later is None or at < later:
            later = at
    return due, later


async def take_due_probe(session: AsyncSession, service_id: int, now: datetime) -> bool:
    """Take the service's due probe: move its due time on by its interval (or clear it when
    the policy no longer asks) in one conditional UPDATE. True for exactly one taker of a
    due probe, however many runners race for it (the loser's WHERE no longer matches the
    row the winner moved on)."""
    policy = await session.scalar(select(Service.rate_limit_policy).where(Service.id == service_id))
    result = await session.execute(
        update(Service)
        .where(
            Service.id == service_id,
            or_(Service.next_probe_at <= now, Service.next_probe_at.is_(None)),
        )
        .values(next_probe_at=next_probe_after(policy, now))
    )
    return bool(getattr(result, "rowcount", 0)) and probe_interval(policy) is not None


async def run_scheduled_probe(
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    box: SecretBox,
    service_id: int,
    broker: Broker | None = None,
) -> None:
    """A taken probe: plan, ask, record, then tell `broker` (a service left without provider
    or tokens is skipped with an INFO line; it is tried again at its next due time)."""
    try:
        async with sessions() as reading:
            await reading.connection(execution_options=READ_ONLY)
            plan = await plan_probe(reading, box, service_id)
    except InvalidInput as exc:
        log_event("probe_skipped", service=service_id, reason=str(exc))
        return
    results = await run_plan(plan, settings)
    _log_failures(plan, results)
    async with sessions() as session, session.begin():
        if await session.get(Service, service_id) is None:  # deleted meanwhile
            return
        record_observations(session, service_id, results)
    if broker is not None:
        broker.publish(USAGE_TOPIC, UsageRecorded(service_id))
