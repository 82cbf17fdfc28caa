"""GraphQL: who am I (`me`), and API tokens (made, listed and revoked by admins).

A token's plaintext is in `createApiToken`'s payload only, once; afterwards only its
preview (admins only) and its hash (never readable) are kept.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import strawberry
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from graphql_schema.context import Info
from graphql_schema.enums import Role
from graphql_schema.mutation import perform
from graphql_schema.permissions import require_principal, secret_field
from graphql_schema.relay import (
    USER_ERRORS,
    After,
    Connection,
    First,
    Node,
    UserError,
    encode_id,
    paginate,
    pk_of,
)
from server import auth, models


@strawberry.type(description="Who the request acts as.")
class Me:
    name: str = strawberry.field(description="The user's name, or the API token's name.")
    role: Role = strawberry.field(description="What it may do.")
    kind: str = strawberry.field(description="`user` (a login session) or `token` (an API token).")


@strawberry.type(description="A bearer token for the API (`crl_...`); only a preview is kept.")
class ApiToken(Node):
    id: strawberry.ID = strawberry.field(description="The token's global ID.")
    name: str = strawberry.field(description="A name to know it by.")
    role: Role = strawberry.field(description="What it may do.")
    # Nullable so that a viewer's FORBIDDEN nulls this field only, not the whole list.
    preview: str | None = secret_field("e.g. `crl_AbCd…wxyz`; never the token.")
    created_by: str | None = strawberry.field(description="Who made it (a user name or `cli`).")
    created_at: datetime = strawberry.field(description="When it was made.")
    expires_at: datetime | None = strawberry.field(
        description="When it stops working (null: never)."
    )
    last_used_at: datetime | None = strawberry.field(
        description="When it last authenticated a request (updated at most once a minute)."
    )
    revoked_at: datetime | None = strawberry.field(
        description="When it was revoked (null: not revoked)."
    )
    active: bool = strawberry.field(description="Neither revoked nor expired.")

    @classmethod
    def from_row(cls, row: models.ApiToken) -> ApiToken:
        return cls(
            id=encode_id("ApiToken", row.id),
            name=row.name,
            role=Role(row.role),
            preview=row.preview,
            created_by=row.created_by,
            created_at=row.created_at,
            expires_at=row.expires_at,
            last_used_at=row.last_used_at,
            revoked_at=row.revoked_at,
            active=auth.token_is_active(row),
        )


@strawberry.input(description="A new API token.")
class CreateApiTokenInput:
    name: str = strawberry.field(description="A name to know it by.")
    role: Role | None = strawberry.field(
        default=Role.VIEWER, description="What it may do (default VIEWER)."
    )
    expires_at: datetime | None = strawberry.field(
        default=None, description="When it stops working (null: never); in the future."
    )


@strawberry.type(description="The result of an API token mutation.")
class ApiTokenPayload:
    api_token: ApiToken | None = strawberry.field(
        default=None, description="The token's record (null on error)."
    )
    plaintext: str | None = strawberry.field(
        default=None,
        description="The token itself: shown here once, never again. Send it as "
        "`Authorization: Bearer <plaintext>`.",
    )
    user_errors: list[UserError] = strawberry.field(default_factory=list, description=USER_ERRORS)


def resolve_me(info: Info) -> Me:
    """Who the request acts as."""
    principal = require_principal(info.context.principal)
    return Me(name=principal.name, role=Role(principal.role.value), kind=principal.kind)


async def resolve_api_tokens(
    info: Info, first: First = None, after: After = None
) -> Connection[ApiToken]:
    """API tokens by creation order, revoked and expired ones included."""
    require_principal(info.context.principal)
    return await paginate(
        info, select(models.ApiToken), models.ApiToken.id, ApiToken.from_row, first, after
    )


@strawberry.type
class AccessMutations:
    @strawberry.mutation(description="Make an API token; its plaintext is in this payload only.")
    async def create_api_token(
        self,
        info: Info,
        input: Annotated[CreateApiTokenInput, strawberry.argument(description="The new token.")],
    ) -> ApiTokenPayload:
        hasher = info.context.app.token_hasher
        principal = info.context.principal

        async def work(session: AsyncSession) -> tuple[models.ApiToken, str]:
            return await auth.create_api_token(
                session,
                hasher,
                name=input.name,
                role=(input.role or Role.VIEWER).value,
                created_by=principal,
                expires_at=input.expires_at,
            )

        result, errors = await perform(info, work)
        if result is None:
            return ApiTokenPayload(user_errors=errors)
        row, plaintext = result
        return ApiTokenPayload(api_token=ApiToken.from_row(row), plaintext=plaintext)

    @strawberry.mutation(description="Revoke an API token: its next request is refused (401).")
    async def revoke_api_token(
        self,
        info: Info,
        id: Annotated[strawberry.ID, strawberry.argument(description="The token to revoke.")],
    ) -> ApiTokenPayload:
        async def work(session: AsyncSession) -> models.ApiToken:
            return await auth.revoke_api_token(session, pk_of(id, "ApiToken", field="id"))

        row, errors = await perform(info, work)
        return ApiTokenPayload(
            api_token=None if row is None else ApiToken.from_row(row), user_errors=errors
        )
