"""The admin panel's pages: dashboard, profiles, runs (issue #17, first slice).

Server-rendered Jinja2 (web_templates/) with htmx on top: a page is one template that
includes its `_partial.html` pieces, and a request with `HX-Request` gets the partial alone,
rendered by the same view function. Every page also works as a plain link and every form as
a plain POST (303 on success, the page again with the errors next to the fields on failure).

Reads go through one read-only session per request; changes call the domain services in
server/ (they own validation) in one transaction, recorded in the audit log like GraphQL's
mutations. Everyone logged in reads; only admins change (a forged POST from a viewer is
refused 403 here, and CSRF is checked by server/csrf.py before a route runs).
"""

from __future__ import annotations

import math
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from itsdangerous import BadSignature, TimestampSigner
from sqlalchemy import Select, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request
from starlette.responses import RedirectResponse, Response
from starlette.routing import Route

from graphql_schema.context import AppServices
from graphql_schema.relay import decode_id, encode_id
from server import commands as command_service
from server import profiles as profile_service
from server.access import principal_of
from server.actions import Forbidden, perform, refusal
from server.audit import FORBIDDEN, raised_entry, write_entry
from server.db import READ_ONLY
from server.errors import ErrorCode, InvalidInput, UserError
from server.login import client_address, is_https, read_form
from server.models import (
    Command,
    CommandStatus,
    LogLine,
    Profile,
    ProfileProxy,
    ProfileService,
    Proxy,
    Service,
)
from server.pages import render_page
from server.panel_assets import panel_assets
from server.panel_tail import run_tail
from server.secretbox import token_preview
from server.settings import Settings

PAGE_SIZE = 25
LOG_TAIL = 200  # the run page shows this many of the last log lines
RECENT = 10  # recent failures on the dashboard, recent runs on a profile's page
FLASH_COOKIE = "corral_flash"
FLASH_SECONDS = 60
NAV = (("Dashboard", "/"), ("Profiles", "/profiles"), ("Runs", "/runs"))
FAILED_STATUSES = (CommandStatus.FAILED.value, CommandStatus.TIMED_OUT.value)
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
INT_FIELDS = frozenset({"viewportWidth", "viewportHeight"})


# --- rendering -------------------------------------------------------------------------


def wants_partial(request: Request) -> bool:
    """An htmx swap (not a boosted page load) gets the partial alone."""
    headers = request.headers
    return headers.get("hx-request") == "true" and headers.get("hx-boosted") != "true"


def _flash_signer(request: Request) -> TimestampSigner:
    key = request.app.state.authenticator.hasher.derive("corral panel flash")
    return TimestampSigner(key, salt="corral.flash")


def take_flash(request: Request) -> str | None:
    """The message a redirect left for this page (signed, so no other site can plant one)."""
    cookie = request.cookies.get(FLASH_COOKIE)
    if not cookie:
        return None
    try:
        return _flash_signer(request).unsign(cookie, max_age=FLASH_SECONDS).decode()
    except (BadSignature, UnicodeDecodeError):
        return None


def redirect_with_flash(request: Request, target: str, message: str) -> Response:
    """After a change: 303 to `target` (htmx: an `HX-Redirect`), the message shown there."""
    if wants_partial(request):
        response: Response = Response(status_code=200, headers={"HX-Redirect": target})
    else:
        response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        FLASH_COOKIE,
        _flash_signer(request).sign(message).decode(),
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
    response = render_page(
        page if full else partial,
        principal,
        status_code=status_code,
        assets=panel_assets(settings.panel_assets),
        nav=NAV,
        path=request.url.path,
        flash=flash,
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


def _services(request: Request) -> AppServices:
    services: AppServices = request.app.state.services
    return services


@asynccontextmanager
async def reading(request: Request) -> AsyncIterator[AsyncSession]:
    """The request's session for reads (on SQLite it takes no write lock)."""
    async with _services(request).sessionmaker() as session:
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
    request: Request, change: Change, work: Callable[[AsyncSession], Awaitable[Any]]
) -> Any:
    """Run `work` through server/actions.perform: the same role rule, unit of work and
    audit event as the GraphQL mutation of the same name. An InvalidInput is rolled back,
    audited as an error and raised again for the form to show."""
    principal = principal_of(request.scope)
    if principal is None:  # AccessControl lets no one in without one
        raise Forbidden("not logged in")
    pk = None if change.object_id is None else decode_id(change.object_id)
    return await perform(
        _services(request),
        principal,
        change.action,
        work,
        object_type=change.object_type,
        object_id=None if pk is None else pk[1],
        fields=change.fields,
        client_address=client_address(request),
    )


