"""The live streams of the API (`Subscription`): a command's status events, its log as
lines or stored batches, token budgets. Over graphql-transport-ws."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import AsyncGenerator, AsyncIterator, Iterator
from typing import TYPE_CHECKING, Annotated

import strawberry
from graphql import GraphQLError

from graphql_schema.commands import AfterSeq, Command, CommandEvent, CommandIdArg
from graphql_schema.context import Info
from graphql_schema.enums import CommandStatus
from graphql_schema.log_messages import LogBatch, LogLine, each_log_line, log_batches_of
from graphql_schema.relay import pk_of
from server import models
from server.app_services import client_key
from server.broker import STATUS_TOPIC, StatusChange, status_topic
from server.db import READ_ONLY
from server.errors import InvalidInput
from server.messages import StoredBatch
from server.models import FINAL_STATUSES
from server.streams import FinalStatus, Item, StreamUnavailable, follow_command, patiently
from server.subscribers import TooManySubscribers

if TYPE_CHECKING:
    from graphql_schema.services import TokenUsage

TokenUsageRef = Annotated["TokenUsage", strawberry.lazy("graphql_schema.services")]


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


@contextlib.contextmanager
def _admitted(info: Info, counted: bool = True) -> Iterator[None]:
    """One more live subscriber of this client while it lasts (an error past the limits);
    `counted` in the subscribers metric too (follow_command counts its own)."""
    client = client_key(info.context.request, info.context.principal)
    app = info.context.app
    try:
        app.subscriber_limits.acquire(client)
    except TooManySubscribers as exc:
        raise GraphQLError(str(exc), extensions={"code": "TOO_MANY_SUBSCRIBERS"}) from exc
    if counted:
        app.metrics.subscribers.inc()
    try:
        yield
    finally:
        if counted:
            app.metrics.subscribers.dec()
        app.subscriber_limits.release(client)


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
    with _admitted(info, counted=False):
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
                for line in each_log_line(item):
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

        with _admitted(info):
            async for update in follow_service_usage(info, service_id):
                yield update

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
        last: str | None = None
        with _admitted(info):
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
