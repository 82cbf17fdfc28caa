"""GraphQL: profiles, their service links and proxies."""

from __future__ import annotations

from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Protocol

import strawberry
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from strawberry.scalars import JSON

from graphql_schema.context import Info
from graphql_schema.direct import NOT_AT_ONCE, answer_at_once
from graphql_schema.limits import CountedList
from graphql_schema.loaders import ProxyUse
from graphql_schema.mutation import optional_input, perform, provided
from graphql_schema.permissions import secret_field
from graphql_schema.relay import (
    USER_ERRORS,
    After,
    Connection,
    DeletePayload,
    First,
    Node,
    UserError,
    encode_id,
    node_fields,
    paginate,
    pk_of,
)
from server import models
from server import profiles as profile_service

if TYPE_CHECKING:
    from graphql_schema.commands import Command
    from graphql_schema.proxies import Proxy
    from graphql_schema.services import Service, ServiceUsage

ProxyRef = Annotated["Proxy", strawberry.lazy("graphql_schema.proxies")]
ServiceRef = Annotated["Service", strawberry.lazy("graphql_schema.services")]
CommandRef = Annotated["Command", strawberry.lazy("graphql_schema.commands")]
ServiceUsageRef = Annotated["ServiceUsage", strawberry.lazy("graphql_schema.services")]


def _link_token_preview(root: ProfileServiceLink, info: Info) -> str | None:
    # Decrypted only when asked for (issue 16).
    return info.context.token_preview(root.token_encrypted)


def _prefetched_services(profile: Profile, _info: Any) -> Any:
    return NOT_AT_ONCE if profile.service_links is None else profile.service_links


def _prefetched_proxies(profile: Profile, _info: Any) -> Any:
    return NOT_AT_ONCE if profile.proxy_use is None else profile.proxy_use.proxies


def _prefetched_default_proxy(profile: Profile, _info: Any) -> Any:
    return NOT_AT_ONCE if profile.proxy_use is None else profile.proxy_use.default


@strawberry.type(description="A profile's link to a service, with the profile's own account token.")
class ProfileServiceLink:
    service: ServiceRef = strawberry.field(description="The linked service.")
    has_token: bool = strawberry.field(description="Whether the profile has its own token.")
    token_preview: str | None = secret_field(
        "e.g. `ghp_…a1b2`; never the token.",
        resolver=_link_token_preview,
        metadata=answer_at_once(_link_token_preview),
    )
    rate_limit_policy: JSON = strawberry.field(
        description="Overrides the service's rateLimitPolicy key by key for this profile."
    )
    created_at: datetime = strawberry.field(description="When the link was made.")
    token_encrypted: strawberry.Private[bytes | None]
    profile_id: strawberry.Private[int]

    @strawberry.field(
        description="The latest known budget of the token this profile's runs use: its own "
        "token's, else the service's shared token's (see `sharedToken`)."
    )
    async def usage(self, info: Info) -> ServiceUsageRef | None:
        from graphql_schema.services import ServiceUsage

        loaders = info.context.loaders
        service_id = self.service.row.id
        if self.token_encrypted is None:
            row = await loaders.service_usage.load(service_id)
        else:
            row = await loaders.own_token_usage.load((service_id, self.profile_id))
        return None if row is None else ServiceUsage.from_row(row)


class ProfileRecord(Protocol):
    """What a Profile node reads of its row: an ORM `models.Profile`, or (a page's) Core
    row of the profiles table, whose columns are named as the model's attributes."""

    @property
    def id(self) -> int: ...
    @property
    def name(self) -> str: ...
    @property
    def user_data_dir(self) -> str | None: ...
    @property
    def user_agent(self) -> str | None: ...
    @property
    def locale(self) -> str | None: ...
    @property
    def timezone(self) -> str | None: ...
    @property
    def viewport_width(self) -> int | None: ...
    @property
    def viewport_height(self) -> int | None: ...
    @property
    def headless(self) -> bool: ...
    @property
    def tags(self) -> list[str]: ...
    @property
    def notes(self) -> str | None: ...
    @property
    def runner_affinity(self) -> str | None: ...
    @property
    def created_at(self) -> datetime: ...
    @property
    def updated_at(self) -> datetime: ...


