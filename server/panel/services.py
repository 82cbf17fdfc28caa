"""Services: list with paging, detail, create/edit/delete, and the shared token.

Routes (all behind login; the POSTs are admin-only, audited with GraphQL's action names):

    GET  /services                 the list (name, kind, env var, shared token, linked profiles)
    POST /services                 createService
    GET  /services/{id}            the service, its edit and token forms
    POST /services/{id}            updateService (everything but the token)
    POST /services/{id}/token      updateService with only `token`: set or rotate it, or clear
                                   it when the form sends `clear`
    GET  /services/{id}/delete     what deleting it does
    POST /services/{id}/delete     deleteService

The shared token is write-only: a page shows whether it is set and, to admins, its preview
(server/secretbox.token_preview); a token typed into a form is never rendered back.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request
from starlette.responses import Response

from server import services as service_domain
from server.access import principal_of
from server.errors import InvalidInput
from server.ids import encode_global_id as encode_id
from server.login import read_form
from server.models import Profile, ProfileService, Service
from server.panel.common import (
    PAGE_SIZE,
    Change,
    ObjectKind,
    app_services,
    apply_change,
    delete_object,
    errors_by_field,
    not_found,
    page_number,
    paged,
    path_id,
    reading,
    redirect_with_flash,
    refuse_viewer,
    render_view,
    show_object,
    update_object,
)
from server.secretbox import token_preview

TEXT_FIELDS = ("name", "kind", "envVar", "baseUrl")
JSON_FIELDS = ("settings", "rateLimitPolicy")
LINKED_SHOWN = 25  # linked profiles named on a service's page (the count is always shown)

SERVICE = ObjectKind("Service", "service", "service_id", "/services")


def linked_count() -> Any:
    """How many profiles link the service of the enclosing query."""
    return (
        select(func.count())
        .where(ProfileService.service_id == Service.id)
        .correlate(Service)
        .scalar_subquery()
    )


def shared_token_preview(request: Request, service: Service) -> str | None:
    """The shared token's preview, for admins only (as GraphQL's `tokenPreview`)."""
    principal = principal_of(request.scope)
    if service.token_encrypted is None or principal is None or not principal.is_admin:
        return None
    return token_preview(app_services(request).secret_box.decrypt(service.token_encrypted))


def service_form(service: Service) -> dict[str, str]:
    """A service's values as its edit form shows them (never its token)."""
    return {
        "name": service.name,
        "kind": service.kind,
        "envVar": service.env_var,
        "baseUrl": service.base_url or "",
        "settings": json.dumps(service.settings, indent=2) if service.settings else "",
        "rateLimitPolicy": (
            json.dumps(service.rate_limit_policy, indent=2) if service.rate_limit_policy else ""
        ),
    }


def service_values(fields: dict[str, str], *, creating: bool) -> dict[str, Any]:
    """The form's fields as server/services takes them. JSON text that does not parse goes
    through as typed, for the domain to refuse next to its field."""
    values: dict[str, Any] = {name: fields.get(name, "") for name in TEXT_FIELDS}
    if creating and not values["kind"].strip():
        del values["kind"]  # the domain's default ("generic")
    for name in JSON_FIELDS:
        raw = fields.get(name, "").strip()
        try:
            values[name] = json.loads(raw) if raw else {}
        except ValueError:
            values[name] = raw
    if creating and fields.get("token", "").strip():
        values["token"] = fields["token"]
    return values


# --- the list and create ---------------------------------------------------------------


async def _service_list(request: Request, session: AsyncSession) -> dict[str, Any]:
    stmt = select(Service)
    paging = await paged(session, stmt, page_number(request))
    rows = await session.execute(
        select(Service, linked_count())
        .order_by(Service.name_key, Service.id)
        .offset(paging.offset)
        .limit(PAGE_SIZE)
    )
    services = [
        {
            "service": service,
            "profiles": int(count),
            "preview": shared_token_preview(request, service),
        }
        for service, count in rows
    ]
    return {"services": services, "paging": paging}


async def service_list(request: Request) -> Response:
    async with reading(request) as session:
        listing = await _service_list(request, session)
    return render_view(
        request, "services.html", "_services_table.html", form={}, errors={}, **listing
    )


