"""What is known of services' token budgets, read for the usage page and GraphQL (issue 13):
each token's latest observation, its history, Corral's count since, the policy in effect, and
the commands the gate holds for it.

A service has a shared token and each linked profile may have its own; a token is keyed
`(service_id, profile_id)` with `profile_id` None for the shared one (as `service_usage` and
`service_spend` key their rows).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import and_, func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession

from server.models import (
    Command,
    CommandService,
    CommandStatus,
    Profile,
    ProfileService,
    Service,
    ServiceSpend,
    ServiceUsage,
)
from server.policies import ServicePolicy, effective_policy, token_label
from server.probes import HISTORY_MAX

CHART_HOURS = 24
WAITING_SHOWN = 25  # waiting commands listed per service on the usage page

TokenKey = tuple[int, int | None]
Point = tuple[datetime, int | None, int | None]  # observed_at, remaining, limit


@dataclass(slots=True)
class TokenUsage:
    """One token of a service: its latest observation, Corral's count of runs started with it
    since, the policy its runs follow, its last 24 h, and the commands waiting on it."""

    service: Service
    profile: Profile | None
    policy: ServicePolicy
    latest: ServiceUsage | None = None
    spent_since: int = 0
    points: list[Point] = field(default_factory=list)
    waiting: list[Command] = field(default_factory=list)

    @property
    def key(self) -> TokenKey:
        return (self.service.id, None if self.profile is None else self.profile.id)

    @property
    def label(self) -> str:
        """As the gate's reasons name it: `github token of profile 'P'`."""
        return token_label(self.service.name, None if self.profile is None else self.profile.name)


@dataclass(slots=True)
class ServiceUsageView:
    """A service's tokens, and the commands waiting on the service as a whole (its cap)."""

    service: Service
    tokens: list[TokenUsage]
    waiting: list[Command] = field(default_factory=list)


async def latest_observations(
    session: AsyncSession, service_ids: Iterable[int]
) -> dict[TokenKey, ServiceUsage]:
    """The latest observation of every token of these services."""
    ids = list(service_ids)
    latest = (
        select(func.max(ServiceUsage.id).label("last_id"))
        .where(ServiceUsage.service_id.in_(ids))
        .group_by(ServiceUsage.service_id, ServiceUsage.profile_id)
        .subquery()
    )
    rows = await session.scalars(
        select(ServiceUsage).join(latest, ServiceUsage.id == latest.c.last_id)
    )
    return {(row.service_id, row.profile_id): row for row in rows}


async def history_since(
    session: AsyncSession, service_ids: list[int], since: datetime
) -> dict[int, list[tuple[Profile | None, list[Point]]]]:
    """Each service's observations since `since`, per token (the shared one first, then
    profiles by name), oldest first, at most HISTORY_MAX a token (the latest)."""
    numbered = (
        select(
            ServiceUsage.service_id,
            ServiceUsage.profile_id,
            ServiceUsage.observed_at,
            ServiceUsage.remaining,
            ServiceUsage.limit,
            func.row_number()
            .over(
                partition_by=(ServiceUsage.service_id, ServiceUsage.profile_id),
                order_by=ServiceUsage.id.desc(),
            )
            .label("nth"),
        )
        .where(ServiceUsage.service_id.in_(service_ids), ServiceUsage.observed_at >= since)
        .subquery()
    )
    stmt = (
        select(numbered, Profile)
        .outerjoin(Profile, Profile.id == numbered.c.profile_id)
        .where(numbered.c.nth <= HISTORY_MAX)
        .order_by(
            numbered.c.service_id,
            Profile.name.is_not(None),
            Profile.name,
            numbered.c.observed_at,
        )
    )
    tokens: dict[int, dict[int | None, tuple[Profile | None, list[Point]]]] = {}
    for row in (await session.execute(stmt)).all():
        service_id, profile_id, observed_at, remaining, limit, _nth, profile = row
        entry = tokens.setdefault(service_id, {}).setdefault(profile_id, (profile, []))
        entry[1].append((observed_at, remaining, limit))
    return {key: list(value.values()) for key, value in tokens.items()}


