"""GraphQL: commands (one requested execution each) and their stored log lines."""

from __future__ import annotations

import asyncio
import enum
import functools
import weakref
from collections.abc import AsyncGenerator, AsyncIterator, Iterable, Iterator
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, cast

import strawberry
from graphql import GraphQLError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from strawberry.scalars import JSON

from graphql_schema.context import Info
from graphql_schema.enums import CommandStatus, LogStream
from graphql_schema.limits import CountedList, response_size_error
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
from graphql_schema.shared_events import SharedResults
from server import commands as command_domain
from server import models
from server.app_services import client_key
from server.broker import STATUS_TOPIC, StatusChange, status_topic
from server.commands import RunRequest
from server.db import READ_ONLY
from server.errors import InvalidInput
from server.messages import LineRun, StoredBatch
from server.models import FINAL_STATUSES
from server.streams import (
    FinalStatus,
    Item,
    StreamUnavailable,
    follow_command,
    made_at_tick,
    parts_of,
    patiently,
    pieces,
    slice_of,
)
from server.subscribers import TooManySubscribers

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


@strawberry.type(description="One stored line of a command's output (secrets already masked).")
class LogLine:
    seq: int = strawberry.field(description="Position in the command's log: 1, 2, ... with no gap.")
    attempt: int = strawberry.field(description="The attempt that wrote it (1 for the first).")
    stream: LogStream = strawberry.field(
        description="Which pipe it came from (SYSTEM: Corral's own line)."
    )
    ts: datetime = strawberry.field(description="When the runner read it.")
    text: str = strawberry.field(description="The line, without its newline; secrets masked.")

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


@strawberry.type(
    description="The lines of one stored batch of a command's log (a message of "
    "commandLogBatches); `final` is true on the last message, sent once the command is "
    "final and every line was sent (its `lines` are empty)."
)
class LogBatch:
    lines: list[LogLine] = strawberry.field(description="The batch's lines, in seq order.")
    final: bool = strawberry.field(
        description="The last message: the command is final and every line was sent."
    )
    # Published batches are shown to every subscriber of the command: their result for one
    # selection is computed and encoded once (graphql_schema.shared_events).
    shared_results: strawberry.Private[SharedResults | None] = None
    # Made of other messages' lines (a merge of published batches, a follower's slice of
    # one): those messages, each with the lines it skips, whose results its result joins
    # (CorralExecutionContext), so that a line is executed once whatever message it is in.
    parts: strawberry.Private[tuple[tuple[LogBatch, int], ...]] = ()


class _Lines:
    """The lines of a published message, made as they are read: by the one execution of the
    message per selection (graphql_schema.shared_events), then let go. A message lives as
    long as its batch is remembered for followers that fall behind (server.streams): kept
    with it, a LogLine object per line was a quarter of the objects the garbage collector
    tracked in a 200-follower fan-out (24k of 106k), each full collection walked them, and
    the ones arriving every second brought the next one on: 45-70 ms with the event loop
    stopped, twice in a 10 s run (issue 16). The texts are the batch's own (no copy)."""

    __slots__ = ("_count", "runs")

    def __init__(self, runs: Iterable[LineRun]) -> None:
        self.runs = tuple(runs)
        self._count = sum(len(run.texts) for run in self.runs)

    def __len__(self) -> int:
        return self._count

    def __iter__(self) -> Iterator[LogLine]:
        return _lines_of(self.runs)

    def after(self, skipped: int) -> _Lines:
        """The lines after the first `skipped`."""
        runs: list[LineRun] = []
        for run in self.runs:
            if skipped >= len(run.texts):
                skipped -= len(run.texts)
                continue
            if skipped:
                run = run._replace(first_seq=run.first_seq + skipped, texts=run.texts[skipped:])
                skipped = 0
            runs.append(run)
        return _Lines(runs)


def _message(lines: _Lines, parts: tuple[tuple[LogBatch, int], ...] = ()) -> LogBatch:
    """A published message of `lines` (shown as the list the schema says it is)."""
    shown = cast("list[LogLine]", lines)
    return LogBatch(lines=shown, final=False, shared_results=SharedResults(), parts=parts)


def _published_lines(message: LogBatch) -> _Lines:
    lines: object = message.lines
    if not isinstance(lines, _Lines):  # only published messages are cut or joined
        raise TypeError("not a published message")
    return lines


def _each_log_line(batch: StoredBatch) -> Iterator[LogLine]:
    return _lines_of(batch.runs)


def _lines_of(runs: Iterable[LineRun]) -> Iterator[LogLine]:
    for run in runs:
        stream = LogStream(run.stream)
        for seq, text in enumerate(run.texts, run.first_seq):
            yield LogLine(seq=seq, attempt=run.attempt, stream=stream, ts=run.ts, text=text)


