"""GraphQL: the audit log. `MutationAudit` appends one event per executed top-level mutation
field, whatever the mutation; `auditEvents` reads them back, newest first.

An event names the input fields a mutation was given, never their values (an input may
carry a token or a password), and the userError codes it returned. It is written in its
own transaction once the mutation's unit of work is over, so a mutation that rolled back
is on record too; a failure to write it is logged and never fails the mutation.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
from collections.abc import Callable
from datetime import UTC, datetime
from inspect import isawaitable
from typing import Annotated, Any

import strawberry
from graphql import GraphQLError, GraphQLResolveInfo, ObjectValueNode, OperationType, VariableNode
from sqlalchemy import select
from strawberry.extensions import SchemaExtension
from strawberry.scalars import JSON

from graphql_schema.context import Context, Info
from graphql_schema.relay import After, Connection, First, Node, decode_id, encode_id, paginate
from server import models
from server.audit import AuditEntry, ok_entry, raised_entry, refused_entry, write_entry

ResolveInfo = GraphQLResolveInfo[Context]


@strawberry.type(
    description="One mutation or login: who (through which token), what, on which object, "
    "with what outcome (ok, error, denied), from where. Never a secret's value."
)
class AuditEvent(Node):
    id: strawberry.ID = strawberry.field(description="The event's global ID.")
    at: datetime = strawberry.field(description="When it happened.")
    actor: str | None = strawberry.field(description="The user (or token) that acted.")
    actor_kind: str = strawberry.field(description="user, token, cli, system or anonymous.")
    token_id: strawberry.ID | None = strawberry.field(description="The API token used, if any.")
    action: str = strawberry.field(description="e.g. `createProfile`, `login`.")
    object_type: str | None = strawberry.field(
        description="The type of the object acted on, e.g. `Profile`."
    )
    object_id: strawberry.ID | None = strawberry.field(description="The object's global ID.")
    outcome: str = strawberry.field(description="ok, error or denied.")
    detail: JSON | None = strawberry.field(
        description="The input fields given (names only) and the error codes returned."
    )
    client_address: str | None = strawberry.field(description="The client's IP address.")

    @classmethod
    def from_row(cls, row: models.AuditEvent) -> AuditEvent:
        return cls(
            id=encode_id("AuditEvent", row.id),
            at=row.at,
            actor=row.actor,
            actor_kind=row.actor_kind,
            token_id=None if row.token_id is None else encode_id("ApiToken", row.token_id),
            action=row.action,
            object_type=row.object_type,
            object_id=None if row.object_id is None else strawberry.ID(row.object_id),
            outcome=row.outcome,
            detail=None if row.detail is None else JSON(row.detail),
            client_address=row.client_address,
        )


async def resolve_audit_events(
    info: Info,
    first: First = None,
    after: After = None,
    actor: Annotated[
        str | None, strawberry.argument(description="Only this actor's events.")
    ] = None,
    object_id: Annotated[
        strawberry.ID | None,
        strawberry.argument(description="Only events on this object (its global ID)."),
    ] = None,
    action: Annotated[
        str | None, strawberry.argument(description="Only this action, e.g. `createProfile`.")
    ] = None,
    since: Annotated[
        datetime | None,
        strawberry.argument(description="Only events at or after this time (naive: UTC)."),
    ] = None,
    outcome: Annotated[
        str | None, strawberry.argument(description="Only this outcome: ok, error or denied.")
    ] = None,
) -> Connection[AuditEvent]:
    """Audit events, newest first; each filter given narrows (`since`: at or after, naive
    times are UTC; `outcome`: ok, error or denied)."""
    row = models.AuditEvent
    stmt = select(row)
    if actor is not None:
        stmt = stmt.where(row.actor == actor)
    if object_id is not None:
        stmt = stmt.where(row.object_id == object_id)
    if action is not None:
        stmt = stmt.where(row.action == action)
    if outcome is not None:
        stmt = stmt.where(row.outcome == outcome)
    if since is not None:
        stmt = stmt.where(row.at >= (since if since.tzinfo else since.replace(tzinfo=UTC)))
    return await paginate(info, stmt, row.id, AuditEvent.from_row, first, after, descending=True)


async def load_audit_event(info: Info, pk: int) -> AuditEvent | None:
    """One event by primary key (for `node(id:)`)."""
    async with info.context.reading() as session:
        row = await session.get(models.AuditEvent, pk)
    return None if row is None else AuditEvent.from_row(row)


# --- recording ---------------------------------------------------------------------------


def given_fields(info: ResolveInfo, variables: dict[str, Any]) -> list[str]:
    """The names of the arguments the client gave, an input object's by its fields' names
    (from the request as sent: defaults the schema filled in are not "given")."""
    names: list[str] = []
    for argument in info.field_nodes[0].arguments or ():
        value = argument.value
        if isinstance(value, ObjectValueNode):
            names += [field.name.value for field in value.fields]
        elif isinstance(value, VariableNode):
            raw = variables.get(value.name.value)
            if isinstance(raw, dict):
                names += list(raw)  # coerced already: every key is a field of the input
            elif value.name.value in variables:
                names.append(argument.name.value)
        else:
            names.append(argument.name.value)
    return list(dict.fromkeys(names))


def global_id(value: Any) -> str | None:
    """`value` if it is one of our global IDs (anything else may be a mistake that holds
    a secret, and is not recorded)."""
    return value if isinstance(value, str) and decode_id(value) is not None else None


def argument_id(kwargs: dict[str, Any]) -> str | None:
    """The object a mutation was asked about: its `id` argument, or its input's."""
    given = kwargs.get("id")
    if given is None and isinstance(kwargs.get("input"), dict):
        given = kwargs["input"].get("id")
    return global_id(given)