@strawberry.type(description="A Chrome profile: a user-data-dir with its browser settings.")
class Profile(Node):
    id: strawberry.ID = strawberry.field(description="The profile's global ID.")
    name: str = strawberry.field(description="Unique name.")
    user_agent: str | None = strawberry.field(
        description="The browser's User-Agent (null: Chromium's own)."
    )
    locale: str | None = strawberry.field(description="Browser locale, e.g. `en-US`.")
    timezone: str | None = strawberry.field(description="IANA time zone, e.g. `Europe/Berlin`.")
    viewport_width: int | None = strawberry.field(description="Viewport width in CSS pixels.")
    viewport_height: int | None = strawberry.field(description="Viewport height in CSS pixels.")
    headless: bool = strawberry.field(description="Whether the browser runs without a window.")
    tags: list[str] = strawberry.field(description="Free labels for finding profiles.")
    notes: str | None = strawberry.field(description="Free text for the admins.")
    runner_affinity: str | None = strawberry.field(
        description="The runner that may run this profile's commands: a name, or `label:x` "
        "(null: any)."
    )
    created_at: datetime = strawberry.field(description="When the profile was made.")
    updated_at: datetime = strawberry.field(description="When the profile last changed.")
    row: strawberry.Private[ProfileRecord]
    # Set by `prefetch_links` for the profiles of a page; otherwise loaded per profile.
    service_links: strawberry.Private[list[ProfileServiceLink] | None] = None
    proxy_use: strawberry.Private[ProxyUse | None] = None

    @classmethod
    def from_row(cls, row: ProfileRecord) -> Profile:
        return cls(
            id=encode_id("Profile", row.id),
            name=row.name,
            user_agent=row.user_agent,
            locale=row.locale,
            timezone=row.timezone,
            viewport_width=row.viewport_width,
            viewport_height=row.viewport_height,
            headless=row.headless,
            tags=list(row.tags),
            notes=row.notes,
            runner_affinity=row.runner_affinity,
            created_at=row.created_at,
            updated_at=row.updated_at,
            row=row,
        )

    @strawberry.field(description="The Chrome user-data-dir (default: <workspace>/profiles/<id>).")
    def user_data_dir(self, info: Info) -> str:
        return profile_service.user_data_dir(self.row, info.context.settings)

    # A page's profiles have their links prefetched (`prefetch_links`): those answer at
    # once (graphql_schema/direct.py); any other profile loads them here.
    @strawberry.field(
        description="The services this profile is linked to, with its own tokens' previews.",
        extensions=[CountedList()],
        metadata=answer_at_once(_prefetched_services),
    )
    async def services(self, info: Info) -> list[ProfileServiceLink]:
        return await info.context.loaders.profile_services.load(self.row.id)

    @strawberry.field(
        description="The proxies this profile may use.",
        extensions=[CountedList()],
        metadata=answer_at_once(_prefetched_proxies),
    )
    async def proxies(self, info: Info) -> list[ProxyRef]:
        return (await info.context.loaders.profile_proxies.load(self.row.id)).proxies

    @strawberry.field(
        description="The proxy a run uses when none is named.",
        metadata=answer_at_once(_prefetched_default_proxy),
    )
    async def default_proxy(self, info: Info) -> ProxyRef | None:
        return (await info.context.loaders.profile_proxies.load(self.row.id)).default

    @strawberry.field(description="Commands run for this profile, oldest first.")
    async def commands(
        self, info: Info, first: First = None, after: After = None
    ) -> Connection[CommandRef]:
        from graphql_schema.commands import Command

        stmt = select(models.Command).where(models.Command.profile_id == self.row.id)
        return await paginate(info, stmt, models.Command.id, Command.from_row, first, after)


@strawberry.input(description="A new profile; unset fields take their defaults.")
class CreateProfileInput:
    name: str = strawberry.field(description="Unique name.")
    user_data_dir: str | None = optional_input("Absolute path; default <workspace>/profiles/<id>.")
    user_agent: str | None = optional_input("The browser's User-Agent (null: Chromium's own).")
    locale: str | None = optional_input("Browser locale, e.g. `en-US`.")
    timezone: str | None = optional_input("IANA time zone, e.g. `Europe/Berlin`.")
    viewport_width: int | None = optional_input("Viewport width in CSS pixels.")
    viewport_height: int | None = optional_input("Viewport height in CSS pixels.")
    headless: bool | None = optional_input("Run the browser without a window.")
    tags: list[str] | None = optional_input("Free labels for finding profiles.")
    notes: str | None = optional_input("Free text for the admins.")
    runner_affinity: str | None = optional_input(
        "The runner that may run this profile's commands: a runner name, or `label:x` for "
        "any runner with that label (null: any)."
    )


