"""Roles, enforced once, here: what a principal may do once it is in.

`admin` may do everything. `viewer` reads everything but secrets and changes nothing:
- every mutation is refused by `RoleGuard`, a schema extension that sees each top-level
  field of every operation and its operation's type (a new Mutation field is covered
  without doing anything), by the one role rule `server.actions.refusal` that the
  panel's actions ask too;
- every field that shows something of a secret is declared with `secret_field`, whose
  extension refuses it to anyone but an admin.
Without a principal (an in-process caller that passed none) nothing is allowed: a missing
principal is never an admin.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import strawberry
from graphql import GraphQLError, GraphQLResolveInfo, OperationType
from strawberry.extensions import FieldExtension, SchemaExtension
from strawberry.types.base import StrawberryObjectDefinition

from server.actions import refusal
from server.audit import FORBIDDEN
from server.auth import Principal


def unauthenticated_error() -> GraphQLError:
    return GraphQLError(
        "authentication required: send an API token or log in",
        extensions={"code": "UNAUTHENTICATED"},
    )


def forbidden_error(principal: Principal, what: str) -> GraphQLError:
    return GraphQLError(
        f"forbidden: the {principal.role.value} role may not {what} (admins only)",
        extensions={"code": "FORBIDDEN"},
    )


def require_admin(principal: Principal | None, what: str) -> Principal:
    """The principal when it is an admin; otherwise the GraphQL error that refuses `what`."""
    if principal is None:
        raise unauthenticated_error()
    if not principal.is_admin:
        raise forbidden_error(principal, what)
    return principal


def require_principal(principal: Principal | None) -> Principal:
    """The principal, or the UNAUTHENTICATED error."""
    if principal is None:
        raise unauthenticated_error()
    return principal


class RoleGuard(SchemaExtension):
    """Refuses any operation without a principal (before anything runs), and every
    top-level field of a mutation (over HTTP or a WebSocket) to anyone but an admin, as
    the field is about to run: no resolver of it runs, so nothing changes, and the audit
    log (MutationAudit, outside this) records each refusal as `denied`."""

    def on_execute(self) -> Iterator[None]:
        if getattr(self.execution_context.context, "principal", None) is None:
            raise unauthenticated_error()
        yield

    def resolve(
        self,
        _next: Callable[..., Any],
        root: Any,
        info: GraphQLResolveInfo[Any],
        *args: Any,
        **kwargs: Any,
    ) -> Any:
        if info.path.prev is None and info.operation.operation is OperationType.MUTATION:
            principal: Principal | None = info.context.principal
            if principal is None:
                raise unauthenticated_error()
            refused = refusal(principal, info.field_name, "run mutations")
            if refused is not None:
                raise GraphQLError(refused, extensions={"code": FORBIDDEN})
        return _next(root, info, *args, **kwargs)


class SecretField(FieldExtension):
    """Refuses the field to anyone but an admin (a FORBIDDEN error on that field)."""

    def resolve(self, next_: Callable[..., Any], source: Any, info: Any, **kwargs: Any) -> Any:
        require_admin_for(info)
        return next_(source, info, **kwargs)

    async def resolve_async(
        self, next_: Callable[..., Awaitable[Any]], source: Any, info: Any, **kwargs: Any
    ) -> Any:
        require_admin_for(info)
        return await next_(source, info, **kwargs)


def require_admin_for(info: Any) -> None:
    require_admin(info.context.principal, f"read {info.path.typename}.{info.field_name}")


def secret_field(
    description: str,
    resolver: Callable[..., Any] | None = None,
    metadata: dict[str, Any] | None = None,
) -> Any:
    """A field that shows something of a secret (a preview): admins only."""
    return strawberry.field(
        resolver=resolver,  # type: ignore[arg-type]  # None: a plain field
        description=f"{description} Admins only (FORBIDDEN for a viewer).",
        extensions=[SecretField()],
        metadata=metadata,
    )


def secret_fields(schema: strawberry.Schema) -> set[tuple[str, str]]:
    """(type, field) of every field declared with `secret_field`, by their GraphQL names."""
    found = set()
    for type_ in schema.schema_converter.type_map.values():
        definition = type_.definition
        if not isinstance(definition, StrawberryObjectDefinition):
            continue
        for field in definition.fields:
            if any(isinstance(extension, SecretField) for extension in field.extensions):
                found.add((definition.name, schema.config.name_converter.get_graphql_name(field)))
    return found
