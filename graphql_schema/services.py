"""GraphQL: services, their shared tokens (write-only) and profiles' links to them."""

from __future__ import annotations

import enum
from collections.abc import AsyncGenerator
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Annotated

import strawberry
from graphql import GraphQLError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from strawberry.scalars import JSON

from graphql_schema.context import Info
from graphql_schema.direct import answer_at_once
from graphql_schema.limits import CountedList
from graphql_schema.mutation import perform, provided
from graphql_schema.permissions import secret_field
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
from server import services as service_domain
from server.broker import USAGE_TOPIC, UsageRecorded
from server.db import READ_ONLY
from server.errors import InvalidInput
from server.probes import HISTORY_MAX, probe_service
from server.usage import TokenKey, latest_observations, spent_since

if TYPE_CHECKING:
    from graphql_schema.profiles import Profile

ProfileRef = Annotated["Profile", strawberry.lazy("graphql_schema.profiles")]


@strawberry.enum(description="Where an observation of a token's budget came from.")
class UsageSource(enum.Enum):
    EVENT = "event"
    PROBE = "probe"
    COUNT = "count"


@strawberry.type(description="The latest known budget of a token at its provider.")
class ServiceUsage:
    remaining: int | None
    limit: int | None
    reset_at: datetime | None
    observed_at: datetime
    token_valid: bool | None = strawberry.field(
        description="False when the provider refused the token (401); null: not known."
    )
    units: int | None = strawberry.field(description="Units a run reported spending.")
    source: UsageSource = strawberry.field(
        description="EVENT (a run's usage line), PROBE (the provider asked), COUNT (Corral's)."
    )
    detail: str | None = strawberry.field(
        description="The provider's answer when it gave no figures (an error, a timeout), "
        "or more figures (an OpenAI token budget); never a secret."
    )
    age_seconds: float = strawberry.field(description="How long ago it was observed.")
    shared_token: bool = strawberry.field(
        description="Whether this is the service's shared token (else a profile's own)."
    )

    @classmethod
    def from_row(cls, row: models.ServiceUsage) -> ServiceUsage:
        return cls(
            remaining=row.remaining,
            limit=row.limit,
            reset_at=row.reset_at,
            observed_at=row.observed_at,
            token_valid=row.token_valid,
            units=row.units,
            source=UsageSource(row.source),
            detail=row.detail,
            age_seconds=max((models.utcnow() - row.observed_at).total_seconds(), 0.0),
            shared_token=row.profile_id is None,
        )


@strawberry.type(description="One observation of a token's budget, for a chart.")
class UsagePoint:
    observed_at: datetime
    remaining: int | None
    limit: int | None


@strawberry.type(description="The observations of one token of a service, oldest first.")
class TokenUsageHistory:
    shared_token: bool = strawberry.field(
        description="The service's shared token (else a profile's)."
    )
    profile: ProfileRef | None = strawberry.field(description="Whose own token (null: shared).")
    points: list[UsagePoint]


def _shared_token_preview(root: Service, info: Info) -> str | None:
    # Decrypted only when asked for (issue 16: a page of profiles decrypted every linked
    # service's shared token, asked or not).
    return info.context.token_preview(root.row.token_encrypted)


@strawberry.type(description="An outside provider (GitHub, OpenAI, ...) whose token a child gets.")
class Service(Node):
    id: strawberry.ID
    name: str
    kind: str
    base_url: str | None
    env_var: str = strawberry.field(description="The variable a child receives the token in.")
    has_token: bool = strawberry.field(description="Whether a shared token is set.")
    token_preview: str | None = secret_field(
        "e.g. `ghp_…a1b2`; never the token.",
        resolver=_shared_token_preview,
        metadata=answer_at_once(_shared_token_preview),
    )
    settings: JSON
    rate_limit_policy: JSON
    created_at: datetime
    updated_at: datetime
    row: strawberry.Private[models.Service]

    @classmethod
    def from_row(cls, row: models.Service) -> Service:
        return cls(
            id=encode_id("Service", row.id),
            name=row.name,
            kind=row.kind,
            base_url=row.base_url,
            env_var=row.env_var,
            has_token=row.token_encrypted is not None,
            settings=JSON(row.settings),
            rate_limit_policy=JSON(row.rate_limit_policy),
            created_at=row.created_at,
            updated_at=row.updated_at,
            row=row,
        )

    @strawberry.field(description="Profiles linked to this service.", extensions=[CountedList()])
    async def profiles(self, info: Info) -> list[ProfileRef]:
        from graphql_schema.profiles import Profile

        rows = await info.context.loaders.service_profiles.load(self.row.id)
        return [Profile.from_row(row) for row in rows]

    @strawberry.field(description="The latest known budget of the shared token.")
    async def usage(self, info: Info) -> ServiceUsage | None:
        row = await info.context.loaders.service_usage.load(self.row.id)
        return None if row is None else ServiceUsage.from_row(row)

    @strawberry.field(
        description="The observations since `since` (default: 24 hours ago) per token, "
        f"oldest first; at most {HISTORY_MAX} points a token (the latest).",
        extensions=[CountedList()],
    )
    async def usage_history(
        self, info: Info, since: datetime | None = None
    ) -> list[TokenUsageHistory]:
        from graphql_schema.profiles import Profile

        start = since or models.utcnow() - timedelta(hours=24)
        rows = await info.context.loaders.usage_history.load((self.row.id, start))
        histories = []
        for profile, points in rows:
            histories.append(
                TokenUsageHistory(
                    shared_token=profile is None,
                    profile=None if profile is None else Profile.from_row(profile),
                    points=[
                        UsagePoint(observed_at=t, remaining=r, limit=lim) for t, r, lim in points
                    ],
                )
            )
        return histories


