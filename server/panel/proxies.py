"""Proxies: list with health and paging, detail, create/edit/delete, share-link import and
"check now" (issue #17). Credentials are write-only: no page shows them, a form never
echoes them back (leave blank to keep, a checkbox to remove)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import aliased
from starlette.requests import Request
from starlette.responses import Response

from server import proxies as proxy_service
from server.access import principal_of
from server.errors import ErrorCode, InvalidInput, UserError
from server.ids import encode_global_id as encode_id
from server.login import read_form
from server.models import Profile, ProfileProxy, Proxy, ProxyCheck, ProxyProtocol, utcnow
from server.panel.common import (
    PAGE_SIZE,
    Change,
    FlashKind,
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
    wants_partial,
)
from server.panel.proxy_routing import (
    ACTION_CHOICES,
    NETWORK_CHOICES,
    RulesForm,
    apply_op,
    posted_rows,
    refused_form,
    rule_values,
    rules_form,
)
from server.proxy_health import is_flagged, recent_checks
from server.routing import initial_rules, routing_table, set_routing_rules
from server.secretbox import token_preview
from xray.binary import installed_binary
from xray.links import redact_share_link

PROTOCOLS = [protocol.value for protocol in ProxyProtocol]
# The proxy form's inputs, by the domain's (GraphQL's) field names; credentials apart.
FORM_FIELDS = ("name", "protocol", "host", "port", "settings", "viaId")
HISTORY_SHOWN = 20  # checks in the proxy page's health history

PROXY = ObjectKind("Proxy", "proxy", "proxy_id", "/proxies")


# --- what the pages show -----------------------------------------------------------------


def ago(then: datetime, now: datetime) -> str:
    """`then` as an age a person reads at a glance: "just now", "3 min ago", "2 days ago"."""
    if then.tzinfo is None:
        then = then.replace(tzinfo=UTC)
    seconds = int((now - then).total_seconds())
    for size, unit in ((86400, "day"), (3600, "h"), (60, "min")):
        if seconds >= size:
            count = seconds // size
            return f"{count} {unit}{'s' if unit == 'day' and count > 1 else ''} ago"
    return "just now" if seconds < 10 else f"{seconds} s ago"


@dataclass(frozen=True)
class ProxyRow:
    """One proxy as a list row or a detail page shows it."""

    proxy: Proxy
    via_name: str | None
    checked_ago: str | None
    binary: str | None = None  # the proxy binary checks and sidecars use here
    flagged: bool = False  # failed its last CORRAL_PROXY_FLAG_AFTER checks

    @property
    def health(self) -> str:
        if self.proxy.health_ok is None:
            return "unchecked"
        return "ok" if self.proxy.health_ok else "failed"


def proxy_row(
    proxy: Proxy, via_name: str | None, flag_after: int, binary: str | None = None
) -> ProxyRow:
    checked = proxy.health_checked_at
    checked_ago = None if checked is None else ago(checked, utcnow())
    return ProxyRow(proxy, via_name, checked_ago, binary, is_flagged(proxy, flag_after))


def _binary_label(request: Request) -> str | None:
    binary = installed_binary(app_services(request).settings.xray_bin)
    return None if binary is None else binary.label


def _with_via() -> Any:
    via = aliased(Proxy)
    return select(Proxy, via.name).outerjoin(via, via.id == Proxy.via_id)


async def _row(request: Request, session: AsyncSession, proxy_id: int) -> ProxyRow | None:
    found = (await session.execute(_with_via().where(Proxy.id == proxy_id))).first()
    if found is None:
        return None
    return proxy_row(found[0], found[1], _flag_after(request), _binary_label(request))


def _flag_after(request: Request) -> int:
    return app_services(request).settings.proxy_flag_after


async def _proxy_list(request: Request, session: AsyncSession) -> dict[str, Any]:
    stmt, binary = select(Proxy), _binary_label(request)
    paging = await paged(session, stmt, page_number(request))
    found = await session.execute(
        _with_via().order_by(Proxy.name_key, Proxy.id).offset(paging.offset).limit(PAGE_SIZE)
    )
    return {
        "rows": [proxy_row(proxy, via, _flag_after(request), binary) for proxy, via in found],
        "paging": paging,
        "via_choices": await _via_choices(session, None),
        "protocols": PROTOCOLS,
    }


async def _via_choices(session: AsyncSession, proxy_id: int | None) -> list[tuple[int, str]]:
    """The proxies this one may be dialed through (the domain refuses loops)."""
    stmt = select(Proxy.id, Proxy.name).order_by(Proxy.name_key)
    if proxy_id is not None:
        stmt = stmt.where(Proxy.id != proxy_id)
    return [(pk, name) for pk, name in await session.execute(stmt)]


# --- forms -------------------------------------------------------------------------------


def proxy_form(proxy: Proxy | None) -> dict[str, str]:
    """A proxy's values as its edit form shows them (never its credentials)."""
    if proxy is None:
        return {"protocol": "http", "settings": ""}
    return {
        "name": proxy.name,
        "protocol": proxy.protocol,
        "host": proxy.host,
        "port": str(proxy.port),
        "settings": json.dumps(proxy.settings, indent=1) if proxy.settings else "",
        "viaId": "" if proxy.via_id is None else str(proxy.via_id),
    }


