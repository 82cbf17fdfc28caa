"""GraphQL: commands (one requested execution each) and their stored log lines."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

import strawberry
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from strawberry.scalars import JSON

from graphql_schema.context import Info
from graphql_schema.enums import CommandStatus
from graphql_schema.limits import CountedList, response_size_error
from graphql_schema.log_messages import LogLine
from graphql_schema.mutation import perform
from graphql_schema.relay import (
    USER_ERRORS,
    After,
    Connection,
    First,
    Node,
    UserError,
    encode_id,
    optional_pk,
    paginate,
    pk_of,
    user_errors,
)
from server import commands as command_domain
from server import models
from server.commands import RunRequest
from server.errors import InvalidInput
from server.models import FINAL_STATUSES

if TYPE_CHECKING:
    from graphql_schema.profiles import Profile
    from graphql_schema.proxies import Proxy
    from graphql_schema.services import Service, TokenUsage
    from graphql_schema.templates import CommandTemplate

ProfileRef = Annotated["Profile", strawberry.lazy("graphql_schema.profiles")]
ProxyRef = Annotated["Proxy", strawberry.lazy("graphql_schema.proxies")]
ServiceRef = Annotated["Service", strawberry.lazy("graphql_schema.services")]
TokenUsageRef = Annotated["TokenUsage", strawberry.lazy("graphql_schema.services")]
TemplateRef = Annotated["CommandTemplate", strawberry.lazy("graphql_schema.templates")]

LOG_PAGE_MAX = 10_000
LOG_FETCH_ROWS = 500  # rows the `logs` field reads from the database at a time
CommandIdArg = Annotated[strawberry.ID, strawberry.argument(description="The command's ID.")]
AfterSeq = Annotated[
    int | None, strawberry.argument(description="Only lines after this seq (null: from the start).")
]


@strawberry.type(description="One requested execution of a command.")
class Command(Node):
    id: strawberry.ID = strawberry.field(description="The command's global ID.")
    status: CommandStatus = strawberry.field(description="Where the command is now.")
    argv: list[str] = strawberry.field(description="The rendered argv; secrets never appear here.")
    params: JSON = strawberry.field(
        description="The parameter values the template was rendered with."
    )
    priority: int = strawberry.field(description="Higher runs first (-1000..1000).")
    attempts: int = strawberry.field(description="Attempts made so far.")
    max_attempts: int = strawberry.field(description="How many attempts it may make.")
    uncounted_attempts: int = strawberry.field(
        description="Attempts not held against maxAttempts: cut short by a runner shutdown, "
        "lost with a runner that died, or not started because the host was short of "
        "resources (the last two a bounded number of times)."
    )
    timeout_seconds: int | None = strawberry.field(
        description="Each attempt's time limit in seconds (null: none)."
    )
    exit_code: int | None = strawberry.field(
        description="The last attempt's exit code (null: it has not exited)."
    )
    error: str | None = strawberry.field(
        description="Why it failed, timed out or was cancelled, in words."
    )
    wait_reason: str | None = strawberry.field(
        description="Why a QUEUED/WAITING command is not running yet."
    )
    profile_name: str | None = strawberry.field(
        description="The profile's name when the command was made (kept after it is deleted)."
    )
    cancel_requested: bool = strawberry.field(
        description="A cancel was asked for and the command is still stopping (its process "
        "group is being terminated); false once it is final."
    )
    lines_lost: int = strawberry.field(
        description="Log lines the runner could not store (0 when the log is complete); "
        "a SYSTEM line in the log says which and why."
    )
    created_at: datetime = strawberry.field(description="When it was queued.")
    started_at: datetime | None = strawberry.field(description="When its last attempt started.")
    finished_at: datetime | None = strawberry.field(description="When it reached its final status.")
    row: strawberry.Private[models.Command]

    @classmethod
    def from_row(cls, row: models.Command) -> Command:
        return cls(
            id=encode_id("Command", row.id),
            status=CommandStatus(row.status),
            argv=list(row.argv),
            params=JSON(row.params),
            priority=row.priority,
            attempts=row.attempts,
            max_attempts=row.max_attempts,
            uncounted_attempts=row.uncounted_attempts,
            timeout_seconds=row.timeout_seconds,
            exit_code=row.exit_code,
            error=row.error,
            wait_reason=row.wait_reason,
            profile_name=row.profile_name,
            cancel_requested=bool(row.cancel_requested) and row.status not in FINAL_STATUSES,
            lines_lost=row.lines_lost,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
            row=row,
        )

    @strawberry.field(description="The template it was made from (null: ad hoc, or deleted).")
    async def template(self, info: Info) -> TemplateRef | None:
        from graphql_schema.templates import CommandTemplate

        if self.row.template_id is None:
            return None
        row = await info.context.loaders.template.load(self.row.template_id)
        return None if row is None else CommandTemplate.from_row(row)

    @strawberry.field(description="The profile it runs for (null: none, or deleted).")
    async def profile(self, info: Info) -> ProfileRef | None:
        from graphql_schema.profiles import Profile

        if self.row.profile_id is None:
            return None
        row = await info.context.loaders.profile.load(self.row.profile_id)
        return None if row is None else Profile.from_row(row)

    @strawberry.field(description="The proxy it goes out through (null: direct).")
    async def proxy(self, info: Info) -> ProxyRef | None:
        from graphql_schema.proxies import Proxy

        if self.row.proxy_id is None:
            return None
        row = await info.context.loaders.proxy.load(self.row.proxy_id)
        return None if row is None else Proxy.from_row(row)

    @strawberry.field(
        description="The services whose tokens its child gets.", extensions=[CountedList()]
    )
    async def services(self, info: Info) -> list[ServiceRef]:
        from graphql_schema.services import Service

        rows = await info.context.loaders.command_services.load(self.row.id)
        return [Service.from_row(row) for row in rows]

    @strawberry.field(description="Stored log lines after `afterSeq`, oldest first.")
    async def logs(
        self,
        info: Info,
        after_seq: AfterSeq = None,
        first: Annotated[
            int | None,
            strawberry.argument(description=f"At most this many lines (at most {LOG_PAGE_MAX})."),
        ] = None,
    ) -> list[LogLine]:
        limit = min(first if first is not None else LOG_PAGE_MAX, LOG_PAGE_MAX)
        stmt = (
            select(models.LogLine)
            .where(models.LogLine.command_id == self.row.id, models.LogLine.seq > (after_seq or 0))
            .order_by(models.LogLine.seq)
            .limit(max(limit, 0))
        )
        # Read as a stream and stop once the texts alone pass the response limit: 10,000
        # lines of up to a megabyte each would otherwise be gigabytes before any check.
        cap = info.context.settings.graphql_max_response_bytes
        lines: list[LogLine] = []
        size = 0
        async with info.context.reading() as session:
            rows = await session.stream_scalars(stmt.execution_options(yield_per=LOG_FETCH_ROWS))
            try:
                async for row in rows:
                    size += len(row.text)
                    if size > cap:
                        raise response_size_error(size, cap)
                    lines.append(LogLine.from_row(row))
            finally:
                await rows.close()
        return lines


@strawberry.enum(description="The order of a commands connection (ids follow creation).")
class CommandOrder(enum.Enum):
    CREATED_ASC = "CREATED_ASC"
    CREATED_DESC = "CREATED_DESC"


async def resolve_commands(
    info: Info,
    first: First = None,
    after: After = None,
    status: Annotated[
        list[CommandStatus] | None, strawberry.argument(description="Only these statuses.")
    ] = None,
    profile_id: Annotated[
        strawberry.ID | None, strawberry.argument(description="Only this profile's commands.")
    ] = None,
    order_by: Annotated[
        CommandOrder, strawberry.argument(description="Oldest or newest first.")
    ] = CommandOrder.CREATED_ASC,
) -> Connection[Command]:
    """Commands by creation order (oldest first unless `orderBy: CREATED_DESC`), optionally
    by status and profile."""
    stmt = select(models.Command)
    if status:
        stmt = stmt.where(models.Command.status.in_([s.value for s in status]))
    if profile_id is not None:
        try:
            stmt = stmt.where(
                models.Command.profile_id == pk_of(profile_id, "Profile", field="profileId")
            )
        except InvalidInput:
            stmt = stmt.where(models.Command.id.is_(None))
    descending = order_by is CommandOrder.CREATED_DESC
    return await paginate(
        info, stmt, models.Command.id, Command.from_row, first, after, descending=descending
    )


@strawberry.input(description="What to run: a template (or an ad-hoc commandString) for a profile.")
class RunCommandInput:
    template_id: strawberry.ID | None = strawberry.field(
        default=None, description="The template to render (or give commandString)."
    )
    command_string: str | None = strawberry.field(
        default=None, description="An ad-hoc command line, rendered like a template."
    )
    profile_id: strawberry.ID | None = strawberry.field(
        default=None, description="The profile to run for (its user-data-dir, proxies, services)."
    )
    proxy_id: strawberry.ID | None = strawberry.field(
        default=None, description="Default: the profile's default proxy."
    )
    service_ids: list[strawberry.ID] | None = strawberry.field(
        default=None, description="Default: every service linked to the profile."
    )
    params: JSON | None = strawberry.field(
        default=None, description="Values of the template's parameters (a JSON object)."
    )
    timeout_seconds: int | None = strawberry.field(
        default=None, description="Each attempt's time limit in seconds (default: the template's)."
    )
    max_attempts: int | None = strawberry.field(
        default=None, description="How many attempts it may make (default: the template's)."
    )
    priority: int = strawberry.field(default=0, description="Higher runs first (-1000..1000).")


@strawberry.type(description="A composed command, previewed: nothing runs.")
class ComposedCommand:
    argv: list[str] = strawberry.field(
        description="The argv that would run (secrets never appear here)."
    )
    env: list[str] = strawberry.field(description="Environment variable names (values hidden).")
    errors: list[UserError] = strawberry.field(
        description="Why it could not be composed (empty when it could)."
    )
    routing_table: list[str] = strawberry.field(
        default_factory=list,
        description="The run's effective routing: one line a rule (first match wins), then "
        "where everything else goes; empty without a proxy.",
    )
    note: str | None = strawberry.field(
        default=None,
        description="What the preview cannot show literally, in one sentence: a proxied run "
        "goes through a local sidecar whose port is picked at start (argv shows a "
        "placeholder); null without a proxy.",
    )


@strawberry.type(description="The result of a command mutation.")
class CommandPayload:
    command: Command | None = strawberry.field(
        default=None, description="The command (null on error)."
    )
    user_errors: list[UserError] = strawberry.field(default_factory=list, description=USER_ERRORS)


@strawberry.type(description="A command's status changed.")
class CommandEvent:
    command: Command = strawberry.field(description="The command as it is now.")
    status: CommandStatus = strawberry.field(description="The status it changed to.")


RunInputArg = Annotated[RunCommandInput, strawberry.argument(description="What to run.")]


def run_request(data: RunCommandInput) -> RunRequest:
    """Decode a RunCommandInput's IDs (NOT_FOUND user errors for foreign ones)."""
    params: Any = data.params if data.params is not None else {}
    return RunRequest(
        template_id=optional_pk(data.template_id, "CommandTemplate", field="templateId"),
        command_string=data.command_string,
        profile_id=optional_pk(data.profile_id, "Profile", field="profileId"),
        proxy_id=optional_pk(data.proxy_id, "Proxy", field="proxyId"),
        service_ids=None
        if data.service_ids is None
        else [
            pk_of(sid, "Service", field=f"serviceIds.{i}") for i, sid in enumerate(data.service_ids)
        ],
        params=params,
        timeout_seconds=data.timeout_seconds,
        max_attempts=data.max_attempts,
        priority=data.priority,
    )


