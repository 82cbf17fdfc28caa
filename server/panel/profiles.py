"""Profiles: list with search and paging, detail, create/edit/delete."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request
from starlette.responses import Response

from server import profiles as profile_service
from server.access import principal_of
from server.errors import InvalidInput
from server.ids import encode_global_id as encode_id
from server.login import read_form
from server.models import (
    Command,
    Profile,
    ProfileProxy,
    ProfileService,
    Proxy,
    Service,
)
from server.panel.common import (
    PAGE_SIZE,
    RECENT,
    Change,
    ObjectKind,
    app_services,
    apply_change,
    delete_object,
    errors_by_field,
    form_values,
    not_found,
    page_number,
    paged,
    reading,
    redirect_with_flash,
    refuse_viewer,
    render_view,
    show_object,
    update_object,
)
from server.secretbox import token_preview

CHOICES = 500  # services or proxies offered in a link form's select
# The profile form's inputs, by the domain's (GraphQL's) field names.
CREATE_FIELDS = ("name", "notes", "tags")
EDIT_FIELDS = (
    *CREATE_FIELDS,
    "userAgent",
    "locale",
    "timezone",
    "viewportWidth",
    "viewportHeight",
    "headless",
)

PROFILE = ObjectKind("Profile", "profile", "profile_id", "/profiles")


def profile_form(profile: Profile | None) -> dict[str, str]:
    """A profile's values as its edit form shows them (empty for a new one)."""
    if profile is None:
        return {}
    return {
        "name": profile.name,
        "notes": profile.notes or "",
        "tags": ", ".join(profile.tags),
        "userAgent": profile.user_agent or "",
        "locale": profile.locale or "",
        "timezone": profile.timezone or "",
        "viewportWidth": "" if profile.viewport_width is None else str(profile.viewport_width),
        "viewportHeight": "" if profile.viewport_height is None else str(profile.viewport_height),
        "headless": "on" if profile.headless else "",
    }


# --- profiles --------------------------------------------------------------------------


async def _profile_list(request: Request, session: AsyncSession) -> dict[str, Any]:
    query = request.query_params.get("q", "").strip()
    stmt = profile_service.name_search(select(Profile), query)
    paging = await paged(session, stmt, page_number(request))
    rows = await session.scalars(
        stmt.order_by(Profile.name_key, Profile.id).offset(paging.offset).limit(PAGE_SIZE)
    )
    return {"profiles": list(rows), "paging": paging, "q": query}


async def profile_list(request: Request) -> Response:
    async with reading(request) as session:
        listing = await _profile_list(request, session)
    return render_view(
        request, "profiles.html", "_profiles_table.html", form={}, errors={}, **listing
    )


async def profile_create(request: Request) -> Response:
    fields = await read_form(request)
    values = form_values(fields, CREATE_FIELDS)
    change = Change("createProfile", sorted(values))
    refused = await refuse_viewer(request, change)
    if refused is not None:
        return refused
    settings = app_services(request).settings

    async def work(session: AsyncSession) -> Profile:
        profile = await profile_service.create_profile(session, values, settings)
        change.object_id = encode_id("Profile", profile.id)
        return profile

    try:
        profile: Profile = await apply_change(request, change, work)
    except InvalidInput as exc:
        async with reading(request) as session:
            listing = await _profile_list(request, session)
        return render_view(
            request,
            "profiles.html",
            "_profile_create_form.html",
            status_code=422,
            form=fields,
            errors=errors_by_field(exc.errors),
            **listing,
        )
    return redirect_with_flash(
        request, f"/profiles/{profile.id}", f"Profile {profile.name} created."
    )


@dataclass
class ProfileDetail:
    """What a profile's page shows besides the profile itself."""

    services: list[dict[str, Any]]
    proxies: list[tuple[Proxy, bool]]
    runs: list[Command]
    run_count: int
    data_dir: str
    service_choices: list[Service]  # not linked yet (for an admin's "link" select)
    proxy_choices: list[Proxy]  # not attached yet


