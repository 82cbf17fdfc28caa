"""What every panel page shares: rendering (full page or htmx partial), flash messages,
the read session, changes through server/actions.perform, paging and form helpers."""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any, Literal, TypeVar
from urllib.parse import quote, unquote

from itsdangerous import BadSignature, TimestampSigner
from sqlalchemy import Select, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response

from server.access import principal_of
from server.actions import Forbidden, perform, refusal
from server.app_services import AppServices
from server.audit import FORBIDDEN, raised_entry, write_entry
from server.db import READ_ONLY
from server.errors import ErrorCode, InvalidInput, UserError
from server.ids import decode_global_id as decode_id
from server.ids import encode_global_id as encode_id
from server.login import client_address, is_https, read_form
from server.pages import render_page
from server.panel.assets import panel_assets
from server.settings import Settings

PAGE_SIZE = 25
RECENT = 10  # recent failures on the dashboard, recent runs on a profile's page
FLASH_COOKIE = "corral_flash"
FLASH_SECONDS = 60
# A flash travels in a cookie (browsers drop one over 4 KB); a longer message is cut.
FLASH_MAX_CHARS = 300
FlashKind = Literal["success", "error"]
FLASH_KINDS: tuple[str, ...] = ("success", "error")
# The panel's menu; `admin` entries are shown to admins only.
NAV = (
    ("Dashboard", "/", False),
    ("Profiles", "/profiles", False),
    ("Services", "/services", False),
    ("Proxies", "/proxies", False),
    ("Usage", "/usage", False),
    ("Templates", "/templates", False),
    ("Compose", "/compose", False),
    ("Runs", "/runs", False),
    ("Audit", "/audit", True),
    ("API tokens", "/tokens", True),
)
# Integer inputs of the panel's forms, by the domain's (GraphQL's) field names.
INT_FIELDS = frozenset({"viewportWidth", "viewportHeight"})


# --- rendering -------------------------------------------------------------------------


def wants_partial(request: Request) -> bool:
    """An htmx swap (not a boosted page load) gets the partial alone."""
    headers = request.headers
    return headers.get("hx-request") == "true" and headers.get("hx-boosted") != "true"


def _flash_signer(request: Request) -> TimestampSigner:
    key = request.app.state.authenticator.hasher.derive("corral panel flash")
    return TimestampSigner(key, salt="corral.flash")


def take_flash(request: Request) -> tuple[str, str] | None:
    """(kind, message) a redirect left for this page (signed, so no other site can plant
    one); kind is one of FLASH_KINDS."""
    cookie = request.cookies.get(FLASH_COOKIE)
    if not cookie:
        return None
    try:
        value = unquote(_flash_signer(request).unsign(cookie, max_age=FLASH_SECONDS).decode())
    except (BadSignature, UnicodeDecodeError):
        return None
    kind, _, message = value.partition(":")
    return (kind, message) if kind in FLASH_KINDS else ("success", value)


def redirect_with_flash(
    request: Request, target: str, message: str, kind: FlashKind = "success"
) -> Response:
    """After a change: 303 to `target` (htmx: an `HX-Redirect`), the message shown there
    as a success or an error (never put a secret in it: it travels in a cookie)."""
    if wants_partial(request):
        response: Response = Response(status_code=200, headers={"HX-Redirect": target})
    else:
        response = RedirectResponse(target, status_code=303)
    if len(message) > FLASH_MAX_CHARS:
        message = message[: FLASH_MAX_CHARS - 1] + "…"
    # Percent-encoded: a header is latin-1, and a name may be any Unicode (issue #17: a
    # profile named "Café ☕" made every redirect after its change a 500).
    response.set_cookie(
        FLASH_COOKIE,
        _flash_signer(request).sign(quote(f"{kind}:{message}", safe=":")).decode(),
        max_age=FLASH_SECONDS,
        path="/",
        secure=is_https(request),
        httponly=True,
        samesite="lax",
    )
    return response


def render_view(
    request: Request, page: str, partial: str, *, status_code: int = 200, **context: Any
) -> Response:
    """`page` (which includes `partial`), or `partial` alone for an htmx swap."""
    settings: Settings = request.app.state.services.settings
    principal = principal_of(request.scope)
    full = not wants_partial(request)
    flash = take_flash(request) if full else None
    flash_kind, flash_message = flash or ("success", None)
    response = render_page(
        page if full else partial,
        principal,
        status_code=status_code,
        assets=panel_assets(settings.panel_assets),
        nav=NAV,
        path=request.url.path,
        flash=flash_message,
        flash_kind=flash_kind,
        can_edit=principal is not None and principal.is_admin,
        **context,
    )
    if flash is not None:
        response.delete_cookie(FLASH_COOKIE, path="/", secure=is_https(request))
    return response


