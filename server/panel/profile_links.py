"""A profile's links: the services it uses (with its own token for each) and the proxies it
may go out through (one its default). The forms live on the profile's page.

Routes (admin-only POSTs, audited with the GraphQL mutations' names):

    POST /profiles/{id}/services                     linkService: `serviceId`, optional `token`
    POST /profiles/{id}/services/{sid}/token         linkService: set or rotate the profile's
                                                     own `token`, or clear it (`clear` sent)
    POST /profiles/{id}/services/{sid}/unlink        unlinkService
    POST /profiles/{id}/proxies                      attachProxy: `proxyId`, `isDefault` box
    POST /profiles/{id}/proxies/{pid}/default        attachProxy with isDefault
    POST /profiles/{id}/proxies/{pid}/detach         detachProxy

A token is write-only: the page shows its preview only, a typed one is never rendered back.
An error is shown on the profile's page next to the form that caused it (htmx: the section
alone is swapped); a success redirects to the profile's page with a flash message.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request
from starlette.responses import Response

from server import proxies as proxy_domain
from server import services as service_domain
from server.errors import ErrorCode, InvalidInput
from server.ids import encode_global_id as encode_id
from server.login import read_form
from server.panel.common import (
    Change,
    app_services,
    apply_change,
    errors_by_field,
    not_found,
    path_id,
    redirect_with_flash,
    refuse_viewer,
)
from server.panel.profiles import show_profile

SERVICES_PARTIAL = "_profile_services.html"
PROXIES_PARTIAL = "_profile_proxies.html"

Work = Callable[[AsyncSession], Awaitable[Any]]


def _chosen(fields: dict[str, str], name: str) -> int | None:
    """The id a select sent (None when nothing was chosen)."""
    raw = fields.get(name, "").strip()
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 12 else None


def _required(chosen: int | None, field: str, what: str) -> int:
    """The chosen id, or the form's error (raised inside the work, so it is audited)."""
    if chosen is None:
        raise InvalidInput.one(field, f"choose a {what}", ErrorCode.REQUIRED)
    return chosen


def _row_ids(request: Request, other: str) -> tuple[int, int] | None:
    """The profile's id and the linked service's or proxy's (`other`) from the path."""
    profile_id, other_id = path_id(request, "profile_id"), path_id(request, other)
    return None if profile_id is None or other_id is None else (profile_id, other_id)


async def _link_change(
    request: Request,
    profile_id: int,
    change: Change,
    work: Work,
    *,
    partial: str,
    error_key: Callable[[str], str],
    done: str,
) -> Response:
    """Refuse a viewer, else take the change: on success back to the profile with `done`;
    on a user error the profile's page with the errors (keyed by `error_key(field)`)."""
    refused = await refuse_viewer(request, change)
    if refused is not None:
        return refused
    try:
        await apply_change(request, change, work)
    except InvalidInput as exc:
        errors = errors_by_field(exc.errors)
        if "profileId" in errors:
            return not_found(request, "profile")
        link_errors = {error_key(field): messages for field, messages in errors.items()}
        return await show_profile(
            request, profile_id, partial=partial, link_errors=link_errors, status_code=422
        )
    return redirect_with_flash(request, f"/profiles/{profile_id}", done)


def _profile_change(action: str, profile_id: int, fields: list[str]) -> Change:
    return Change(action, fields, encode_id("Profile", profile_id))


def _row_route(
    other: str,
    action: str,
    fields: list[str],
    call: Callable[[AsyncSession, int, int], Awaitable[Any]],
    *,
    partial: str,
    done: str,
) -> Callable[[Request], Awaitable[Response]]:
    """A one-button form of a link's row: `call(session, profile_id, other_id)` as `action`."""

    async def endpoint(request: Request) -> Response:
        ids = _row_ids(request, other)
        if ids is None:
            return not_found(request, "profile or link")
        profile_id, other_id = ids
        return await _link_change(
            request,
            profile_id,
            _profile_change(action, profile_id, fields),
            lambda session: call(session, profile_id, other_id),
            partial=partial,
            error_key=lambda field: f"{field}-{other_id}",
            done=done,
        )

    return endpoint


# --- services ---------------------------------------------------------------------------


async def link_service(request: Request) -> Response:
    profile_id = path_id(request, "profile_id")
    if profile_id is None:
        return not_found(request, "profile")
    fields = await read_form(request)
    service_id = _chosen(fields, "serviceId")
    values = {"token": fields["token"]} if fields.get("token", "").strip() else {}
    change = _profile_change("linkService", profile_id, ["profileId", "serviceId", *values])
    box = app_services(request).secret_box
    return await _link_change(
        request,
        profile_id,
        change,
        lambda session: service_domain.link_service(
            session, box, profile_id, _required(service_id, "serviceId", "service"), values
        ),
        partial=SERVICES_PARTIAL,
        error_key=lambda field: field,
        done="Service linked.",
    )


async def profile_service_token(request: Request) -> Response:
    """Set, rotate or (with `clear`) remove the profile's own token for a linked service."""
    ids = _row_ids(request, "service_id")
    if ids is None:
        return not_found(request, "profile or service")
    profile_id, service_id = ids
    fields = await read_form(request)
    clear = "clear" in fields
    values: dict[str, Any] = {"token": None if clear else fields.get("token", "")}
    change = _profile_change("linkService", profile_id, ["profileId", "serviceId", "token"])
    box = app_services(request).secret_box
    return await _link_change(
        request,
        profile_id,
        change,
        lambda session: service_domain.link_service(session, box, profile_id, service_id, values),
        partial=SERVICES_PARTIAL,
        error_key=lambda field: f"{field}-{service_id}",
        done="The profile's own token cleared." if clear else "The profile's own token saved.",
    )


unlink_service = _row_route(
    "service_id",
    "unlinkService",
    ["profileId", "serviceId"],
    service_domain.unlink_service,
    partial=SERVICES_PARTIAL,
    done="Service unlinked (with the profile's own token for it).",
)


# --- proxies ---------------------------------------------------------------------------


async def attach_proxy(request: Request) -> Response:
    profile_id = path_id(request, "profile_id")
    if profile_id is None:
        return not_found(request, "profile")
    fields = await read_form(request)
    proxy_id = _chosen(fields, "proxyId")
    # Unticked: the domain's rule (the default only when the profile has none yet).
    is_default = True if fields.get("isDefault") == "on" else None
    given = ["profileId", "proxyId", *(["isDefault"] if is_default else [])]
    return await _link_change(
        request,
        profile_id,
        _profile_change("attachProxy", profile_id, given),
        lambda session: proxy_domain.attach_proxy(
            session, profile_id, _required(proxy_id, "proxyId", "proxy"), is_default
        ),
        partial=PROXIES_PARTIAL,
        error_key=lambda field: field,
        done="Proxy attached.",
    )


default_proxy = _row_route(
    "proxy_id",
    "attachProxy",
    ["profileId", "proxyId", "isDefault"],
    lambda session, profile_id, proxy_id: proxy_domain.attach_proxy(
        session, profile_id, proxy_id, True
    ),
    partial=PROXIES_PARTIAL,
    done="Default proxy changed.",
)
detach_proxy = _row_route(
    "proxy_id",
    "detachProxy",
    ["profileId", "proxyId"],
    proxy_domain.detach_proxy,
    partial=PROXIES_PARTIAL,
    done="Proxy detached.",
)