async def refuse_viewer(request: Request, change: Change) -> Response | None:
    """A 403 page, audited as denied by the same rule and entry as perform's, unless the
    principal may take the action (checked before any form is read)."""
    principal = principal_of(request.scope)
    if principal is not None and refusal(principal, change.action) is None:
        return None
    denied = raised_entry(change.action, FORBIDDEN, change.object_id, change.fields)
    services = _services(request)
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


def path_id(request: Request, name: str) -> int | None:
    raw = str(request.path_params[name])
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 12 else None


# --- dashboard -------------------------------------------------------------------------


async def dashboard(request: Request) -> Response:
    """Counts, what runs now, recent failures, proxies whose last check failed."""
    async with reading(request) as session:
        counts = {
            label: int(await session.scalar(select(func.count()).select_from(model)) or 0)
            for label, model in (("Profiles", Profile), ("Services", Service), ("Proxies", Proxy))
        }
        by_status = dict(
            (
                await session.execute(select(Command.status, func.count()).group_by(Command.status))
            ).all()
        )
        running = await session.scalars(
            select(Command)
            .where(Command.status == CommandStatus.RUNNING.value)
            .order_by(Command.started_at, Command.id)
            .limit(PAGE_SIZE)
        )
        failures = await session.scalars(
            select(Command)
            .where(Command.status.in_(FAILED_STATUSES))
            .order_by(Command.id.desc())
            .limit(RECENT)
        )
        unhealthy = await session.scalars(
            select(Proxy).where(Proxy.health_ok.is_(False)).order_by(Proxy.name_key)
        )
        return render_view(
            request,
            "dashboard.html",
            "_dashboard.html",
            counts=counts,
            runs_by_status=[
                (status.value, by_status.get(status.value, 0)) for status in CommandStatus
            ],
            running=list(running),
            failures=list(failures),
            unhealthy=list(unhealthy),
        )


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
    settings = _services(request).settings

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


async def _profile_detail(
    request: Request, session: AsyncSession, profile: Profile
) -> ProfileDetail:
    principal = principal_of(request.scope)
    box = _services(request).secret_box
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
    return ProfileDetail(
        services=services,
        proxies=[(proxy, bool(is_default)) for proxy, is_default in proxies],
        runs=list(runs),
        run_count=int(run_count or 0),
        data_dir=profile_service.user_data_dir(profile, _services(request).settings),
    )


async def _show_profile(
    request: Request,
    profile_id: int,
    *,
    form: dict[str, str] | None = None,
    errors: dict[str, list[str]] | None = None,
    status_code: int = 200,
    page: str = "profile.html",
) -> Response:
    async with reading(request) as session:
        profile = await session.get(Profile, profile_id)
        if profile is None:
            return not_found(request, "profile")
        detail = await _profile_detail(request, session, profile)
    return render_view(
        request,
        page,
        "_profile_edit_form.html",
        status_code=status_code,
        profile=profile,
        detail=detail,
        form=profile_form(profile) if form is None else form,
        errors=errors or {},
    )


async def profile_page(request: Request) -> Response:
    profile_id = path_id(request, "profile_id")
    if profile_id is None:
        return not_found(request, "profile")
    return await _show_profile(request, profile_id)


async def profile_update(request: Request) -> Response:
    profile_id = path_id(request, "profile_id")
    if profile_id is None:
        return not_found(request, "profile")
    fields = await read_form(request)
    values = form_values(fields, EDIT_FIELDS)
    change = Change("updateProfile", sorted(values), encode_id("Profile", profile_id))
    refused = await refuse_viewer(request, change)
    if refused is not None:
        return refused
    settings = _services(request).settings
    try:
        profile: Profile = await apply_change(
            request,
            change,
            lambda session: profile_service.update_profile(session, profile_id, values, settings),
        )
    except InvalidInput as exc:
        errors = errors_by_field(exc.errors)
        if "id" in errors:
            return not_found(request, "profile")
        return await _show_profile(request, profile_id, form=fields, errors=errors, status_code=422)
    return redirect_with_flash(request, f"/profiles/{profile.id}", "Profile saved.")


async def profile_delete_page(request: Request) -> Response:
    """The confirmation: what happens to the profile's data dir and its runs."""
    profile_id = path_id(request, "profile_id")
    if profile_id is None:
        return not_found(request, "profile")
    return await _show_profile(request, profile_id, page="profile_delete.html")


async def profile_delete(request: Request) -> Response:
    profile_id = path_id(request, "profile_id")
    if profile_id is None:
        return not_found(request, "profile")
    change = Change("deleteProfile", ["id"], encode_id("Profile", profile_id))
    refused = await refuse_viewer(request, change)
    if refused is not None:
        return refused
    try:
        notices: list[str] = await apply_change(
            request,
            change,
            lambda session: profile_service.delete_profile(session, profile_id),
        )
    except InvalidInput as exc:
        if any(error.code is ErrorCode.NOT_FOUND for error in exc.errors):
            return not_found(request, "profile")
        reasons = " ".join(error.message for error in exc.errors)
        return error_page(request, 409, "Cannot delete this profile", reasons)
    return redirect_with_flash(request, "/profiles", " ".join(notices).capitalize() + ".")