def error_page(request: Request, status_code: int, title: str, message: str) -> Response:
    settings: Settings = request.app.state.services.settings
    return render_page(
        "error.html",
        principal_of(request.scope),
        status_code=status_code,
        assets=panel_assets(settings.panel_assets),
        nav=NAV,
        path=request.url.path,
        title=title,
        message=message,
    )


def not_found(request: Request, what: str) -> Response:
    return error_page(request, 404, "Not found", f"There is no such {what}.")


# --- sessions and audit ----------------------------------------------------------------


def app_services(request: Request) -> AppServices:
    services: AppServices = request.app.state.services
    return services


@asynccontextmanager
async def reading(request: Request) -> AsyncIterator[AsyncSession]:
    """The request's session for reads (on SQLite it takes no write lock)."""
    async with app_services(request).sessionmaker() as session:
        await session.connection(execution_options=READ_ONLY)
        yield session


@dataclass
class Change:
    """A panel action as the audit log records it (GraphQL's action names; the input's field
    names, never their values)."""

    action: str
    fields: list[str]
    object_id: str | None = None
    object_type: str = "Profile"


async def apply_change(
    request: Request,
    change: Change,
    work: Callable[[AsyncSession], Awaitable[Any]],
    error_codes: Callable[[Any], list[str]] | None = None,
) -> Any:
    """Run `work` through server/actions.perform: the same role rule, unit of work and
    audit event as the GraphQL mutation of the same name. An InvalidInput is rolled back,
    audited as an error and raised again for the form to show."""
    principal = principal_of(request.scope)
    if principal is None:  # AccessControl lets no one in without one
        raise Forbidden("not logged in")
    pk = None if change.object_id is None else decode_id(change.object_id)
    return await perform(
        app_services(request),
        principal,
        change.action,
        work,
        object_type=change.object_type,
        object_id=None if pk is None else pk[1],
        fields=change.fields,
        client_address=client_address(request),
        error_codes=error_codes,
    )


async def refuse_viewer(request: Request, change: Change) -> Response | None:
    """A 403 page, audited as denied by the same rule and entry as perform's, unless the
    principal may take the action (checked before any form is read)."""
    principal = principal_of(request.scope)
    if principal is not None and refusal(principal, change.action) is None:
        return None
    denied = raised_entry(change.action, FORBIDDEN, change.object_id, change.fields)
    services = app_services(request)
    await write_entry(services.sessionmaker, principal, denied, client_address(request))
    return error_page(request, 403, "Not allowed", "Only an admin can change this.")


# --- paging ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Paging:
    page: int
    pages: int
    total: int

    @property
    def offset(self) -> int:
        return (self.page - 1) * PAGE_SIZE


def page_number(request: Request) -> int:
    raw = request.query_params.get("page", "1")
    return int(raw) if raw.isascii() and raw.isdigit() and 0 < len(raw) < 7 else 1


async def paged(session: AsyncSession, stmt: Select[Any], wanted: int) -> Paging:
    """The page `wanted` (clamped to the last) of `stmt`'s rows."""
    total = int(await session.scalar(select(func.count()).select_from(stmt.subquery())) or 0)
    pages = max(1, math.ceil(total / PAGE_SIZE))
    return Paging(page=max(1, min(wanted, pages)), pages=pages, total=total)


# --- forms -----------------------------------------------------------------------------


def form_values(fields: dict[str, str], names: tuple[str, ...]) -> dict[str, Any]:
    """The form's fields as the domain service takes them (it validates: an integer field
    that is not a number goes through as typed, for the domain to refuse)."""
    values: dict[str, Any] = {}
    for name in names:
        raw = fields.get(name, "")
        if name == "headless":
            values[name] = raw == "on"
        elif name == "tags":
            values[name] = [tag.strip() for tag in raw.split(",") if tag.strip()]
        elif name in INT_FIELDS:
            values[name] = None if not raw.strip() else _int_or_text(raw.strip())
        else:
            values[name] = raw
    return values


