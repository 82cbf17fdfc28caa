"""Relay plumbing: the Node interface, global IDs, cursor connections, user errors."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable, Iterable, Iterator, Sequence
from typing import Annotated, Any, Generic, TypeVar

import strawberry
from graphql import GraphQLError
from sqlalchemy import Select, func, select
from strawberry.types.nodes import SelectedField, Selection

from graphql_schema.context import Info
from server.errors import ErrorCode, InvalidInput
from server.errors import UserError as UserErrorValue
from server.ids import MAX_PK, decode_global_id, encode_global_id

DEFAULT_PAGE_SIZE = 50
T = TypeVar("T")

USER_ERRORS = "What was wrong with the input; empty when it succeeded."
First = Annotated[
    int | None,
    strawberry.argument(description=f"At most this many items (default {DEFAULT_PAGE_SIZE})."),
]
After = Annotated[
    str | None, strawberry.argument(description="Start after this cursor (`pageInfo.endCursor`).")
]


@strawberry.interface(description="An object with a global ID.")
class Node:
    id: strawberry.ID = strawberry.field(description="The global ID (opaque; use it as is).")


@strawberry.type(description="A problem with the input that the client can fix.")
class UserError:
    field: list[str] | None = strawberry.field(description="Path to the input field at fault.")
    message: str = strawberry.field(description="What is wrong, in words a person can act on.")
    code: str = strawberry.field(
        description="A stable machine-readable code, e.g. `INVALID`, `NOT_FOUND`, `TAKEN`."
    )

    @classmethod
    def from_value(cls, error: UserErrorValue) -> UserError:
        return cls(field=list(error.field) or None, message=error.message, code=error.code.value)


def user_errors(exc: InvalidInput) -> list[UserError]:
    """The GraphQL form of a domain InvalidInput."""
    return [UserError.from_value(error) for error in exc.errors]


def encode_id(type_name: str, pk: int) -> strawberry.ID:
    """Relay global ID: base64 of `Type:pk`."""
    return strawberry.ID(encode_global_id(type_name, pk))


def decode_id(global_id: str) -> tuple[str, int] | None:
    """(type name, pk) of a global ID, or None when it is not one of ours."""
    return decode_global_id(global_id)


def pk_of(global_id: str, type_name: str, *, field: str) -> int:
    """The primary key of a global ID of the given type, or a NOT_FOUND user error on `field`
    (which never quotes the value: a client may have pasted a token where the ID goes)."""
    decoded = decode_id(global_id)
    if decoded is None or decoded[0] != type_name:
        raise InvalidInput.one(
            field, f"not a {type_name} ID (not an ID, or another type's)", ErrorCode.NOT_FOUND
        )
    return decoded[1]


def optional_pk(global_id: str | None, type_name: str, *, field: str) -> int | None:
    return None if global_id is None else pk_of(global_id, type_name, field=field)


@strawberry.type(description="Where a page sits in its connection.")
class PageInfo:
    has_next_page: bool = strawberry.field(description="More items follow this page.")
    has_previous_page: bool = strawberry.field(description="Items come before this page.")
    start_cursor: str | None = strawberry.field(
        description="The first edge's cursor (null on an empty page)."
    )
    end_cursor: str | None = strawberry.field(
        description="The last edge's cursor: pass it as `after` for the next page."
    )


@strawberry.type(description="One item of a connection with its cursor.")
class Edge(Generic[T]):
    cursor: str = strawberry.field(description="Opaque position of this item; pass as `after`.")
    node: T = strawberry.field(description="The item.")


@strawberry.type(description="A page of results; page on with `after: pageInfo.endCursor`.")
class Connection(Generic[T]):
    edges: list[Edge[T]] = strawberry.field(description="The items of this page with cursors.")
    page_info: PageInfo = strawberry.field(description="Where this page sits; how to page on.")
    _count: strawberry.Private[Callable[[], Awaitable[int]]]

    @strawberry.field(description="How many items match, over all pages.")
    async def total_count(self) -> int:
        return await self._count()

    @strawberry.field(description="The items of this page (the edges' nodes).")
    def nodes(self) -> list[T]:
        return [edge.node for edge in self.edges]


def _fields(selections: Iterable[Selection]) -> Iterator[SelectedField]:
    """The fields of a selection, those of its fragments included."""
    for selection in selections:
        if isinstance(selection, SelectedField):
            yield selection
        else:
            yield from _fields(selection.selections)


def node_fields(info: Info) -> set[str]:
    """The GraphQL names of the fields a connection's resolver is asked of its nodes (under
    `edges { node }` and `nodes`, fragments included; directives ignored: a field under
    `@skip` counts as asked)."""
    names: set[str] = set()
    for connection in _fields(info.selected_fields):
        for child in _fields(connection.selections):
            if child.name == "nodes":
                names.update(field.name for field in _fields(child.selections))
            elif child.name == "edges":
                for node in _fields(child.selections):
                    if node.name == "node":
                        names.update(field.name for field in _fields(node.selections))
    return names


def encode_cursor(pk: int) -> str:
    return base64.b64encode(f"cursor:{pk}".encode()).decode()


def decode_cursor(cursor: str) -> int:
    try:
        prefix, _, raw = base64.b64decode(cursor, validate=True).decode().partition(":")
        if prefix == "cursor" and raw.isascii() and raw.isdigit() and int(raw) <= MAX_PK:
            return int(raw)
    except (binascii.Error, ValueError):  # ValueError: a non-ASCII string (b64decode)
        pass
    raise GraphQLError(f"invalid cursor {cursor[:64]!r}: pass a pageInfo.endCursor")


async def paginate(
    info: Info,
    stmt: Select[Any],
    id_column: Any,
    convert: Callable[[Any], T],
    first: int | None,
    after: str | None,
    *,
    descending: bool = False,
    plain_rows: bool = False,
) -> Connection[T]:
    """Keyset pagination by primary key (stable under inserts), `first` items after `after`
    (newest first when `descending`). With `plain_rows`, `convert` is given the statement's
    rows as Core reads them (the columns by name, their types' values), not ORM objects: a
    page of 500 profiles as ORM objects cost twice the hand-written query (issue 16)."""
    limit = DEFAULT_PAGE_SIZE if first is None else first
    maximum = info.context.settings.page_size_max
    if not 0 <= limit <= maximum:
        raise GraphQLError(f"first must be between 0 and {maximum}")
    page_stmt = stmt.order_by(id_column.desc() if descending else id_column).limit(limit + 1)
    if after is not None:
        cursor = decode_cursor(after)
        page_stmt = page_stmt.where(id_column < cursor if descending else id_column > cursor)
    async with info.context.reading() as session:
        rows: Sequence[Any]
        if plain_rows:
            rows = (await (await session.connection()).execute(page_stmt)).all()
        else:
            rows = (await session.scalars(page_stmt)).all()

    async def count() -> int:
        async with info.context.reading() as session:
            return int(await session.scalar(select(func.count()).select_from(stmt.subquery())) or 0)

    edges = [
        Edge(cursor=encode_cursor(getattr(row, "id")), node=convert(row))  # noqa: B009
        for row in rows[:limit]
    ]
    return Connection(
        edges=edges,
        page_info=PageInfo(
            has_next_page=len(rows) > limit,
            has_previous_page=after is not None,
            start_cursor=edges[0].cursor if edges else None,
            end_cursor=edges[-1].cursor if edges else None,
        ),
        _count=count,
    )


@strawberry.type(
    description="The result of a delete: the deleted object's ID and what else changed."
)
class DeletePayload:
    deleted_id: strawberry.ID | None = strawberry.field(
        default=None, description="The deleted object's global ID (null when nothing was deleted)."
    )
    notices: list[str] = strawberry.field(
        default_factory=list, description="What else the delete did or kept, in words."
    )
    user_errors: list[UserError] = strawberry.field(default_factory=list, description=USER_ERRORS)