async def spent_since(
    session: AsyncSession, observed: dict[TokenKey, ServiceUsage]
) -> dict[TokenKey, int]:
    """Corral's count of runs started with each token since its latest observation."""
    if not observed:
        return {}
    conditions = [
        and_(
            ServiceSpend.service_id == service_id,
            ServiceSpend.profile_id.is_(None)
            if profile_id is None
            else ServiceSpend.profile_id == profile_id,
            ServiceSpend.started_at > row.observed_at,
        )
        for (service_id, profile_id), row in observed.items()
    ]
    rows = await session.execute(
        select(ServiceSpend.service_id, ServiceSpend.profile_id, func.count())
        .where(or_(*conditions))
        .group_by(ServiceSpend.service_id, ServiceSpend.profile_id)
    )
    return {(service_id, profile_id): int(count) for service_id, profile_id, count in rows.all()}


async def waiting_commands(session: AsyncSession, service_ids: list[int]) -> list[Command]:
    """WAITING commands that use these services and have a reason, oldest first."""
    rows = await session.scalars(
        select(Command)
        .where(
            Command.id.in_(
                select(CommandService.command_id).where(CommandService.service_id.in_(service_ids))
            ),
            Command.status == CommandStatus.WAITING,
            Command.wait_reason.is_not(None),
        )
        .order_by(Command.created_at, Command.id)
        .limit(WAITING_SHOWN * max(len(service_ids), 1))
    )
    return list(rows)


async def services_usage(
    session: AsyncSession, services: list[Service], now: datetime
) -> list[ServiceUsageView]:
    """The usage page's figures for these services: every token that is set or was seen
    (the shared one first, then profiles' own by name), in a constant number of reads."""
    ids = [service.id for service in services]
    links = await session.execute(
        select(ProfileService, Profile)
        .join(Profile, Profile.id == ProfileService.profile_id)
        .where(ProfileService.service_id.in_(ids))
        .order_by(Profile.name)
    )
    by_service: dict[int, list[tuple[ProfileService, Profile]]] = defaultdict(list)
    for link, profile in links.all():
        by_service[link.service_id].append((link, profile))
    observed = await latest_observations(session, ids)
    spent = await spent_since(session, observed)
    history = await history_since(session, ids, now - timedelta(hours=CHART_HOURS))
    waiting = await waiting_commands(session, ids)
    views = []
    for service in services:
        tokens = _tokens_of(service, by_service[service.id], observed)
        for token in tokens:
            token.latest = observed.get(token.key)
            token.spent_since = spent.get(token.key, 0)
        _attach_history(tokens, history.get(service.id, []))
        views.append(_with_waiting(ServiceUsageView(service, tokens), waiting))
    return views


def _tokens_of(
    service: Service,
    links: list[tuple[ProfileService, Profile]],
    observed: dict[TokenKey, ServiceUsage],
) -> list[TokenUsage]:
    tokens = []
    if service.token_encrypted is not None or (service.id, None) in observed:
        tokens.append(TokenUsage(service, None, effective_policy(service.rate_limit_policy, None)))
    for link, profile in links:
        if link.token_encrypted is None and (service.id, profile.id) not in observed:
            continue  # this profile's runs use the shared token
        policy = effective_policy(service.rate_limit_policy, link.rate_limit_policy)
        tokens.append(TokenUsage(service, profile, policy))
    return tokens


def _attach_history(
    tokens: list[TokenUsage], history: list[tuple[Profile | None, list[Point]]]
) -> None:
    by_profile = {None if profile is None else profile.id: points for profile, points in history}
    for token in tokens:
        token.points = by_profile.get(token.key[1], [])


def _with_waiting(view: ServiceUsageView, waiting: list[Command]) -> ServiceUsageView:
    """Each waiting command whose reason names one of the view's tokens goes to that token;
    one whose reason names the service's concurrency cap (`github: 2 of 2 running`) goes to
    the service."""
    for command in waiting:
        reason = command.wait_reason or ""
        token = next((t for t in view.tokens if reason.startswith(t.label + ":")), None)
        if token is None:
            token = next((t for t in view.tokens if reason.startswith(t.label + " ")), None)
        if token is not None:
            if len(token.waiting) < WAITING_SHOWN:
                token.waiting.append(command)
        elif reason.startswith(view.service.name + ":") and len(view.waiting) < WAITING_SHOWN:
            view.waiting.append(command)
    return view