async def service_create(request: Request) -> Response:
    fields = await read_form(request)
    values = service_values(fields, creating=True)
    change = Change("createService", sorted(values), object_type="Service")
    refused = await refuse_viewer(request, change)
    if refused is not None:
        return refused
    box = app_services(request).secret_box
    try:
        service: Service = await apply_change(
            request, change, lambda session: service_domain.create_service(session, box, values)
        )
    except InvalidInput as exc:
        async with reading(request) as session:
            listing = await _service_list(request, session)
        form = {name: value for name, value in fields.items() if name != "token"}
        return render_view(
            request,
            "services.html",
            "_service_create_form.html",
            status_code=422,
            form=form,
            errors=errors_by_field(exc.errors),
            **listing,
        )
    return redirect_with_flash(
        request, f"/services/{service.id}", f"Service {service.name} created."
    )


# --- one service -----------------------------------------------------------------------


@dataclass
class ServiceDetail:
    """What a service's page shows besides the service itself."""

    preview: str | None
    profile_count: int
    profiles: list[Profile]


async def _service_detail(
    request: Request, session: AsyncSession, service: Service
) -> ServiceDetail:
    linked = select(Profile).join(ProfileService, ProfileService.profile_id == Profile.id)
    linked = linked.where(ProfileService.service_id == service.id)
    count = await session.scalar(select(func.count()).select_from(linked.subquery()))
    profiles = await session.scalars(linked.order_by(Profile.name_key).limit(LINKED_SHOWN))
    return ServiceDetail(
        preview=shared_token_preview(request, service),
        profile_count=int(count or 0),
        profiles=list(profiles),
    )


async def _show_service(
    request: Request,
    service_id: int,
    *,
    page: str = "service.html",
    partial: str = "_service_edit_form.html",
    form: dict[str, str] | None = None,
    errors: dict[str, list[str]] | None = None,
    token_errors: dict[str, list[str]] | None = None,
    status_code: int = 200,
) -> Response:
    async with reading(request) as session:
        service = await session.get(Service, service_id)
        if service is None:
            return not_found(request, "service")
        detail = await _service_detail(request, session, service)
    return render_view(
        request,
        page,
        partial,
        status_code=status_code,
        service=service,
        detail=detail,
        form=service_form(service) if form is None else form,
        errors=errors or {},
        token_errors=token_errors or {},
    )


async def service_page(request: Request) -> Response:
    return await show_object(request, SERVICE, _show_service)


async def service_update(request: Request) -> Response:
    box = app_services(request).secret_box

    return await update_object(
        request,
        SERVICE,
        lambda fields: service_values(fields, creating=False),
        lambda session, service_id, values: service_domain.update_service(
            session, box, service_id, values
        ),
        _show_service,
        lambda _: "Service saved.",
    )


async def service_token(request: Request) -> Response:
    """Set, rotate (the same: a new value replaces the old) or clear the shared token."""
    service_id = path_id(request, "service_id")
    if service_id is None:
        return not_found(request, "service")
    fields = await read_form(request)
    clear = "clear" in fields
    values: dict[str, Any] = {"token": None if clear else fields.get("token", "")}
    change = Change("updateService", ["token"], encode_id("Service", service_id), "Service")
    refused = await refuse_viewer(request, change)
    if refused is not None:
        return refused
    box = app_services(request).secret_box
    try:
        await apply_change(
            request,
            change,
            lambda session: service_domain.update_service(session, box, service_id, values),
        )
    except InvalidInput as exc:
        errors = errors_by_field(exc.errors)
        if "id" in errors:
            return not_found(request, "service")
        return await _show_service(
            request,
            service_id,
            partial="_service_token_form.html",
            token_errors=errors,
            status_code=422,
        )
    message = "Shared token cleared." if clear else "Shared token saved."
    return redirect_with_flash(request, f"/services/{service_id}", message)


async def service_delete_page(request: Request) -> Response:
    """The confirmation: what happens to the profiles linked to it."""
    return await show_object(request, SERVICE, _show_service, page="service_delete.html")


async def service_delete(request: Request) -> Response:
    return await delete_object(request, SERVICE, service_domain.delete_service)