@strawberry.input(description="Changes to a profile; unset fields stay as they are.")
class UpdateProfileInput:
    id: strawberry.ID = strawberry.field(description="The profile to change.")
    name: str | None = optional_input("Unique name.")
    user_data_dir: str | None = optional_input("Absolute path of the Chrome user-data-dir.")
    user_agent: str | None = optional_input("The browser's User-Agent (null: Chromium's own).")
    locale: str | None = optional_input("Browser locale, e.g. `en-US`.")
    timezone: str | None = optional_input("IANA time zone, e.g. `Europe/Berlin`.")
    viewport_width: int | None = optional_input("Viewport width in CSS pixels.")
    viewport_height: int | None = optional_input("Viewport height in CSS pixels.")
    headless: bool | None = optional_input("Run the browser without a window.")
    tags: list[str] | None = optional_input("Free labels for finding profiles.")
    notes: str | None = optional_input("Free text for the admins.")
    runner_affinity: str | None = optional_input(
        "The runner that may run this profile's commands: a runner name, or `label:x` for "
        "any runner with that label (null: any)."
    )


@strawberry.type(description="The result of a profile mutation.")
class ProfilePayload:
    profile: Profile | None = strawberry.field(
        default=None, description="The profile as saved (null on error)."
    )
    user_errors: list[UserError] = strawberry.field(default_factory=list, description=USER_ERRORS)


async def resolve_profiles(
    info: Info,
    first: First = None,
    after: After = None,
    search: Annotated[
        str | None,
        strawberry.argument(description="Only profiles whose name contains this (any case)."),
    ] = None,
) -> Connection[Profile]:
    """Profiles by creation order; `search` matches names (case-insensitive substring)."""
    stmt = profile_service.name_search(select(models.Profile), search)
    page = await paginate(
        info, stmt, models.Profile.id, Profile.from_row, first, after, plain_rows=True
    )
    await prefetch_links(info, [edge.node for edge in page.edges])
    return page


async def prefetch_links(info: Info, profiles: list[Profile]) -> None:
    """Load the links the query asks of a page's profiles, for the whole page at once: the
    same statements the loaders would send, and the nodes' link fields answer at once."""
    wanted = node_fields(info)
    ids = [profile.row.id for profile in profiles]
    loaders = info.context.loaders
    if ids and "services" in wanted:
        for profile, links in zip(profiles, await loaders.links_to_services(ids), strict=True):
            profile.service_links = links
    if ids and not wanted.isdisjoint(("proxies", "defaultProxy")):
        for profile, use in zip(profiles, await loaders.proxy_uses(ids), strict=True):
            profile.proxy_use = use


@strawberry.type
class ProfileMutations:
    @strawberry.mutation(description="Make a profile.")
    async def create_profile(
        self,
        info: Info,
        input: Annotated[CreateProfileInput, strawberry.argument(description="The new profile.")],
    ) -> ProfilePayload:
        row, errors = await perform(
            info,
            lambda session: profile_service.create_profile(
                session, provided(input), info.context.settings
            ),
        )
        return ProfilePayload(
            profile=None if row is None else Profile.from_row(row), user_errors=errors
        )

    @strawberry.mutation(description="Change a profile's fields.")
    async def update_profile(
        self,
        info: Info,
        input: Annotated[UpdateProfileInput, strawberry.argument(description="The changes.")],
    ) -> ProfilePayload:
        async def work(session: AsyncSession) -> models.Profile:
            pk = pk_of(input.id, "Profile", field="id")
            return await profile_service.update_profile(
                session, pk, provided(input), info.context.settings
            )

        row, errors = await perform(info, work)
        return ProfilePayload(
            profile=None if row is None else Profile.from_row(row), user_errors=errors
        )

    @strawberry.mutation(
        description="Delete a profile; with deleteData, also Corral's own copy of its browser "
        "data (a user-data-dir an admin chose is kept). The notices say what was kept."
    )
    async def delete_profile(
        self,
        info: Info,
        id: Annotated[strawberry.ID, strawberry.argument(description="The profile to delete.")],
        delete_data: Annotated[
            bool | None,
            strawberry.argument(description="Also remove Corral's copy of its browser data."),
        ] = False,
    ) -> DeletePayload:
        settings = info.context.settings

        async def work(session: AsyncSession) -> profile_service.ProfileDeletion:
            pk = pk_of(id, "Profile", field="id")
            return await profile_service.delete_profile_and_data(
                session, pk, settings, delete_data=bool(delete_data)
            )

        deletion, errors = await perform(info, work)
        if errors or deletion is None:
            return DeletePayload(user_errors=errors)
        notices = await profile_service.remove_profile_data(deletion, settings)
        return DeletePayload(deleted_id=id, notices=notices)
