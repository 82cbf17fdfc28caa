"""GraphQL: command templates and their declared parameters."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import strawberry
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from strawberry.scalars import JSON

from graphql_schema.context import Info
from graphql_schema.mutation import optional_input, perform, provided
from graphql_schema.relay import (
    USER_ERRORS,
    After,
    Connection,
    DeletePayload,
    First,
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
    name: str = strawberry.field(description="The name `params` gives its value under.")
    type: str = strawberry.field(description=PARAMETER_TYPE_HELP)
    default: JSON | None = strawberry.field(description="The value when a run gives none.")
    required: bool = strawberry.field(description="A run must give a value.")
    choices: list[str] = strawberry.field(description="The allowed values of a `choice` parameter.")
    description: str | None = strawberry.field(
        description="Help text shown next to it in the panel."
    )


@strawberry.type(description="A Jinja2 command line with typed parameters.")
class CommandTemplate(Node):
    id: strawberry.ID = strawberry.field(description="The template's global ID.")
    name: str = strawberry.field(description="Unique name.")
    description: str | None = strawberry.field(description="What the template is for.")
    template: str = strawberry.field(
        description="The Jinja2 command line; every {{ value }} is shell-quoted, the result split "
        "into an argv."
    )
    parameters: list[TemplateParameter] = strawberry.field(
        description="The parameters it declares (a run's `params` fill them)."
    )
    timeout_seconds: int | None = strawberry.field(
        description="A run's time limit in seconds (null: none)."
    )
    max_attempts: int = strawberry.field(
        description="How many attempts a run may make (1: no retry)."
    )
    backoff_seconds: float = strawberry.field(
        description="The first retry's delay in seconds; it doubles each attempt (with jitter)."
    )
    env: JSON = strawberry.field(description="Environment additions for the child (not secrets).")
    created_at: datetime = strawberry.field(description="When the template was made.")
    updated_at: datetime = strawberry.field(description="When the template last changed.")

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


@strawberry.input(description="A parameter a template declares.")
class TemplateParameterInput:
    name: str = strawberry.field(description="The name `params` gives its value under.")
    type: str = strawberry.field(default="string", description=PARAMETER_TYPE_HELP)
    default: JSON | None = optional_input("The value when a run gives none.")
    required: bool | None = optional_input("Default: required when there is no default.")
    choices: list[str] | None = optional_input("The allowed values of a `choice` parameter.")
    description: str | None = optional_input("Help text shown next to it in the panel.")


@strawberry.input(description="A new command template; unset fields take their defaults.")
class CreateCommandTemplateInput:
    name: str = strawberry.field(description="Unique name.")
    template: str = strawberry.field(
        description="The Jinja2 command line; every {{ value }} is shell-quoted, the result split "
        "into an argv."
    )
    description: str | None = optional_input("What the template is for.")
    parameters: list[TemplateParameterInput] | None = optional_input(
        "The parameters it declares (a run's `params` fill them)."
    )
    timeout_seconds: int | None = optional_input("A run's time limit in seconds (null: none).")
    max_attempts: int | None = optional_input("How many attempts a run may make (1: no retry).")
    backoff_seconds: float | None = optional_input(
        "The first retry's delay in seconds; it doubles each attempt (with jitter)."
    )
    env: JSON | None = optional_input("Environment additions for the child (not secrets).")


@strawberry.input(description="Changes to a command template; unset fields stay as they are.")
class UpdateCommandTemplateInput:
    id: strawberry.ID = strawberry.field(description="The template to change.")
    name: str | None = optional_input("Unique name.")
    template: str | None = optional_input(
        "The Jinja2 command line; every {{ value }} is shell-quoted, the result split into an argv."
    )
    description: str | None = optional_input("What the template is for.")
    parameters: list[TemplateParameterInput] | None = optional_input(
        "The parameters it declares (a run's `params` fill them)."
    )
    timeout_seconds: int | None = optional_input("A run's time limit in seconds (null: none).")
    max_attempts: int | None = optional_input("How many attempts a run may make (1: no retry).")
    backoff_seconds: float | None = optional_input(
        "The first retry's delay in seconds; it doubles each attempt (with jitter)."
    )
    env: JSON | None = optional_input("Environment additions for the child (not secrets).")


@strawberry.type(description="The result of a command template mutation.")
class CommandTemplatePayload:
    command_template: CommandTemplate | None = strawberry.field(
        default=None, description="The template as saved (null on error)."
    )
    user_errors: list[UserError] = strawberry.field(default_factory=list, description=USER_ERRORS)


async def resolve_command_templates(
    info: Info, first: First = None, after: After = None
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
    @strawberry.mutation(description="Make a command template.")
    async def create_command_template(
        self,
        info: Info,
        input: Annotated[
            CreateCommandTemplateInput, strawberry.argument(description="The new template.")
        ],
    ) -> CommandTemplatePayload:
        return _payload(
            *await perform(
                info, lambda session: template_domain.create_template(session, provided(input))
            )
        )

    @strawberry.mutation(
        description="Change a command template (commands made from it keep theirs)."
    )
    async def update_command_template(
        self,
        info: Info,
        input: Annotated[
            UpdateCommandTemplateInput, strawberry.argument(description="The changes.")
        ],
    ) -> CommandTemplatePayload:
        async def work(session: AsyncSession) -> models.CommandTemplate:
            pk = pk_of(input.id, "CommandTemplate", field="id")
            return await template_domain.update_template(session, pk, provided(input))

        return _payload(*await perform(info, work))

    @strawberry.mutation(description="Delete a command template; its commands are kept.")
    async def delete_command_template(
        self,
        info: Info,
        id: Annotated[strawberry.ID, strawberry.argument(description="The template to delete.")],
    ) -> DeletePayload:
        async def work(session: AsyncSession) -> list[str]:
            pk = pk_of(id, "CommandTemplate", field="id")
            return await template_domain.delete_template(session, pk)

        notices, errors = await perform(info, work)
        if errors:
            return DeletePayload(user_errors=errors)
        return DeletePayload(deleted_id=id, notices=notices or [])