def _number(raw: str) -> int | str:
    """Digits as an int; anything else as typed, for the domain to refuse next to its field."""
    raw = raw.strip()
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 12 else raw


def _settings(raw: str) -> Any:
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        return raw  # not an object: the domain says so next to the field


def _via_id(raw: str) -> int | None:
    """The chosen next hop; not a number: 0, which no proxy has (the domain's "no such
    proxy" next to the field)."""
    if not raw.strip():
        return None
    number = _number(raw)
    return number if isinstance(number, int) else 0


def proxy_values(fields: dict[str, str], *, creating: bool) -> dict[str, Any]:
    """The form as create_proxy/update_proxy take it. Blank credentials are left out (kept);
    `clearCredentials` removes them unless new ones are typed."""
    values: dict[str, Any] = {
        "name": fields.get("name", ""),
        "protocol": fields.get("protocol", ""),
        "host": fields.get("host", ""),
        "port": _number(fields.get("port", "")),
        "settings": _settings(fields.get("settings", "")),
        "viaId": _via_id(fields.get("viaId", "")),
    }
    clear = not creating and fields.get("clearCredentials") == "on"
    for key in ("username", "password"):
        typed = fields.get(key, "")
        if typed:
            values[key] = typed
        elif clear:
            values[key] = None
    return values


def kept_form(fields: dict[str, str]) -> dict[str, str]:
    """What a refused form shows again: what was typed, but never the credentials."""
    return {name: fields.get(name, "") for name in (*FORM_FIELDS, "clearCredentials")}


# --- list and create -----------------------------------------------------------------------


async def _list_page(
    request: Request, partial: str, *, status_code: int = 200, **context: Any
) -> Response:
    """The list page (or `partial` of it, for htmx), its forms as `context` has them."""
    async with reading(request) as session:
        listing = await _proxy_list(request, session)
    context = {"form": proxy_form(None), "errors": {}, "imports": ImportResult.empty(), **context}
    return render_view(
        request, "proxies.html", partial, status_code=status_code, **listing, **context
    )


async def proxy_list(request: Request) -> Response:
    return await _list_page(request, "_proxies_table.html")


async def proxy_create(request: Request) -> Response:
    fields = await read_form(request)
    values = proxy_values(fields, creating=True)
    change = Change("createProxy", sorted(values), object_type="Proxy")
    refused = await refuse_viewer(request, change)
    if refused is not None:
        return refused
    box, settings = app_services(request).secret_box, app_services(request).settings
    try:
        proxy: Proxy = await apply_change(
            request,
            change,
            lambda session: proxy_service.create_proxy(
                session,
                box,
                values,
                routing_rules=initial_rules(settings),
                binary=installed_binary(settings.xray_bin),
            ),
        )
    except InvalidInput as exc:
        return await _list_page(
            request,
            "_proxy_create_form.html",
            status_code=422,
            form=kept_form(fields),
            errors=errors_by_field(exc.errors),
        )
    return redirect_with_flash(request, f"/proxies/{proxy.id}", f"Proxy {proxy.name} created.")