# id(StoredBatch) -> its messages, while the batch lives (weakref.finalize drops the
# entry): every subscriber that gets a batch from the broker gets the same messages.
_published: dict[int, list[LogBatch]] = {}


def log_batches(batch: StoredBatch) -> list[LogBatch]:
    """The messages of a batch, in pieces of bounded size (server.streams.pieces), built
    once for all the subscribers it is published to."""
    messages = _published.get(id(batch))
    if messages is None:
        cut = slice_of(batch)
        messages = _published[id(batch)] = (
            [_message(_Lines(piece.runs)) for piece in pieces(batch)]
            if cut is None
            else _cut(log_batches(cut[0]), cut[1])
        )
        weakref.finalize(batch, _published.pop, id(batch), None)
    return messages


def _cut(messages: list[LogBatch], skipped: int) -> list[LogBatch]:
    """The messages of a batch's lines after its first `skipped`, made of its `messages`."""
    cut: list[LogBatch] = []
    for message in messages:
        if skipped >= len(message.lines):
            skipped -= len(message.lines)
        elif skipped:
            cut.append(_made_of([(message, skipped)]))
            skipped = 0
        else:
            cut.append(message)
    return cut


def _made_of(parts: list[tuple[LogBatch, int]]) -> LogBatch:
    """A message of the lines of `parts` (each message past the lines it skips), in order."""
    runs = [
        run for message, skipped in parts for run in _published_lines(message).after(skipped).runs
    ]
    return _message(_Lines(runs), tuple(parts))


# A merge of published batches up to this many lines is sent as one message; a larger one
# as its batches' messages (see log_batches_of).
OWN_MERGE_LINES = 256


def log_batches_of(batch: StoredBatch) -> list[LogBatch]:
    """The messages a follower sends for `batch`. A small merge made at the tick (followers
    that keep up share it: server.streams.follow_command) is one message; any other (a
    follower that fell behind merged its queue, a replay page made of remembered batches:
    mostly its own) is sent as the messages of the batches it was made of, executed and
    encoded once for every follower (issue 16): executing a merge for one follower cost
    more than the messages it saved, from a hundred lines up."""
    parts = parts_of(batch)
    if len(parts) == 1:
        return log_batches(batch)
    messages = [message for part in parts for message in log_batches(part)]
    if batch.weight <= OWN_MERGE_LINES and made_at_tick(batch):
        return _joined_message(batch, messages)
    return messages


def _joined_message(batch: StoredBatch, messages: list[LogBatch]) -> list[LogBatch]:
    """A merge's one message, made of its batches' `messages` (whose results it joins), once
    for all the followers that take the merge."""
    joined = _published.get(id(batch))
    if joined is None:
        joined = _published[id(batch)] = [_made_of([(message, 0) for message in messages])]
        weakref.finalize(batch, _published.pop, id(batch), None)
    return joined


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


def _command_pk(command_id: str) -> int:
    try:
        return pk_of(command_id, "Command", field="commandId")
    except InvalidInput as exc:
        # Not quoted: a client may paste anything where an ID goes (a token, say).
        raise GraphQLError("no such command (not a Command ID)") from exc


async def _load_command(info: Info, pk: int) -> models.Command | None:
    async with info.context.app.stream_sessions() as session:
        # A subscriber reads: on SQLite it must not take the write lock (BEGIN IMMEDIATE).
        await session.connection(execution_options=READ_ONLY)
        return await session.get(models.Command, pk)


async def _load_patiently(info: Info, pk: int) -> models.Command | None:
    """The command, read again while the database is away (`patiently`), else UNAVAILABLE."""
    try:
        return await patiently(functools.partial(_load_command, info, pk))
    except StreamUnavailable as exc:
        message = "the database is unreachable: these events end; subscribe again once it is back."
        raise GraphQLError(message, extensions={"code": "UNAVAILABLE"}) from exc


def _admit_subscriber(info: Info) -> str:
    """Count one more live subscriber of this client (an error past the limits); its key."""
    client = client_key(info.context.request, info.context.principal)
    try:
        info.context.app.subscriber_limits.acquire(client)
    except TooManySubscribers as exc:
        raise GraphQLError(str(exc), extensions={"code": "TOO_MANY_SUBSCRIBERS"}) from exc
    return client


async def _follow_logs(
    info: Info, command_id: strawberry.ID, after_seq: int | None
) -> AsyncIterator[Item]:
    """A subscriber's view of a command's log (server.streams.follow_command), counted
    against the subscriber limits while it lasts."""
    pk = _command_pk(command_id)
    # A StreamUnavailable is said to the client as it is (code UNAVAILABLE) and logged at
    # INFO, no traceback: graphql_schema.errors.
    if await patiently(lambda: _load_command(info, pk), after_seq or 0) is None:
        raise GraphQLError("no such command", extensions={"code": "NOT_FOUND"})
    app = info.context.app
    client = _admit_subscriber(info)
    try:
        async for item in follow_command(
            app.stream_sessions,
            app.broker,
            pk,
            after_seq or 0,
            app.metrics,
            app.follow_poll_seconds,
            pages=app.replay_pages,
        ):
            yield item
    finally:
        app.subscriber_limits.release(client)