@strawberry.input
class CreateServiceInput:
    name: str
    env_var: str = strawberry.field(description="e.g. GITHUB_TOKEN")
    kind: str | None = strawberry.UNSET
    base_url: str | None = strawberry.UNSET
    token: str | None = strawberry.field(
        default=strawberry.UNSET, description="Shared token; write-only."
    )
    settings: JSON | None = strawberry.UNSET
    rate_limit_policy: JSON | None = strawberry.UNSET


@strawberry.input
class UpdateServiceInput:
    id: strawberry.ID
    name: str | None = strawberry.UNSET
    env_var: str | None = strawberry.UNSET
    kind: str | None = strawberry.UNSET
    base_url: str | None = strawberry.UNSET
    token: str | None = strawberry.field(
        default=strawberry.UNSET, description="Shared token; write-only; null removes it."
    )
    settings: JSON | None = strawberry.UNSET
    rate_limit_policy: JSON | None = strawberry.UNSET


@strawberry.input
class LinkServiceInput:
    profile_id: strawberry.ID
    service_id: strawberry.ID
    token: str | None = strawberry.field(
        default=strawberry.UNSET,
        description="The profile's own account token (overrides the shared one); write-only.",
    )
    rate_limit_policy: JSON | None = strawberry.field(
        default=strawberry.UNSET,
        description="Overrides the service's rateLimitPolicy key by key; null clears it.",
    )


@strawberry.type
class ServicePayload:
    service: Service | None = None
    user_errors: list[UserError] = strawberry.field(default_factory=list)


@strawberry.type
class LinkServicePayload:
    profile: ProfileRef | None = None
    service: Service | None = None
    user_errors: list[UserError] = strawberry.field(default_factory=list)


async def resolve_services(
    info: Info, first: int | None = None, after: str | None = None
) -> Connection[Service]:
    """Services by creation order."""
    return await paginate(
        info,
        select(models.Service),
        models.Service.id,
        Service.from_row,
        first,
        after,
    )


@strawberry.type
class ServiceMutations:
    @strawberry.mutation
    async def create_service(self, info: Info, input: CreateServiceInput) -> ServicePayload:
        box = info.context.secret_box
        row, errors = await perform(
            info, lambda session: service_domain.create_service(session, box, provided(input))
        )
        return ServicePayload(
            service=None if row is None else Service.from_row(row), user_errors=errors
        )

    @strawberry.mutation
    async def update_service(self, info: Info, input: UpdateServiceInput) -> ServicePayload:
        box = info.context.secret_box

        async def work(session: AsyncSession) -> models.Service:
            pk = pk_of(input.id, "Service", field="id")
            return await service_domain.update_service(session, box, pk, provided(input))

        row, errors = await perform(info, work)
        return ServicePayload(
            service=None if row is None else Service.from_row(row), user_errors=errors
        )

    @strawberry.mutation
    async def delete_service(self, info: Info, id: strawberry.ID) -> DeletePayload:
        async def work(session: AsyncSession) -> list[str]:
            return await service_domain.delete_service(session, pk_of(id, "Service", field="id"))

        notices, errors = await perform(info, work)
        if errors:
            return DeletePayload(user_errors=errors)
        return DeletePayload(deleted_id=id, notices=notices or [])

    @strawberry.mutation(
        description="Ask the service's provider now for the budget of its shared token and of "
        "each linked profile's own token; the answers are recorded as PROBE observations."
    )
    async def probe_service(self, info: Info, id: strawberry.ID) -> ServicePayload:
        ctx = info.context

        async def work(session: AsyncSession) -> models.Service:
            pk = pk_of(id, "Service", field="id")
            return await probe_service(
                session, ctx.app.sessionmaker, ctx.settings, ctx.secret_box, pk
            )

        row, errors = await perform(info, work)
        return ServicePayload(
            service=None if row is None else Service.from_row(row), user_errors=errors
        )

    @strawberry.mutation(description="Link a profile to a service, optionally with its own token.")
    async def link_service(self, info: Info, input: LinkServiceInput) -> LinkServicePayload:
        from graphql_schema.profiles import Profile

        box = info.context.secret_box

        async def work(session: AsyncSession) -> tuple[models.Profile, models.Service]:
            profile_pk = pk_of(input.profile_id, "Profile", field="profileId")
            service_pk = pk_of(input.service_id, "Service", field="serviceId")
            values = provided(input, skip=("profile_id", "service_id"))
            link = await service_domain.link_service(session, box, profile_pk, service_pk, values)
            profile = await session.get_one(models.Profile, link.profile_id)
            return profile, await session.get_one(models.Service, link.service_id)

        result, errors = await perform(info, work)
        if result is None:
            return LinkServicePayload(user_errors=errors)
        return LinkServicePayload(
            profile=Profile.from_row(result[0]), service=Service.from_row(result[1])
        )

    @strawberry.mutation(description="Remove a profile's link to a service (and its own token).")
    async def unlink_service(
        self, info: Info, profile_id: strawberry.ID, service_id: strawberry.ID
    ) -> LinkServicePayload:
        from graphql_schema.profiles import Profile

        async def work(session: AsyncSession) -> tuple[models.Profile, models.Service]:
            profile_pk = pk_of(profile_id, "Profile", field="profileId")
            service_pk = pk_of(service_id, "Service", field="serviceId")
            await service_domain.unlink_service(session, profile_pk, service_pk)
            profile = await session.get_one(models.Profile, profile_pk)
            return profile, await session.get_one(models.Service, service_pk)

        result, errors = await perform(info, work)
        if result is None:
            return LinkServicePayload(user_errors=errors)
        return LinkServicePayload(
            profile=Profile.from_row(result[0]), service=Service.from_row(result[1])
        )