# --- import ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ImportProblem:
    """A pasted link that was not imported: its line, the link redacted, and why."""

    line: int
    link: str
    message: str


@dataclass(frozen=True)
class ImportResult:
    """What the import form shows after a paste with bad links."""

    text: str  # what the textarea shows: the failed lines
    problems: list[ImportProblem]
    imported: list[str]

    @classmethod
    def empty(cls) -> ImportResult:
        return cls("", [], [])


def import_problems(
    lines: list[tuple[int, str]], errors: list[UserError]
) -> tuple[list[ImportProblem], list[ImportProblem]]:
    """(per-link problems, problems of the paste as a whole) from import_proxies' errors."""
    per_link: list[ImportProblem] = []
    overall: list[ImportProblem] = []
    for error in errors:
        index = _link_index(error, len(lines))
        if index is None:
            overall.append(ImportProblem(0, "", error.message))
            continue
        number, link = lines[index]
        message = error.message.removeprefix(f"link {index + 1}: ")
        per_link.append(ImportProblem(number, redact_share_link(link), message))
    return per_link, overall


def _link_index(error: UserError, count: int) -> int | None:
    if len(error.field) != 2 or not error.field[1].isdigit():
        return None
    index = int(error.field[1])
    return index if index < count else None


async def proxy_import(request: Request) -> Response:
    """Paste share links, one a line: the good ones are created, each bad one is listed with
    its line number, the link redacted and the reason, and stays in the textarea."""
    fields = await read_form(request)
    change = Change("importProxies", ["links"], object_type="Proxy")
    refused = await refuse_viewer(request, change)
    if refused is not None:
        return refused
    numbered = enumerate(fields.get("links", "").splitlines(), start=1)
    lines = [(number, line.strip()) for number, line in numbered if line.strip()]
    if not lines:
        reason = "paste at least one share link"
        return await _import_refused(request, ImportResult.empty(), [reason])
    box, settings = app_services(request).secret_box, app_services(request).settings
    rules, binary = initial_rules(settings), installed_binary(settings.xray_bin)
    created, errors = await apply_change(
        request,
        change,
        lambda session: proxy_service.import_proxies(
            session, box, [link for _, link in lines], routing_rules=rules, binary=binary
        ),
        error_codes=lambda result: [error.code.value for error in result[1]],
    )
    names = [proxy.name for proxy in created]
    if not errors:
        return redirect_with_flash(request, "/proxies", f"Imported {_count(names)}.")
    per_link, overall = import_problems(lines, errors)
    failed = {problem.line for problem in per_link}
    text = "\n".join(link for number, link in lines if number in failed or overall)
    reasons = [problem.message for problem in overall]
    return await _import_refused(request, ImportResult(text, per_link, names), reasons)


def _count(names: list[str]) -> str:
    listed = ", ".join(names[:10]) + (", …" if len(names) > 10 else "")
    return f"{len(names)} prox{'y' if len(names) == 1 else 'ies'}: {listed}"


async def _import_refused(request: Request, imports: ImportResult, reasons: list[str]) -> Response:
    return await _list_page(
        request,
        "_proxy_import.html",
        status_code=422,
        errors={"links": reasons} if reasons else {},
        imports=imports,
        imported_count=_count(imports.imported) if imports.imported else None,
        refresh_table=wants_partial(request) and bool(imports.imported),
    )


# --- detail, edit, delete ------------------------------------------------------------------


@dataclass(frozen=True)
class ProxyDetail:
    """What a proxy's page shows besides its row."""

    profiles: list[tuple[Profile, bool]]
    chained_from: list[Proxy]
    credentials: list[str]
    routing: list[str]
    checks: list[ProxyCheck]  # its health history, newest first