@strawberry.type(description="Live streams, over `graphql-transport-ws`.")
class Subscription:
    @strawberry.subscription(
        description="A command's log lines after afterSeq (stored ones first), then live; "
        "completes when the command is final and every line was sent."
    )
    async def command_logs(
        self, info: Info, command_id: CommandIdArg, after_seq: AfterSeq = None
    ) -> AsyncGenerator[LogLine, None]:
        async for item in _follow_logs(info, command_id, after_seq):
            if isinstance(item, StoredBatch):
                # Built per subscriber, not kept with the batch: a line per event costs a
                # result each, and results kept for every line would outweigh the saving.
                # Built as sent, not a batch's (up to 2,000) at once per subscriber.
                for line in _each_log_line(item):
                    yield line
                    # A send that does not block never lets go of the loop, and every
                    # follower that is behind is ready at once: one pass of the loop runs
                    # each of them up to here, and /healthz waits a pass or two. One line
                    # each keeps a pass short (issue 16: 200 followers of 16 lines each
                    # made passes of ~0.8 s).
                    await asyncio.sleep(0)

    @strawberry.subscription(
        description="A command's log lines after afterSeq (stored ones first), then live, a "
        "stored batch of lines per message; completes after a last message with `final` "
        "true, once the command is final and every line was sent."
    )
    async def command_log_batches(
        self, info: Info, command_id: CommandIdArg, after_seq: AfterSeq = None
    ) -> AsyncGenerator[LogBatch, None]:
        async for item in _follow_logs(info, command_id, after_seq):
            if isinstance(item, StoredBatch):
                messages = log_batches_of(item)
                for index, message in enumerate(messages, 1):
                    yield message
                    if index < len(messages):
                        await asyncio.sleep(0)  # as commandLogs: let the loop go between them
            elif isinstance(item, FinalStatus):
                yield LogBatch(lines=[], final=True)

    @strawberry.subscription(
        description="Live token budgets: the latest observation of each token of the service "
        "(of every service without an id), then a token again whenever a probe, a run's usage "
        "event or a run started with it (Corral's count) adds to what is known of it."
    )
    async def service_usage(
        self,
        info: Info,
        service_id: Annotated[
            strawberry.ID | None,
            strawberry.argument(description="The service to follow; omitted: every service."),
        ] = None,
    ) -> AsyncGenerator[TokenUsageRef, None]:
        from graphql_schema.services import follow_service_usage

        app = info.context.app
        client = _admit_subscriber(info)
        app.metrics.subscribers.inc()
        try:
            async for update in follow_service_usage(info, service_id):
                yield update
        finally:
            app.metrics.subscribers.dec()
            app.subscriber_limits.release(client)

    @strawberry.subscription(description="Status changes of one command, or of all commands.")
    async def command_events(
        self,
        info: Info,
        command_id: Annotated[
            strawberry.ID | None,
            strawberry.argument(description="The command (null: every command's changes)."),
        ] = None,
    ) -> AsyncGenerator[CommandEvent, None]:
        app = info.context.app
        pk = None if command_id is None else _command_pk(command_id)
        topic = STATUS_TOPIC if pk is None else status_topic(pk)
        client = _admit_subscriber(info)
        app.metrics.subscribers.inc()
        last: str | None = None
        try:
            async with app.broker.subscribe(topic) as subscription:
                if pk is not None:  # subscribed first: no change between read and listen lost
                    current = await _load_patiently(info, pk)
                    if current is None:
                        raise GraphQLError("no such command", extensions={"code": "NOT_FOUND"})
                    last = current.status
                    yield CommandEvent(
                        command=Command.from_row(current), status=CommandStatus(current.status)
                    )
                    if current.status in FINAL_STATUSES:
                        return
                while True:
                    message = await subscription.get()
                    if message is None:  # lagged: the one command's status can be re-read
                        subscription.resync()
                        if pk is None:
                            continue
                        current = await _load_patiently(info, pk)
                        if current is None or current.status == last:
                            continue
                        message = StatusChange(pk, current.status)
                    if not isinstance(message, StatusChange):
                        continue
                    if pk is not None and message.status == last:
                        continue  # the status already sent first
                    last = message.status
                    row = await _load_patiently(info, message.command_id)
                    if row is not None:
                        yield CommandEvent(
                            command=Command.from_row(row), status=CommandStatus(message.status)
                        )
                    if pk is not None and message.status in FINAL_STATUSES:
                        return  # one command's events complete after its final status
        finally:
            app.metrics.subscribers.dec()
            app.subscriber_limits.release(client)