def _int_or_text(raw: str) -> int | str:
    # One sign at most, ASCII digits only: "--5" and "\u00b2" pass isdigit() but not int().
    digits = raw.removeprefix("-")
    return int(raw) if digits.isascii() and digits.isdigit() and len(raw) < 12 else raw


def errors_by_field(errors: list[UserError]) -> dict[str, list[str]]:
    """User errors keyed by their first field name ("" for the form as a whole)."""
    found: dict[str, list[str]] = {}
    for error in errors:
        found.setdefault(error.field[0] if error.field else "", []).append(error.message)
    return found


def path_id(request: Request, name: str) -> int | None:
    raw = str(request.path_params[name])
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 12 else None


# --- one object's pages: show, update, delete --------------------------------------------

T = TypeVar("T")


@dataclass(frozen=True)
class ObjectKind:
    """What the pages of one kind of object call it: its GraphQL type (the audit entry's and
    the mutations' names), its name on a page, its path parameter and its list's path."""

    object_type: str
    what: str
    path_param: str
    list_path: str

    def change(self, verb: str, fields: list[str], object_id: int) -> Change:
        """The audited change `verb` (update, delete) of the object `object_id`."""
        type_ = self.object_type
        return Change(f"{verb}{type_}", fields, encode_id(type_, object_id), type_)


async def show_object(
    request: Request, kind: ObjectKind, show: Callable[..., Awaitable[Response]], **options: Any
) -> Response:
    """`show(request, object_id, **options)` for the object the path names; 404 otherwise."""
    object_id = path_id(request, kind.path_param)
    if object_id is None:
        return not_found(request, kind.what)
    return await show(request, object_id, **options)


async def update_object(
    request: Request,
    kind: ObjectKind,
    values_of: Callable[[dict[str, str]], dict[str, Any]],
    work: Callable[[AsyncSession, int, dict[str, Any]], Awaitable[T]],
    show: Callable[..., Awaitable[Response]],
    saved: Callable[[T], str],
    kept: Callable[[dict[str, str]], dict[str, str]] = dict,
) -> Response:
    """Save the posted form through `work` (the domain's update), audited as the GraphQL
    mutation; a refusal shows the form again, `show(request, object_id, form=kept(fields),
    errors=..., status_code=422)` (an object gone meanwhile: 404); saved, back to its page
    with the `saved(object)` message."""
    object_id = path_id(request, kind.path_param)
    if object_id is None:
        return not_found(request, kind.what)
    fields = await read_form(request)
    values = values_of(fields)
    change = kind.change("update", sorted(values), object_id)
    refused = await refuse_viewer(request, change)
    if refused is not None:
        return refused
    try:
        changed: T = await apply_change(
            request, change, lambda session: work(session, object_id, values)
        )
    except InvalidInput as exc:
        errors = errors_by_field(exc.errors)
        if "id" in errors:
            return not_found(request, kind.what)
        return await show(request, object_id, form=kept(fields), errors=errors, status_code=422)
    return redirect_with_flash(request, f"{kind.list_path}/{object_id}", saved(changed))


async def notices_said(notices: list[str]) -> str:
    """A deletion's notices as one flash message (only its first letter made upper case:
    the names it quotes keep theirs)."""
    said = "; ".join(notices)
    return said[:1].upper() + said[1:] + "."


async def delete_object(
    request: Request,
    kind: ObjectKind,
    work: Callable[[AsyncSession, int], Awaitable[T]],
    *,
    fields: tuple[str, ...] = ("id",),
    said: Callable[[T], Awaitable[str]] = notices_said,  # type: ignore[assignment]
) -> Response:
    """Delete the object the path names through `work` (the domain's delete), audited as the
    GraphQL mutation with `fields`; back to the list with `said(result)` as the message. An
    object gone is a 404; one the domain will not delete, a 409 page with its reasons."""
    object_id = path_id(request, kind.path_param)
    if object_id is None:
        return not_found(request, kind.what)
    change = kind.change("delete", list(fields), object_id)
    refused = await refuse_viewer(request, change)
    if refused is not None:
        return refused
    try:
        result: T = await apply_change(request, change, lambda session: work(session, object_id))
    except InvalidInput as exc:
        if any(error.code is ErrorCode.NOT_FOUND for error in exc.errors):
            return not_found(request, kind.what)
        reasons = " ".join(error.message for error in exc.errors)
        return error_page(request, 409, f"Cannot delete this {kind.what}", reasons)
    return redirect_with_flash(request, kind.list_path, await said(result))