# --- runs ------------------------------------------------------------------------------


def status_filter(request: Request) -> str | None:
    raw = request.query_params.get("status", "").strip().upper()
    return raw if raw in CommandStatus.__members__ else None


async def run_list(request: Request) -> Response:
    status = status_filter(request)
    stmt = select(Command)
    if status is not None:
        stmt = stmt.where(Command.status == status)
    async with reading(request) as session:
        paging = await paged(session, stmt, page_number(request))
        runs = await session.scalars(
            stmt.order_by(Command.id.desc()).offset(paging.offset).limit(PAGE_SIZE)
        )
        return render_view(
            request,
            "runs.html",
            "_runs_table.html",
            runs=list(runs),
            paging=paging,
            status=status,
            statuses=[status.value for status in CommandStatus],
        )


async def run_page(request: Request) -> Response:
    """A run: status, timing, exit code, error, argv and the last LOG_TAIL log lines."""
    command_id = path_id(request, "command_id")
    if command_id is None:
        return not_found(request, "run")
    async with reading(request) as session:
        command = await session.get(Command, command_id)
        if command is None:
            return not_found(request, "run")
        tail = await session.scalars(
            select(LogLine)
            .where(LogLine.command_id == command_id)
            .order_by(LogLine.seq.desc())
            .limit(LOG_TAIL)
        )
        lines = list(reversed(list(tail)))
        return render_view(
            request,
            "run.html",
            "_run_log.html",
            run=command,
            lines=lines,
            log_tail=LOG_TAIL,
            final=CommandStatus(command.status).is_final,
            previous_attempt=1,
        )


RUN_ACTIONS: dict[str, Callable[[AsyncSession, int], Awaitable[Command]]] = {
    "cancelCommand": command_service.cancel_command,
    "retryCommand": command_service.retry_command,
}


async def _run_action(request: Request, action: str) -> Response:
    """Cancel or retry a run from its page: the GraphQL mutation's role rule, unit of work
    and audit entry (server/actions.perform); a refusal is the flash on the run page."""
    command_id = path_id(request, "command_id")
    if command_id is None:
        return not_found(request, "run")
    change = Change(action, ["id"], encode_id("Command", command_id), object_type="Command")
    refused = await refuse_viewer(request, change)
    if refused is not None:
        return refused
    target = f"/runs/{command_id}"
    try:
        command: Command = await apply_change(
            request, change, lambda session: RUN_ACTIONS[action](session, command_id)
        )
    except InvalidInput as exc:
        if any(error.code is ErrorCode.NOT_FOUND for error in exc.errors):
            return not_found(request, "run")
        reasons = "; ".join(error.message for error in exc.errors)
        verb = "cancel" if action == "cancelCommand" else "retry"
        return redirect_with_flash(request, target, f"Could not {verb} this run: {reasons}.")
    return redirect_with_flash(request, target, _run_action_done(action, command))


def _run_action_done(action: str, command: Command) -> str:
    if action == "retryCommand":
        return f"Run #{command.id} is queued again."
    if command.status == CommandStatus.CANCELLED.value:
        return f"Run #{command.id} cancelled."
    return f"Cancel requested: run #{command.id} stops in a moment."


async def run_cancel(request: Request) -> Response:
    return await _run_action(request, "cancelCommand")


async def run_retry(request: Request) -> Response:
    return await _run_action(request, "retryCommand")


def panel_routes(_settings: Settings) -> list[Route]:
    """The panel's pages (behind AccessControl; CSRF checked by CsrfProtection)."""
    return [
        Route("/", dashboard, methods=["GET"]),
        Route("/profiles", profile_list, methods=["GET"]),
        Route("/profiles", profile_create, methods=["POST"]),
        Route("/profiles/{profile_id}", profile_page, methods=["GET"]),
        Route("/profiles/{profile_id}", profile_update, methods=["POST"]),
        Route("/profiles/{profile_id}/delete", profile_delete_page, methods=["GET"]),
        Route("/profiles/{profile_id}/delete", profile_delete, methods=["POST"]),
        Route("/runs", run_list, methods=["GET"]),
        Route("/runs/{command_id}", run_page, methods=["GET"]),
        Route("/runs/{command_id}/tail", run_tail, methods=["GET"]),
        Route("/runs/{command_id}/cancel", run_cancel, methods=["POST"]),
        Route("/runs/{command_id}/retry", run_retry, methods=["POST"]),
    ]