@strawberry.type(
    description="A token's budget as last known, as the serviceUsage subscription sends it."
)
class TokenUsage:
    service: Service = strawberry.field(description="The service the token is for.")
    profile: ProfileRef | None = strawberry.field(
        description="Whose own token this is (null: the service's shared token)."
    )
    usage: ServiceUsage = strawberry.field(description="The token's latest observation.")
    runs_since_observation: int = strawberry.field(
        description="Runs Corral started with this token since that observation (its own "
        "count; the gate subtracts them from `usage.remaining`)."
    )


async def follow_service_usage(
    info: Info, service_id: strawberry.ID | None
) -> AsyncGenerator[TokenUsage, None]:
    """The latest observation of each token of the service (of every service without an
    id), then each token again whenever something new is known of it: a new observation
    (a probe, a run's usage event) or Corral's count (a run started with it)."""
    app = info.context.app
    pk = None if service_id is None else _service_pk(service_id)
    sent: dict[TokenKey, tuple[int, int]] = {}
    async with app.broker.subscribe(USAGE_TOPIC) as subscription:  # before the first read
        first = await _changed_tokens(info, pk, sent, must_exist=pk is not None)
        for update in first:
            yield update
        while True:
            message = await subscription.get()
            if message is None:  # lagged: re-read every token it follows
                subscription.resync()
                wanted = pk
            elif not isinstance(message, UsageRecorded) or (
                pk is not None and message.service_id != pk
            ):
                continue
            else:
                wanted = message.service_id
            for update in await _changed_tokens(info, wanted, sent):
                yield update


def _service_pk(service_id: str) -> int:
    try:
        return pk_of(service_id, "Service", field="serviceId")
    except InvalidInput as exc:
        raise GraphQLError("no such service (not a Service ID)") from exc


async def _changed_tokens(
    info: Info,
    service_id: int | None,
    sent: dict[TokenKey, tuple[int, int]],
    *,
    must_exist: bool = False,
) -> list[TokenUsage]:
    """The tokens of `service_id` (None: of every service) whose latest observation or count
    differs from what `sent` says was sent last; `sent` is brought up to date."""
    from graphql_schema.profiles import Profile

    async with info.context.app.stream_sessions() as session:
        await session.connection(execution_options=READ_ONLY)  # no write lock on SQLite
        stmt = select(models.Service)
        if service_id is not None:
            stmt = stmt.where(models.Service.id == service_id)
        services = {row.id: row for row in await session.scalars(stmt)}
        if must_exist and not services:
            raise GraphQLError("no such service", extensions={"code": "NOT_FOUND"})
        observed = await latest_observations(session, list(services))
        spent = await spent_since(session, observed)
        profile_ids = {key[1] for key in observed if key[1] is not None}
        profiles = {
            row.id: row
            for row in await session.scalars(
                select(models.Profile).where(models.Profile.id.in_(profile_ids))
            )
        }
    updates = []
    for key in sorted(observed, key=lambda key: (key[0], key[1] or 0)):
        row, count = observed[key], spent.get(key, 0)
        if sent.get(key) == (row.id, count):
            continue
        sent[key] = (row.id, count)
        profile = None if key[1] is None else profiles.get(key[1])
        updates.append(
            TokenUsage(
                service=Service.from_row(services[key[0]]),
                profile=None if profile is None else Profile.from_row(profile),
                usage=ServiceUsage.from_row(row),
                runs_since_observation=count,
            )
        )
    return updates
