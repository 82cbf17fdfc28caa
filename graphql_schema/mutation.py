"""The shape every mutation shares: one unit of work, user errors as values."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import strawberry
from sqlalchemy.ext.asyncio import AsyncSession

from graphql_schema.context import Info
from graphql_schema.relay import UserError, user_errors
from server.errors import InvalidInput

T = TypeVar("T")


def optional_input(description: str) -> Any:
    """An input field a client may leave out: UNSET, which `provided` skips."""
    return strawberry.field(default=strawberry.UNSET, description=description)


async def perform(
    info: Info, work: Callable[[AsyncSession], Awaitable[T]]
) -> tuple[T | None, list[UserError]]:
    """Run `work` in one transaction; an InvalidInput becomes userErrors and nothing is written."""
    try:
        async with info.context.writing() as session:
            result = await work(session)
    except InvalidInput as exc:
        return None, user_errors(exc)
    return result, []


def _camel(name: str) -> str:
    head, *rest = name.split("_")
    return head + "".join(part.title() for part in rest)


def provided(data: object, *, skip: tuple[str, ...] = ("id",)) -> dict[str, Any]:
    """The input's given fields by API (camelCase) name; UNSET fields are left out."""
    values: dict[str, Any] = {}
    for name, value in vars(data).items():
        if name in skip or value is strawberry.UNSET or name.startswith("_"):
            continue
        values[_camel(name)] = _plain(value)
    return values


def _plain(value: Any) -> Any:
    """Strawberry input objects inside lists (e.g. parameters) as plain dicts."""
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if hasattr(value, "__strawberry_definition__"):
        return {_camel(k): _plain(v) for k, v in vars(value).items() if v is not strawberry.UNSET}
    if hasattr(value, "value") and type(value).__module__.startswith("graphql_schema"):
        return value.value
    return value
