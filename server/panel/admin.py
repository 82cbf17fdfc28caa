"""Admins' pages: the audit log and API tokens (issue #17, from the access-control issue).

Both are for admins only: a viewer asking gets 403 (the menu hides them from viewers). The
audit log pages by keyset on its primary key, newest first, and never counts its rows (a
COUNT over 100,000 events costs more than the page). A token is made and revoked by the
same domain functions as `corral token` and the createApiToken/revokeApiToken mutations;
its plaintext is shown once, in the answer to the POST that made it, and nowhere else.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, time
from typing import Any, TypeVarTuple

from sqlalchemy import Select, false, select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request
from starlette.responses import Response

from server import auth
from server.access import principal_of
from server.audit import Outcome
from server.errors import ErrorCode, InvalidInput
from server.ids import decode_global_id as decode_id
from server.ids import encode_global_id as encode_id
from server.login import read_form
from server.models import ApiToken, AuditEvent, Role
from server.panel.common import (
    PAGE_SIZE,
    Change,
    app_services,
    apply_change,
    error_page,
    errors_by_field,
    not_found,
    page_number,
    paged,
    path_id,
    reading,
    redirect_with_flash,
    refuse_viewer,
    render_view,
)

_Row = TypeVarTuple("_Row")
OUTCOMES: tuple[Outcome, ...] = ("ok", "error", "denied")
# The panel page of each kind of object the audit log names (by its global ID's type).
OBJECT_PAGES = {
    "Profile": "/profiles",
    "Command": "/runs",
    "Service": "/services",
    "Proxy": "/proxies",
    "CommandTemplate": "/templates",
}


def admins_only(request: Request) -> Response | None:
    """A 403 page unless an admin asks (the audit log and the tokens are for admins)."""
    principal = principal_of(request.scope)
    if principal is not None and principal.is_admin:
        return None
    return error_page(request, 403, "Not allowed", "Only an admin can see this page.")


# --- audit -----------------------------------------------------------------------------


@dataclass(frozen=True)
class AuditFilters:
    """The audit page's filters, as typed in its form (empty: any)."""

    user: str
    action: str
    outcome: str

    @classmethod
    def of(cls, request: Request) -> AuditFilters:
        params = request.query_params
        outcome = params.get("outcome", "").strip().lower()
        return cls(
            user=params.get("user", "").strip(),
            action=params.get("action", "").strip(),
            outcome=outcome if outcome in OUTCOMES else "",
        )

    def params(self) -> dict[str, str]:
        """The filters given, for the pager's links."""
        return {key: value for key, value in vars(self).items() if value}

    def apply(self, stmt: Select[*_Row]) -> Select[*_Row]:
        if "\x00" in self.user + self.action:  # matches nothing (and PostgreSQL rejects it)
            return stmt.where(false())
        if self.user:
            stmt = stmt.where(AuditEvent.actor == self.user)
        if self.action:
            stmt = stmt.where(AuditEvent.action == self.action)
        if self.outcome:
            stmt = stmt.where(AuditEvent.outcome == self.outcome)
        return stmt


@dataclass(frozen=True)
class AuditRow:
    """One event as the page shows it."""

    event: AuditEvent
    token_name: str | None
    object_label: str | None
    object_href: str | None
    fields: list[str]
    codes: list[str]


def _cursor(request: Request, name: str) -> int | None:
    raw = request.query_params.get(name, "")
    return int(raw) if raw.isascii() and raw.isdigit() and 0 < len(raw) < 12 else None


def _object_of(event: AuditEvent) -> tuple[str | None, str | None]:
    """A label for the event's object, and its panel page when it has one."""
    if event.object_id is None:
        return event.object_type, None
    decoded = decode_id(event.object_id)
    if decoded is None:  # the CLI's and the login's events name rows by their plain id
        return f"{event.object_type or 'object'} {event.object_id}", None
    type_name, pk = decoded
    base = OBJECT_PAGES.get(type_name)
    return f"{type_name} {pk}", None if base is None else f"{base}/{pk}"


def _detail_of(event: AuditEvent) -> tuple[list[str], list[str]]:
    """The field names an event records, and its error codes (or a login's reason)."""
    detail = event.detail or {}
    fields = [str(name) for name in detail.get("fields") or ()]
    codes = [str(code) for code in detail.get("userErrors") or ()]
    for key in ("error", "reason"):
        if isinstance(detail.get(key), str):
            codes.append(detail[key])
    return fields, codes


def _audit_row(event: AuditEvent, token_name: str | None) -> AuditRow:
    label, href = _object_of(event)
    fields, codes = _detail_of(event)
    return AuditRow(event, token_name, label, href, fields, codes)


@dataclass(frozen=True)
class AuditPage:
    rows: list[AuditRow]
    newer: int | None  # the `after` cursor of the newer page, if there is one
    older: int | None  # the `before` cursor of the older page, if there is one


