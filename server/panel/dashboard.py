"""The dashboard: counts, what runs now, what waits and why, recent failures, unhealthy
proxies; each count links to its list (filtered where the list can be)."""

from __future__ import annotations

from sqlalchemy import func, select
from starlette.requests import Request
from starlette.responses import Response

from server.models import (
    Command,
    CommandStatus,
    Profile,
    Proxy,
    Service,
)
from server.panel.common import (
    PAGE_SIZE,
    RECENT,
    reading,
    render_view,
)

# --- dashboard -------------------------------------------------------------------------
FAILED_STATUSES = (CommandStatus.FAILED.value, CommandStatus.TIMED_OUT.value)
WAITING_STATUSES = (CommandStatus.QUEUED.value, CommandStatus.WAITING.value)
# The list page each count links to.
COUNT_LINKS = {"Profiles": "/profiles", "Services": "/services", "Proxies": "/proxies"}


async def dashboard(request: Request) -> Response:
    """Counts, what runs now, what waits (oldest first) and why, recent failures, proxies
    whose last check failed."""
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
            .where(Command.status == CommandStatus.RUNNING.value)
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
            runs_by_status=[
                (status.value, by_status.get(status.value, 0)) for status in CommandStatus
            ],
            running=list(running),
            waiting=list(waiting),
            waiting_total=sum(by_status.get(status, 0) for status in WAITING_STATUSES),
            failures=list(failures),
            unhealthy=list(unhealthy),
        )
