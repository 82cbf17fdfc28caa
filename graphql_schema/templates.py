"""GraphQL: command templates and their declared parameters."""

from __future__ import annotations

from datetime import datetime

import strawberry
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from strawberry.scalars import JSON

from graphql_schema.context import Info
from graphql_schema.mutation import perform, provided
from graphql_schema.relay import (
    Connection,
    DeletePayload,
    Node,
    UserError,
    encode_id,
    paginate,
    pk_of,
)
from server import models
from server import templates as template_domain

PARAMETER_TYPE_HELP = "string, int, bool or choice."


@strawberry.type(description="A parameter a template declares; the panel renders a form from it.")
class TemplateParameter:
    name: str
    type: str = strawberry.field(description=PARAMETER_TYPE_HELP)
    default: JSON | None
    required: bool
    choices: list[str]
    description: str | None


@strawberry.type(description="A Jinja2 command line with typed parameters.")
class CommandTemplate(Node):
    id: strawberry.ID
    name: str
    description: str | None
    template: str
    parameters: list[TemplateParameter]
    timeout_seconds: int | None
    max_attempts: int
    backoff_seconds: float
    env: JSON = strawberry.field(description="Environment additions for the child (not secrets).")
    created_at: datetime
    updated_at: datetime

    @classmethod
    def from_row(cls, row: models.CommandTemplate) -> CommandTemplate:
        return cls(
            id=encode_id("CommandTemplate", row.id),
            name=row.name,
            description=row.description,
            template=row.template,
            parameters=[
                TemplateParameter(
                    name=p["name"],
                    type=p["type"],
                    default=p.get("default"),
                    required=bool(p.get("required")),
                    choices=list(p.get("choices") or []),
                    description=p.get("description"),
                )
                for p in row.parameters
            ],
            timeout_seconds=row.timeout_seconds,
            max_attempts=row.max_attempts,
            backoff_seconds=row.backoff_seconds,
            env=JSON(row.env),
            created_at=row.created_at,
            updated_at=row.updated_at,
        )


@strawberry.input
class TemplateParameterInput:
    name: str
    type: str = strawberry.field(default="string", description=PARAMETER_TYPE_HELP)
    default: JSON | None = strawberry.UNSET
    required: bool | None = strawberry.field(
        default=strawberry.UNSET, description="Default: required when there is no default."
    )
    choices: list[str] | None = strawberry.UNSET
    description: str | None = strawberry.UNSET


@strawberry.input
class CreateCommandTemplateInput:
    name: str
    template: str
    description: str | None = strawberry.UNSET
    parameters: list[TemplateParameterInput] | None = strawberry.UNSET
    timeout_seconds: int | None = strawberry.UNSET
    max_attempts: int | None = strawberry.UNSET
    backoff_seconds: float | None = strawberry.UNSET
    env: JSON | None = strawberry.UNSET


@strawberry.input
class UpdateCommandTemplateInput:
    id: strawberry.ID
    name: str | None = strawberry.UNSET
    template: str | None = strawberry.UNSET
    description: str | None = strawberry.UNSET
    parameters: list[TemplateParameterInput] | None = strawberry.UNSET
    timeout_seconds: int | None = strawberry.UNSET
    max_attempts: int | None = strawberry.UNSET
    backoff_seconds: float | None = strawberry.UNSET
    env: JSON | None = strawberry.UNSET


@strawberry.type
class CommandTemplatePayload:
    command_template: CommandTemplate | None = None
    user_errors: list[UserError] = strawberry.field(default_factory=list)


async def resolve_command_templates(
    info: Info, first: int | None = None, after: str | None = None
) -> Connection[CommandTemplate]:
    """Command templates by creation order."""
    return await paginate(
        info,
        select(models.CommandTemplate),
        models.CommandTemplate.id,
        CommandTemplate.from_row,
        first,
        after,
    )


def _payload(row: models.CommandTemplate | None, errors: list[UserError]) -> CommandTemplatePayload:
    return CommandTemplatePayload(
        command_template=None if row is None else CommandTemplate.from_row(row), user_errors=errors
    )


@strawberry.type
class CommandTemplateMutations:
    @strawberry.mutation
    async def create_command_template(
        self, info: Info, input: CreateCommandTemplateInput
    ) -> CommandTemplatePayload:
        return _payload(
            *await perform(
                info, lambda session: template_domain.create_template(session, provided(input))
            )
        )

    @strawberry.mutation
    async def update_command_template(
        self, info: Info, input: UpdateCommandTemplateInput
    ) -> CommandTemplatePayload:
        async def work(session: AsyncSession) -> models.CommandTemplate:
            pk = pk_of(input.id, "CommandTemplate", field="id")
            return await template_domain.update_template(session, pk, provided(input))

        return _payload(*await perform(info, work))

    @strawberry.mutation
    async def delete_command_template(self, info: Info, id: strawberry.ID) -> DeletePayload:
        async def work(session: AsyncSession) -> list[str]:
            pk = pk_of(id, "CommandTemplate", field="id")
            return await template_domain.delete_template(session, pk)

        notices, errors = await perform(info, work)
        if errors:
            return DeletePayload(user_errors=errors)
        return DeletePayload(deleted_id=id, notices=notices or [])