async def _audit_page(request: Request, session: AsyncSession, filters: AuditFilters) -> AuditPage:
    """PAGE_SIZE events, newest first, before (older than) or after (newer than) a cursor;
    one more row than shown tells whether the page has a neighbour that way."""
    before, after = _cursor(request, "before"), _cursor(request, "after")
    stmt = filters.apply(
        select(AuditEvent, ApiToken.name).outerjoin(ApiToken, ApiToken.id == AuditEvent.token_id)
    )
    if after is not None and before is None:
        found = list(
            await session.execute(
                stmt.where(AuditEvent.id > after).order_by(AuditEvent.id).limit(PAGE_SIZE + 1)
            )
        )
        more_newer = len(found) > PAGE_SIZE
        rows = [_audit_row(event, name) for event, name in reversed(found[:PAGE_SIZE])]
        newer = rows[0].event.id if rows and more_newer else None
        return AuditPage(rows, newer, rows[-1].event.id if rows else after + 1)
    if before is not None:
        stmt = stmt.where(AuditEvent.id < before)
    found = list(await session.execute(stmt.order_by(AuditEvent.id.desc()).limit(PAGE_SIZE + 1)))
    rows = [_audit_row(event, name) for event, name in found[:PAGE_SIZE]]
    older = rows[-1].event.id if len(found) > PAGE_SIZE else None
    if before is None:  # the newest page
        return AuditPage(rows, None, older)
    return AuditPage(rows, rows[0].event.id if rows else before - 1, older)


async def audit_list(request: Request) -> Response:
    """The audit log, newest first, filtered by user, action and outcome."""
    refused = admins_only(request)
    if refused is not None:
        return refused
    filters = AuditFilters.of(request)
    async with reading(request) as session:
        page = await _audit_page(request, session, filters)
    return render_view(
        request,
        "audit.html",
        "_audit_table.html",
        audit=page,
        filters=filters,
        outcomes=OUTCOMES,
    )


# --- API tokens ------------------------------------------------------------------------

TOKEN_FIELDS = ("name", "role", "expiresAt")


def expiry_of(raw: str) -> datetime | None:
    """A date typed in the form as the time the token stops working: 00:00 UTC that day."""
    if not raw.strip():
        return None
    try:
        day = date.fromisoformat(raw.strip())
    except ValueError:
        raise InvalidInput.one(
            "expiresAt", "must be a date like 2030-01-31.", ErrorCode.INVALID
        ) from None
    return datetime.combine(day, time(), tzinfo=UTC)


async def _token_list(request: Request, session: AsyncSession) -> dict[str, Any]:
    stmt = select(ApiToken)
    paging = await paged(session, stmt, page_number(request))
    rows = await session.scalars(
        stmt.order_by(ApiToken.id.desc()).offset(paging.offset).limit(PAGE_SIZE)
    )
    return {"tokens": list(rows), "paging": paging, "token_active": auth.token_is_active}


async def _show_tokens(
    request: Request,
    *,
    form: dict[str, str] | None = None,
    errors: dict[str, list[str]] | None = None,
    created: tuple[ApiToken, str] | None = None,
    status_code: int = 200,
) -> Response:
    async with reading(request) as session:
        listing = await _token_list(request, session)
    return render_view(
        request,
        "tokens.html",
        "_tokens_table.html",
        status_code=status_code,
        form=form or {"role": Role.VIEWER.value},
        errors=errors or {},
        created=created,
        roles=[role.value for role in Role],
        **listing,
    )


async def token_list(request: Request) -> Response:
    """API tokens, newest first, with the form that makes one."""
    return admins_only(request) or await _show_tokens(request)


async def token_create(request: Request) -> Response:
    """Make a token (createApiToken); the answer is the one page that shows its plaintext."""
    fields = await read_form(request)
    given = [name for name in TOKEN_FIELDS if fields.get(name, "").strip()]
    change = Change("createApiToken", given, object_type="ApiToken")
    refused = await refuse_viewer(request, change)
    if refused is not None:
        return refused
    principal = principal_of(request.scope)
    hasher = app_services(request).token_hasher

    plaintexts: list[str] = []  # kept out of the returned row: the audit names the row

    async def work(session: AsyncSession) -> ApiToken:
        token, plaintext = await auth.create_api_token(
            session,
            hasher,
            name=fields.get("name", ""),
            role=fields.get("role", Role.VIEWER.value),
            created_by=principal,
            expires_at=expiry_of(fields.get("expiresAt", "")),
        )
        plaintexts.append(plaintext)
        return token

    try:
        token: ApiToken = await apply_change(request, change, work)
    except InvalidInput as exc:
        return await _show_tokens(
            request, form=fields, errors=errors_by_field(exc.errors), status_code=422
        )
    # 200, not a redirect: the plaintext must not travel in a URL or a flash cookie.
    return await _show_tokens(request, created=(token, plaintexts[0]))


async def token_revoke_page(request: Request) -> Response:
    """The confirmation before a revoke."""
    refused = admins_only(request)
    if refused is not None:
        return refused
    token_id = path_id(request, "token_id")
    async with reading(request) as session:
        token = None if token_id is None else await session.get(ApiToken, token_id)
    if token is None:
        return not_found(request, "API token")
    return render_view(
        request,
        "token_revoke.html",
        "token_revoke.html",
        token=token,
        active=auth.token_is_active(token),
    )


async def token_revoke(request: Request) -> Response:
    """Revoke a token (revokeApiToken): its next request is refused."""
    token_id = path_id(request, "token_id")
    if token_id is None:
        return not_found(request, "API token")
    change = Change("revokeApiToken", ["id"], encode_id("ApiToken", token_id), "ApiToken")
    refused = await refuse_viewer(request, change)
    if refused is not None:
        return refused
    try:
        token: ApiToken = await apply_change(
            request, change, lambda session: auth.revoke_api_token(session, token_id)
        )
    except InvalidInput:
        return not_found(request, "API token")
    return redirect_with_flash(request, "/tokens", f"API token {token.name} revoked.")