async def _proxy_detail(request: Request, session: AsyncSession, proxy: Proxy) -> ProxyDetail:
    users = await session.execute(
        select(Profile, ProfileProxy.is_default)
        .join(ProfileProxy, ProfileProxy.profile_id == Profile.id)
        .where(ProfileProxy.proxy_id == proxy.id)
        .order_by(Profile.name_key)
    )
    chained = await session.scalars(
        select(Proxy).where(Proxy.via_id == proxy.id).order_by(Proxy.name_key)
    )
    return ProxyDetail(
        profiles=[(profile, bool(is_default)) for profile, is_default in users],
        chained_from=list(chained),
        credentials=_credentials_shown(request, proxy),
        routing=await routing_table(session, proxy),
        checks=await recent_checks(session, proxy.id, HISTORY_SHOWN),
    )


def _credentials_shown(request: Request, proxy: Proxy) -> list[str]:
    """Which credentials are set; an admin also sees the password's preview, never more."""
    principal = principal_of(request.scope)
    credentials = proxy_service.read_credentials(proxy, app_services(request).secret_box)
    shown = []
    if "username" in credentials:
        shown.append("user name set")
    if "password" in credentials:
        preview = token_preview(credentials["password"])
        admin = principal is not None and principal.is_admin
        shown.append(f"password set ({preview})" if admin else "password set")
    return shown


async def _show_proxy(
    request: Request,
    proxy_id: int,
    *,
    form: dict[str, str] | None = None,
    errors: dict[str, list[str]] | None = None,
    rules: RulesForm | None = None,
    status_code: int = 200,
    page: str = "proxy.html",
    partial: str = "_proxy_edit_form.html",
) -> Response:
    async with reading(request) as session:
        row = await _row(request, session, proxy_id)
        if row is None:
            return not_found(request, "proxy")
        detail = await _proxy_detail(request, session, row.proxy)
        via_choices = await _via_choices(session, proxy_id)
    return render_view(
        request,
        page,
        partial,
        status_code=status_code,
        row=row,
        proxy=row.proxy,
        detail=detail,
        via_choices=via_choices,
        protocols=PROTOCOLS,
        form=proxy_form(row.proxy) if form is None else form,
        errors=errors or {},
        rules=rules_form(row.proxy.routing_rules) if rules is None else rules,
        routing_actions=ACTION_CHOICES,
        routing_networks=NETWORK_CHOICES,
        hold_on_flagged=app_services(request).settings.hold_on_flagged_proxy,
        check_interval=_interval_text(app_services(request).settings.proxy_check_interval),
    )


def _interval_text(seconds: float) -> str | None:
    """The check interval as the history says it ("10 min"); None when checks are off."""
    if seconds <= 0:
        return None
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:.0f} min"
    return f"{seconds:g} s"


async def proxy_page(request: Request) -> Response:
    return await show_object(request, PROXY, _show_proxy)


async def proxy_update(request: Request) -> Response:
    box, settings = app_services(request).secret_box, app_services(request).settings
    binary = installed_binary(settings.xray_bin)

    return await update_object(
        request,
        PROXY,
        lambda fields: proxy_values(fields, creating=False),
        lambda session, proxy_id, values: proxy_service.update_proxy(
            session, box, proxy_id, values, binary=binary
        ),
        _show_proxy,
        lambda proxy: f"Proxy {proxy.name} saved.",
        kept_form,
    )