async def _link_choices(
    request: Request, session: AsyncSession, profile_id: int
) -> tuple[list[Service], list[Proxy]]:
    """The services and proxies an admin may still link to the profile (none for viewers)."""
    principal = principal_of(request.scope)
    if principal is None or not principal.is_admin:
        return [], []
    linked = select(ProfileService.service_id).where(ProfileService.profile_id == profile_id)
    attached = select(ProfileProxy.proxy_id).where(ProfileProxy.profile_id == profile_id)
    services = await session.scalars(
        select(Service).where(Service.id.not_in(linked)).order_by(Service.name_key).limit(CHOICES)
    )
    proxies = await session.scalars(
        select(Proxy).where(Proxy.id.not_in(attached)).order_by(Proxy.name_key).limit(CHOICES)
    )
    return list(services), list(proxies)


async def _profile_detail(
    request: Request, session: AsyncSession, profile: Profile
) -> ProfileDetail:
    principal = principal_of(request.scope)
    box = app_services(request).secret_box
    links = await session.execute(
        select(ProfileService, Service)
        .join(Service, Service.id == ProfileService.service_id)
        .where(ProfileService.profile_id == profile.id)
        .order_by(Service.name_key)
    )
    services = [
        {
            "service": service,
            "has_token": link.token_encrypted is not None,
            "preview": (
                token_preview(box.decrypt(link.token_encrypted))
                if link.token_encrypted is not None and principal is not None and principal.is_admin
                else None
            ),
        }
        for link, service in links
    ]
    proxies = await session.execute(
        select(Proxy, ProfileProxy.is_default)
        .join(ProfileProxy, ProfileProxy.proxy_id == Proxy.id)
        .where(ProfileProxy.profile_id == profile.id)
        .order_by(Proxy.name_key)
    )
    runs_stmt = select(Command).where(Command.profile_id == profile.id)
    runs = await session.scalars(runs_stmt.order_by(Command.id.desc()).limit(RECENT))
    run_count = await session.scalar(select(func.count()).select_from(runs_stmt.subquery()))
    service_choices, proxy_choices = await _link_choices(request, session, profile.id)
    return ProfileDetail(
        service_choices=service_choices,
        proxy_choices=proxy_choices,
        services=services,
        proxies=[(proxy, bool(is_default)) for proxy, is_default in proxies],
        runs=list(runs),
        run_count=int(run_count or 0),
        data_dir=profile_service.user_data_dir(profile, app_services(request).settings),
    )


async def show_profile(
    request: Request,
    profile_id: int,
    *,
    form: dict[str, str] | None = None,
    errors: dict[str, list[str]] | None = None,
    status_code: int = 200,
    page: str = "profile.html",
    partial: str = "_profile_edit_form.html",
    link_errors: dict[str, list[str]] | None = None,
) -> Response:
    """The profile's page (or `partial` alone for htmx); `link_errors` are those of the
    service and proxy link forms (server/panel/profile_links.py)."""
    async with reading(request) as session:
        profile = await session.get(Profile, profile_id)
        if profile is None:
            return not_found(request, "profile")
        detail = await _profile_detail(request, session, profile)
    return render_view(
        request,
        page,
        partial,
        status_code=status_code,
        profile=profile,
        detail=detail,
        form=profile_form(profile) if form is None else form,
        errors=errors or {},
        link_errors=link_errors or {},
    )


async def profile_page(request: Request) -> Response:
    return await show_object(request, PROFILE, show_profile)


async def profile_update(request: Request) -> Response:
    settings = app_services(request).settings

    return await update_object(
        request,
        PROFILE,
        lambda fields: form_values(fields, EDIT_FIELDS),
        lambda session, profile_id, values: profile_service.update_profile(
            session, profile_id, values, settings
        ),
        show_profile,
        lambda _: "Profile saved.",
    )


async def profile_delete_page(request: Request) -> Response:
    """The confirmation: what happens to the profile's data dir and its runs."""
    return await show_object(request, PROFILE, show_profile, page="profile_delete.html")


async def profile_delete(request: Request) -> Response:
    delete_data = (await read_form(request)).get("deleteData") == "on"
    settings = app_services(request).settings

    async def said(deletion: profile_service.ProfileDeletion) -> str:
        # The data dir goes after the commit: a refused deletion keeps it.
        said = "; ".join(await profile_service.remove_profile_data(deletion, settings))
        return said[:1].upper() + said[1:] + "."

    return await delete_object(
        request,
        PROFILE,
        lambda session, profile_id: profile_service.delete_profile_and_data(
            session, profile_id, settings, delete_data=delete_data
        ),
        fields=("id", "deleteData") if delete_data else ("id",),
        said=said,
    )
