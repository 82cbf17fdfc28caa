"""The dashboard: counts, what runs now, what waits and why, recent failures, unhealthy
proxies; each count links to its list (filtered where the list can be)."""

from __future__ import annotations

from sqlalchemy import func, or_, select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request
from starlette.responses import Response

from server.models import (
    Command,
    CommandStatus,
    Profile,
    Proxy,
    Service,
    ServiceUsage,
)
from server.panel.common import (
    PAGE_SIZE,
    RECENT,
    reading,
    render_view,
)
from server.runners import list_runners

# --- dashboard -------------------------------------------------------------------------
FAILED_STATUSES = (CommandStatus.FAILED, CommandStatus.TIMED_OUT)
WAITING_STATUSES = (CommandStatus.QUEUED, CommandStatus.WAITING)
NEAR_LIMIT = 0.1  # a token with at most this share of its budget left is "near its limit"
# The list page each count links to.
COUNT_LINKS = {"Profiles": "/profiles", "Services": "/services", "Proxies": "/proxies"}


async def tokens_near_limit(session: AsyncSession) -> list[tuple[ServiceUsage, str, str | None]]:
    """The latest budget seen of each token (a service's shared one, a profile's own) that is
    nearly spent or was refused, with the service's and the profile's names."""
    latest = (
        select(func.max(ServiceUsage.id).label("last_id"))
        .group_by(ServiceUsage.service_id, ServiceUsage.profile_id)
        .subquery()
    )
    rows = await session.execute(
        select(ServiceUsage, Service.name, Profile.name)
        .join(latest, ServiceUsage.id == latest.c.last_id)
        .join(Service, Service.id == ServiceUsage.service_id)
        .outerjoin(Profile, Profile.id == ServiceUsage.profile_id)
        .where(
            or_(
                ServiceUsage.token_valid.is_(False),
                ServiceUsage.remaining <= ServiceUsage.limit * NEAR_LIMIT,
            )
        )
        .order_by(ServiceUsage.remaining, Service.name_key)
        .limit(PAGE_SIZE)
    )
    return [(usage, service, profile) for usage, service, profile in rows]


async def dashboard(request: Request) -> Response:
    """Counts, the runners (flagging those whose heartbeat stopped), what runs now, what
    waits (oldest first) and why, recent failures, proxies whose last check failed."""
    async with reading(request) as session:
        counts = {
            label: int(await session.scalar(select(func.count()).select_from(model)) or 0)
            for label, model in (("Profiles", Profile), ("Services", Service), ("Proxies", Proxy))
        }
        by_status = dict(
            (
                await session.execute(select(Command.status, func.count()).group_by(Command.status))
            ).all()
        )
        running = await session.scalars(
            select(Command)
            .where(Command.status == CommandStatus.RUNNING)
            .order_by(Command.started_at, Command.id)
            .limit(PAGE_SIZE)
        )
        waiting = await session.scalars(
            select(Command)
            .where(Command.status.in_(WAITING_STATUSES))
            .order_by(Command.created_at, Command.id)
            .limit(PAGE_SIZE)
        )
        failures = await session.scalars(
            select(Command)
            .where(Command.status.in_(FAILED_STATUSES))
            .order_by(Command.id.desc())
            .limit(RECENT)
        )
        unhealthy = await session.scalars(
            select(Proxy).where(Proxy.health_ok.is_(False)).order_by(Proxy.name_key)
        )
        return render_view(
            request,
            "dashboard.html",
            "_dashboard.html",
            counts=counts,
            count_links=COUNT_LINKS,
            runs_by_status=[(status.value, by_status.get(status, 0)) for status in CommandStatus],
            running=list(running),
            waiting=list(waiting),
            waiting_total=sum(by_status.get(status, 0) for status in WAITING_STATUSES),
            failures=list(failures),
            unhealthy=list(unhealthy),
            near_limit=await tokens_near_limit(session),
            runners=await list_runners(session, request.app.state.services.settings.lease_seconds),
        )