async def proxy_routing(request: Request) -> Response:
    """Save the routing rule editor (setRoutingRules' domain function and audit entry); a
    refusal shows the form again, each message next to its rule, the input kept."""
    proxy_id = path_id(request, "proxy_id")
    if proxy_id is None:
        return not_found(request, "proxy")
    fields = await read_form(request)
    change = Change("setRoutingRules", ["proxyId", "rules"], encode_id("Proxy", proxy_id), "Proxy")
    refused = await refuse_viewer(request, change)
    if refused is not None:
        return refused
    services = app_services(request)
    op = fields.get("op", "save")
    if op == "reset":
        raw, done = initial_rules(services.settings), "reset to the default rule set"
        rows = rules_form(raw).rows[:-1]
    else:
        rows, done = apply_op(posted_rows(fields), op)
        raw = [rule_values(row) for row in rows]
    try:
        proxy: Proxy = await apply_change(
            request,
            change,
            lambda session: set_routing_rules(
                session, services.settings, services.secret_box, proxy_id, raw
            ),
        )
    except InvalidInput as exc:
        if any(error.field == ("proxyId",) for error in exc.errors):
            return not_found(request, "proxy")
        return await _show_proxy(
            request,
            proxy_id,
            rules=refused_form(rows, exc.errors),
            status_code=422,
            partial="_routing_rules_form.html",
        )
    message = f"Routing rules of {proxy.name} {done}."
    # htmx follows HX-Redirect by setting location: a fragment on the same page would only
    # scroll, not load the saved table; a plain post lands on the rules.
    back = f"/proxies/{proxy.id}" + ("" if wants_partial(request) else "#routing")
    return redirect_with_flash(request, back, message)


async def proxy_delete_page(request: Request) -> Response:
    """The confirmation: which profiles lose it, which chains stop it."""
    return await show_object(request, PROXY, _show_proxy, page="proxy_delete.html")


async def proxy_delete(request: Request) -> Response:
    return await delete_object(request, PROXY, proxy_service.delete_proxy)


# --- check now ---------------------------------------------------------------------------


async def proxy_check(request: Request) -> Response:
    """Check the proxy now through a real sidecar (server/proxies.check_proxy, as GraphQL's
    checkProxy). With htmx the row (or the detail page's health block) comes back to be
    swapped in place; without, a redirect back with the outcome as the flash."""
    proxy_id = path_id(request, "proxy_id")
    if proxy_id is None:
        return not_found(request, "proxy")
    fields = await read_form(request)
    from_list = fields.get("view") == "row"
    change = Change("checkProxy", ["id"], encode_id("Proxy", proxy_id), "Proxy")
    refused = await refuse_viewer(request, change)
    if refused is not None:
        return refused
    services = app_services(request)
    back = _back_to(fields, proxy_id)
    try:
        proxy: Proxy = await apply_change(
            request,
            change,
            lambda session: proxy_service.check_proxy(
                session, services.sessionmaker, services.settings, services.secret_box, proxy_id
            ),
        )
    except InvalidInput as exc:
        if any(error.code is ErrorCode.NOT_FOUND for error in exc.errors):
            return not_found(request, "proxy")
        reasons = "; ".join(error.message for error in exc.errors)
        return redirect_with_flash(
            request, back, f"Could not check the proxy: {reasons}.", kind="error"
        )
    if not wants_partial(request):
        kind: FlashKind = "success" if proxy.health_ok else "error"
        return redirect_with_flash(request, back, _checked(proxy), kind=kind)
    async with reading(request) as session:
        row = await _row(request, session, proxy_id)
    if row is None:  # deleted while it was checked
        return redirect_with_flash(request, back, "The proxy is gone.", kind="error")
    partial = "_proxy_row.html" if from_list else "_proxy_health.html"
    return render_view(request, "proxies.html", partial, row=row, proxy=row.proxy)


def _back_to(fields: dict[str, str], proxy_id: int) -> str:
    """Where a plain (no htmx) check returns: the list page it was pressed on, or the proxy."""
    if fields.get("view") != "row":
        return f"/proxies/{proxy_id}"
    page = fields.get("page", "")
    return (
        f"/proxies?page={page}"
        if page.isascii() and page.isdigit() and len(page) < 7
        else "/proxies"
    )


def _checked(proxy: Proxy) -> str:
    if proxy.health_ok:
        return f"Proxy {proxy.name} is ok ({proxy.health_latency_ms or 0:.0f} ms)."
    return f"Proxy {proxy.name} failed its check: {proxy.health_error or 'no answer'}."
