"""The dashboard: counts, what runs now, recent failures, unhealthy proxies."""

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


async def dashboard(request: Request) -> Response:
    """Counts, what runs now, recent failures, proxies whose last check failed."""
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
            runs_by_status=[
                (status.value, by_status.get(status.value, 0)) for status in CommandStatus
            ],
            running=list(running),
            failures=list(failures),
            unhealthy=list(unhealthy),
        )
