"""GraphQL: commands (one requested execution each) and their stored log lines."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import TYPE_CHECKING, Annotated

import strawberry
from sqlalchemy import select
from strawberry.scalars import JSON

from graphql_schema.context import Info
from graphql_schema.relay import Connection, Node, encode_id, paginate, pk_of
from server import models
from server.errors import InvalidInput

if TYPE_CHECKING:
    from graphql_schema.profiles import Profile
    from graphql_schema.proxies import Proxy
    from graphql_schema.services import Service
    from graphql_schema.templates import CommandTemplate

ProfileRef = Annotated["Profile", strawberry.lazy("graphql_schema.profiles")]
ProxyRef = Annotated["Proxy", strawberry.lazy("graphql_schema.proxies")]
ServiceRef = Annotated["Service", strawberry.lazy("graphql_schema.services")]
TemplateRef = Annotated["CommandTemplate", strawberry.lazy("graphql_schema.templates")]

LOG_PAGE_MAX = 10_000


@strawberry.enum
class CommandStatus(enum.Enum):
    QUEUED = "QUEUED"
    WAITING = "WAITING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"
    CANCELLED = "CANCELLED"


@strawberry.enum
class LogStream(enum.Enum):
    STDOUT = "stdout"
    STDERR = "stderr"
    SYSTEM = "system"


@strawberry.type(description="One stored line of a command's output (secrets already masked).")
class LogLine:
    seq: int
    attempt: int
    stream: LogStream
    ts: datetime
    text: str

    @classmethod
    def from_row(cls, row: models.LogLine) -> LogLine:
        return cls(
            seq=row.seq,
            attempt=row.attempt,
            stream=LogStream(row.stream),
            ts=row.ts,
            text=row.text,
        )


@strawberry.type(description="One requested execution of a command.")
class Command(Node):
    id: strawberry.ID
    status: CommandStatus
    argv: list[str] = strawberry.field(description="The rendered argv; secrets never appear here.")
    params: JSON
    priority: int
    attempts: int
    max_attempts: int
    timeout_seconds: int | None
    exit_code: int | None
    error: str | None
    wait_reason: str | None = strawberry.field(
        description="Why a QUEUED/WAITING command is not running yet."
    )
    profile_name: str | None = strawberry.field(
        description="The profile's name when the command was made (kept after it is deleted)."
    )
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
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
            timeout_seconds=row.timeout_seconds,
            exit_code=row.exit_code,
            error=row.error,
            wait_reason=row.wait_reason,
            profile_name=row.profile_name,
            created_at=row.created_at,
            started_at=row.started_at,
            finished_at=row.finished_at,
            row=row,
        )

    @strawberry.field
    async def template(self, info: Info) -> TemplateRef | None:
        from graphql_schema.templates import CommandTemplate

        if self.row.template_id is None:
            return None
        row = await info.context.loaders.template.load(self.row.template_id)
        return None if row is None else CommandTemplate.from_row(row)

    @strawberry.field
    async def profile(self, info: Info) -> ProfileRef | None:
        from graphql_schema.profiles import Profile

        if self.row.profile_id is None:
            return None
        row = await info.context.loaders.profile.load(self.row.profile_id)
        return None if row is None else Profile.from_row(row)

    @strawberry.field
    async def proxy(self, info: Info) -> ProxyRef | None:
        from graphql_schema.proxies import Proxy

        if self.row.proxy_id is None:
            return None
        row = await info.context.loaders.proxy.load(self.row.proxy_id)
        return None if row is None else Proxy.from_row(row)

    @strawberry.field
    async def services(self, info: Info) -> list[ServiceRef]:
        from graphql_schema.services import Service

        rows = await info.context.loaders.command_services.load(self.row.id)
        return [Service.from_row(row, info.context.secret_box) for row in rows]

    @strawberry.field(description="Stored log lines after `afterSeq`, oldest first.")
    async def logs(
        self, info: Info, after_seq: int | None = None, first: int | None = None
    ) -> list[LogLine]:
        limit = min(first if first is not None else LOG_PAGE_MAX, LOG_PAGE_MAX)
        stmt = (
            select(models.LogLine)
            .where(models.LogLine.command_id == self.row.id, models.LogLine.seq > (after_seq or 0))
            .order_by(models.LogLine.seq)
            .limit(max(limit, 0))
        )
        async with info.context.reading() as session:
            return [LogLine.from_row(row) for row in await session.scalars(stmt)]


async def resolve_commands(
    info: Info,
    first: int | None = None,
    after: str | None = None,
    status: list[CommandStatus] | None = None,
    profile_id: strawberry.ID | None = None,
) -> Connection[Command]:
    """Commands by creation order, optionally by status and profile."""
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
    return await paginate(info, stmt, models.Command.id, Command.from_row, first, after)