def payload_object_id(payload: Any) -> str | None:
    """The global ID of the object a payload carries (a deleted one's too)."""
    if not dataclasses.is_dataclass(payload):
        return None
    for field in dataclasses.fields(payload):
        value = getattr(payload, field.name)
        if isinstance(value, Node):
            return global_id(value.id)
    return global_id(getattr(payload, "deleted_id", None))


def returned(action: str, payload: Any, kwargs: dict[str, Any], fields: list[str]) -> AuditEntry:
    """The entry of a mutation that returned (its userErrors, if any, make it an error)."""
    codes = [str(error.code) for error in getattr(payload, "user_errors", None) or ()]
    if codes:
        return refused_entry(action, codes, argument_id(kwargs), fields)
    return ok_entry(action, payload_object_id(payload) or argument_id(kwargs), fields)


def raised(action: str, exc: Exception, kwargs: dict[str, Any], fields: list[str]) -> AuditEntry:
    """The entry of a mutation that raised (a GraphQL error, or an unexpected one)."""
    code = (exc.extensions or {}).get("code") if isinstance(exc, GraphQLError) else None
    return raised_entry(action, None if code is None else str(code), argument_id(kwargs), fields)


async def write_context_entry(context: Context, entry: AuditEntry) -> None:
    """Append the entry for the request's principal and client (see `server.audit`)."""
    client = getattr(context.request, "client", None)
    address = None if client is None else client.host
    await write_entry(context.app.sessionmaker, context.principal, entry, address)


class MutationAudit(SchemaExtension):
    """Audits every top-level field of a mutation operation as it finishes (a new instance
    per operation). Other fields pass straight through."""

    def resolve(
        self,
        _next: Callable[..., Any],
        root: Any,
        info: ResolveInfo,
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        if info.path.prev is not None or info.operation.operation is not OperationType.MUTATION:
            return _next(root, info, *args, **kwargs)
        return self._audited(functools.partial(_next, root, info, *args, **kwargs), info, kwargs)

    async def _audited(
        self, run: Callable[[], Any], info: ResolveInfo, kwargs: dict[str, Any]
    ) -> Any:
        action = info.field_name
        fields = given_fields(info, self.execution_context.variables or {})
        # Shielded: a client that hangs up mid-mutation cancels the request, and a mutation
        # that committed just before must still be on record.
        try:
            result = run()
            payload = await result if isawaitable(result) else result
        except asyncio.CancelledError:
            gone = raised_entry(action, "CANCELLED", argument_id(kwargs), fields)  # committed?
            await asyncio.shield(write_context_entry(info.context, gone))
            raise
        except Exception as exc:
            await asyncio.shield(
                write_context_entry(info.context, raised(action, exc, kwargs, fields))
            )
            raise
        await asyncio.shield(
            write_context_entry(info.context, returned(action, payload, kwargs, fields))
        )
        return payload