async def resolve_compose_command(info: Info, input: RunInputArg) -> ComposedCommand:
    """Preview argv and env var names for a run; runs and stores nothing."""
    ctx = info.context
    try:
        async with ctx.reading() as session:
            composed = await command_domain.compose_command(
                session, ctx.settings, ctx.secret_box, ctx.app.render_pool, run_request(input)
            )
    except InvalidInput as exc:
        return ComposedCommand(argv=[], env=[], errors=user_errors(exc))
    return ComposedCommand(
        argv=composed.argv,
        env=composed.env_names,
        errors=[],
        routing_table=composed.routing_table,
        note=composed.note,
    )


def _command_payload(row: models.Command | None, errors: list[UserError]) -> CommandPayload:
    return CommandPayload(
        command=None if row is None else Command.from_row(row), user_errors=errors
    )


@strawberry.type
class CommandMutations:
    @strawberry.mutation(description="Compose a command and queue it.")
    async def run_command(self, info: Info, input: RunInputArg) -> CommandPayload:
        ctx = info.context

        async def work(session: AsyncSession) -> models.Command:
            request = run_request(input)
            return await command_domain.run_command(
                session, ctx.settings, ctx.secret_box, ctx.app.render_pool, request
            )

        return _command_payload(*await perform(info, work))

    @strawberry.mutation(description="Cancel a queued or running command (its process group).")
    async def cancel_command(self, info: Info, id: CommandIdArg) -> CommandPayload:
        async def work(session: AsyncSession) -> models.Command:
            return await command_domain.cancel_command(session, pk_of(id, "Command", field="id"))

        return _command_payload(*await perform(info, work))

    @strawberry.mutation(description="Queue a finished command once more.")
    async def retry_command(self, info: Info, id: CommandIdArg) -> CommandPayload:
        async def work(session: AsyncSession) -> models.Command:
            return await command_domain.retry_command(session, pk_of(id, "Command", field="id"))

        return _command_payload(*await perform(info, work))
