"""The usage page (issue 13): per service and token, the budget last seen, its reset, where
it came from and how old it is, the policy in effect, the last 24 h as a chart, and what the
gate holds for it; "Probe now" for admins.

    GET  /usage                    every service (paged), or `?service=ID` one of them
    POST /usage/{id}/probe         probeService (admins; audited as the mutation)
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy import select
from starlette.requests import Request
from starlette.responses import Response

from server.errors import InvalidInput
from server.ids import encode_global_id as encode_id
from server.models import Service, utcnow
from server.panel.common import (
    PAGE_SIZE,
    Change,
    app_services,
    apply_change,
    not_found,
    page_number,
    paged,
    path_id,
    reading,
    redirect_with_flash,
    refuse_viewer,
    render_view,
)
from server.panel.usage_chart import Chart, remaining_chart
from server.policies import ServicePolicy
from server.probes import probe_service
from server.usage import CHART_HOURS, ServiceUsageView, TokenUsage, services_usage


@dataclass(frozen=True, slots=True)
class TokenRow:
    """A token as the page shows it."""

    token: TokenUsage
    chart: Chart
    resets_in: str | None
    age: str | None
    policy: list[str]


def relative(moment: datetime | None, now: datetime) -> str | None:
    """`in 12 min`, `3 h ago`, `now`: how far `moment` is from `now`, roughly."""
    if moment is None:
        return None
    seconds = (moment - now).total_seconds()
    size = abs(seconds)
    if size < 30:
        return "now"
    for unit, length in (("d", 86400), ("h", 3600), ("min", 60)):
        if size >= length or unit == "min":
            count = max(round(size / length), 1)
            break
    text = f"{count} {unit}"
    return f"in {text}" if seconds > 0 else f"{text} ago"


def policy_lines(policy: ServicePolicy) -> list[str]:
    """The policy's limits in words, one a line (empty: none)."""
    lines = []
    if policy.budget is not None:
        window = policy.budget.window_seconds
        lines.append(f"budget {policy.budget.requests:,} runs per {_seconds(window)}")
    if policy.reserve:
        lines.append(f"reserve {policy.reserve:,}")
    if policy.concurrency is not None:
        scope = "per token" if policy.concurrency_scope == "token" else "per service"
        lines.append(f"at most {policy.concurrency} running ({scope})")
    if policy.cool_down_seconds is not None:
        lines.append(f"cool-down {_seconds(policy.cool_down_seconds)} after a rate-limit answer")
    if policy.probe_interval_seconds is not None:
        lines.append(f"probed every {_seconds(policy.probe_interval_seconds)}")
    return lines


def _seconds(value: int) -> str:
    # A no-break space: "1 h" never splits across lines.
    for unit, size in (("d", 86400), ("h", 3600), ("min", 60)):
        if value % size == 0:
            return f"{value // size}\u00a0{unit}"
    return f"{value}\u00a0s"


def token_row(token: TokenUsage, now: datetime) -> TokenRow:
    latest = token.latest
    return TokenRow(
        token=token,
        chart=remaining_chart(token.points, now, CHART_HOURS, token.label),
        resets_in=None if latest is None else relative(latest.reset_at, now),
        age=None if latest is None else relative(latest.observed_at, now),
        policy=policy_lines(token.policy),
    )


async def usage_page(request: Request) -> Response:
    """Every service's tokens (a page of services), or one service's with `?service=ID`."""
    raw = request.query_params.get("service", "")
    only = int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 12 else None
    if raw and only is None:
        return not_found(request, "service")
    now = utcnow()
    async with reading(request) as session:
        stmt = select(Service).order_by(Service.name_key)
        if only is not None:
            stmt = stmt.where(Service.id == only)
        paging = await paged(session, stmt, page_number(request))
        services = list(await session.scalars(stmt.offset(paging.offset).limit(PAGE_SIZE)))
        if only is not None and not services:
            return not_found(request, "service")
        views: list[ServiceUsageView] = await services_usage(session, services, now)
    return render_view(
        request,
        "usage.html",
        "_usage.html",
        views=[(view, [token_row(token, now) for token in view.tokens]) for view in views],
        paging=paging,
        only=only,
        now=now,
        hours=CHART_HOURS,
    )


async def usage_probe(request: Request) -> Response:
    """probeService from the page: ask the provider now, back to the service's usage."""
    service_id = path_id(request, "service_id")
    if service_id is None:
        return not_found(request, "service")
    change = Change("probeService", [], encode_id("Service", service_id), "Service")
    refused = await refuse_viewer(request, change)
    if refused is not None:
        return refused
    services = app_services(request)
    target = f"/usage?service={service_id}"
    try:
        await apply_change(
            request,
            change,
            lambda session: probe_service(
                session, services.sessionmaker, services.settings, services.secret_box, service_id
            ),
        )
    except InvalidInput as exc:
        message = "; ".join(error.message for error in exc.errors)
        if any(error.code.value == "NOT_FOUND" for error in exc.errors):
            return not_found(request, "service")
        return redirect_with_flash(request, target, f"Not probed: {message}", "error")
    return redirect_with_flash(request, target, "Probed: the provider's answers are below.")
