"""Runs: the list, a run's page, cancel and retry (the live tail is server/panel/tail.py)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request
from starlette.responses import Response

from graphql_schema.relay import encode_id
from server import commands as command_service
from server.errors import ErrorCode, InvalidInput
from server.models import (
    Command,
    CommandStatus,
    LogLine,
)
from server.panel.common import (
    PAGE_SIZE,
    Change,
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

LOG_TAIL = 200  # the run page shows this many of the last log lines


# --- runs ------------------------------------------------------------------------------


def status_filter(request: Request) -> str | None:
    raw = request.query_params.get("status", "").strip().upper()
    return raw if raw in CommandStatus.__members__ else None


async def run_list(request: Request) -> Response:
    status = status_filter(request)
    stmt = select(Command)
    if status is not None:
        stmt = stmt.where(Command.status == status)
    async with reading(request) as session:
        paging = await paged(session, stmt, page_number(request))
        runs = await session.scalars(
            stmt.order_by(Command.id.desc()).offset(paging.offset).limit(PAGE_SIZE)
        )
        return render_view(
            request,
            "runs.html",
            "_runs_table.html",
            runs=list(runs),
            paging=paging,
            status=status,
            statuses=[status.value for status in CommandStatus],
        )


async def run_page(request: Request) -> Response:
    """A run: status, timing, exit code, error, argv and the last LOG_TAIL log lines."""
    command_id = path_id(request, "command_id")
    if command_id is None:
        return not_found(request, "run")
    async with reading(request) as session:
        command = await session.get(Command, command_id)
        if command is None:
            return not_found(request, "run")
        tail = await session.scalars(
            select(LogLine)
            .where(LogLine.command_id == command_id)
            .order_by(LogLine.seq.desc())
            .limit(LOG_TAIL)
        )
        lines = list(reversed(list(tail)))
        return render_view(
            request,
            "run.html",
            "_run_log.html",
            run=command,
            lines=lines,
            log_tail=LOG_TAIL,
            final=CommandStatus(command.status).is_final,
            previous_attempt=1,
        )


RUN_ACTIONS: dict[str, Callable[[AsyncSession, int], Awaitable[Command]]] = {
    "cancelCommand": command_service.cancel_command,
    "retryCommand": command_service.retry_command,
}


async def _run_action(request: Request, action: str) -> Response:
    """Cancel or retry a run from its page: the GraphQL mutation's role rule, unit of work
    and audit entry (server/actions.perform); a refusal is the flash on the run page."""
    command_id = path_id(request, "command_id")
    if command_id is None:
        return not_found(request, "run")
    change = Change(action, ["id"], encode_id("Command", command_id), object_type="Command")
    refused = await refuse_viewer(request, change)
    if refused is not None:
        return refused
    target = f"/runs/{command_id}"
    try:
        command: Command = await apply_change(
            request, change, lambda session: RUN_ACTIONS[action](session, command_id)
        )
    except InvalidInput as exc:
        if any(error.code is ErrorCode.NOT_FOUND for error in exc.errors):
            return not_found(request, "run")
        reasons = "; ".join(error.message for error in exc.errors)
        verb = "cancel" if action == "cancelCommand" else "retry"
        return redirect_with_flash(request, target, f"Could not {verb} this run: {reasons}.")
    return redirect_with_flash(request, target, _run_action_done(action, command))


def _run_action_done(action: str, command: Command) -> str:
    if action == "retryCommand":
        return f"Run #{command.id} is queued again."
    if command.status == CommandStatus.CANCELLED.value:
        return f"Run #{command.id} cancelled."
    return f"Cancel requested: run #{command.id} stops in a moment."


async def run_cancel(request: Request) -> Response:
    return await _run_action(request, "cancelCommand")


async def run_retry(request: Request) -> Response:
    return await _run_action(request, "retryCommand")
