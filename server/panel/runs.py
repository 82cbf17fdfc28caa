"""Runs: the list (filters, live statuses), a run's page (facts, events, files, the log's
tail and older lines on demand), cancel and retry. The live tail is server/panel/tail.py,
the statuses' stream server/panel/live_statuses.py, the files server/panel/run_files.py."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
from sqlalchemy import Select, select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request
from starlette.responses import Response

from server import commands as command_service
from server.errors import ErrorCode, InvalidInput
from server.ids import encode_global_id as encode_id
from server.models import (
    Command,
    CommandEvent,
    CommandStatus,
    CommandTemplate,
    LogLine,
    Profile,
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
from server.panel.run_files import list_files, run_dir

LOG_TAIL = 200  # the run page shows this many of the last log lines (and loads as many older)
EVENTS_SHOWN = 50  # the run page shows the latest this many of the script's events
AD_HOC = "ad-hoc"  # the template filter's value for runs of no template


# --- the list --------------------------------------------------------------------------


def _query_id(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name, "")
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 12 else None


@dataclass(frozen=True)
class RunFilters:
    """The list's filters, as the URL (and every paging link) carries them."""

    status: str | None = None
    profile: int | None = None
    template: int | str | None = None  # a template's id, or AD_HOC

    @classmethod
    def of(cls, request: Request) -> RunFilters:
        status = request.query_params.get("status", "").strip().upper()
        ad_hoc = request.query_params.get("template") == AD_HOC
        return cls(
            status=status if status in CommandStatus.__members__ else None,
            profile=_query_id(request, "profile"),
            template=AD_HOC if ad_hoc else _query_id(request, "template"),
        )

    def params(self) -> dict[str, str]:
        values = {"status": self.status, "profile": self.profile, "template": self.template}
        return {name: str(value) for name, value in values.items() if value is not None}

    def apply(self, stmt: Select[Any]) -> Select[Any]:
        if self.status is not None:
            stmt = stmt.where(Command.status == self.status)
        if self.profile is not None:
            stmt = stmt.where(Command.profile_id == self.profile)
        if self.template == AD_HOC:
            stmt = stmt.where(Command.template_id.is_(None))
        elif self.template is not None:
            stmt = stmt.where(Command.template_id == self.template)
        return stmt


async def _choices(session: AsyncSession, model: type[Profile | CommandTemplate]) -> list[Any]:
    return list(await session.execute(select(model.id, model.name).order_by(model.name_key)))


async def run_list(request: Request) -> Response:
    """Runs, newest first, filtered by status, profile and template; their statuses follow
    live (server/panel/live_statuses.py) while any shown run is not over."""
    filters = RunFilters.of(request)
    stmt = filters.apply(select(Command))
    async with reading(request) as session:
        paging = await paged(session, stmt, page_number(request))
        runs = list(
            await session.scalars(
                stmt.order_by(Command.id.desc()).offset(paging.offset).limit(PAGE_SIZE)
            )
        )
        profiles = await _choices(session, Profile)
        templates = await _choices(session, CommandTemplate)
    following = [run.id for run in runs if not run.status.is_final]
    return render_view(
        request,
        "runs.html",
        "_runs_table.html",
        runs=runs,
        paging=paging,
        filters=filters,
        params=filters.params(),
        statuses=[status.value for status in CommandStatus],
        profiles=profiles,
        templates=templates,
        template_names=dict(templates),
        ad_hoc=AD_HOC,
        following=following,
    )


# --- a run -----------------------------------------------------------------------------


@dataclass(frozen=True)
class LogPage:
    """Log lines before a seq: `previous_attempt` is the attempt of the line just before
    them (for the attempt separators), `older` the seq older lines are loaded before (None
    when these start the log)."""

    lines: list[LogLine]
    previous_attempt: int
    older: int | None


async def log_before(session: AsyncSession, command_id: int, before: int | None) -> LogPage:
    """The LOG_TAIL lines before `before` (None: the log's end): one read of the primary
    key's index, backwards, whatever the log's length (no count)."""
    stmt = select(LogLine).where(LogLine.command_id == command_id)
    if before is not None:
        stmt = stmt.where(LogLine.seq < before)
    rows = list(await session.scalars(stmt.order_by(LogLine.seq.desc()).limit(LOG_TAIL + 1)))
    shown = list(reversed(rows[:LOG_TAIL]))
    if len(rows) <= LOG_TAIL:
        return LogPage(shown, 1, None)
    return LogPage(shown, rows[LOG_TAIL].attempt, shown[0].seq)


async def _events(session: AsyncSession, command_id: int) -> tuple[list[CommandEvent], bool]:
    rows = list(
        await session.scalars(
            select(CommandEvent)
            .where(CommandEvent.command_id == command_id)
            .order_by(CommandEvent.id.desc())
            .limit(EVENTS_SHOWN + 1)
        )
    )
    return rows[:EVENTS_SHOWN], len(rows) > EVENTS_SHOWN


async def _run_of(request: Request, session: AsyncSession) -> Command | None:
    """The run the path names, if there is one."""
    command_id = path_id(request, "command_id")
    return None if command_id is None else await session.get(Command, command_id)


async def run_page(request: Request) -> Response:
    """A run: status, timing, exit code, error, argv, its events and files, and the last
    LOG_TAIL log lines (older ones on demand)."""
    async with reading(request) as session:
        command = await _run_of(request, session)
        if command is None:
            return not_found(request, "run")
        command_id = command.id
        log = await log_before(session, command_id, None)
        events, more_events = await _events(session, command_id)
        template = None
        if command.template_id is not None:
            template = await session.get(CommandTemplate, command.template_id)
    files = await anyio.to_thread.run_sync(list_files, run_dir(request, command_id))
    return render_view(
        request,
        "run.html",
        "_run_log.html",
        run=command,
        run_template=template,
        lines=log.lines,
        log=log,
        final=command.status.is_final,
        previous_attempt=log.previous_attempt,
        events=events,
        more_events=more_events,
        files=files,
    )


async def run_log(request: Request) -> Response:
    """`GET /runs/{id}/log?before=SEQ`: the LOG_TAIL lines before SEQ; htmx prepends them
    to the page's log, a plain link gets them as a page of their own."""
    async with reading(request) as session:
        command = await _run_of(request, session)
        if command is None:
            return not_found(request, "run")
        log = await log_before(session, command.id, _query_id(request, "before"))
    return render_view(
        request,
        "run_log_page.html",
        "_log_older.html",
        run=command,
        log=log,
        lines=log.lines,
        previous_attempt=log.previous_attempt,
        log_tail=LOG_TAIL,
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
        return redirect_with_flash(
            request, target, f"Could not {verb} this run: {reasons}.", kind="error"
        )
    return redirect_with_flash(request, target, _run_action_done(action, command))


def _run_action_done(action: str, command: Command) -> str:
    if action == "retryCommand":
        return f"Run #{command.id} is queued again."
    if command.status is CommandStatus.CANCELLED:
        return f"Run #{command.id} cancelled."
    return f"Cancel requested: run #{command.id} stops in a moment."


async def run_cancel(request: Request) -> Response:
    return await _run_action(request, "cancelCommand")


async def run_retry(request: Request) -> Response:
    return await _run_action(request, "retryCommand")
