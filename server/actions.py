"""Actions: what a person does to Corral's objects, checked and recorded the same way
whoever asks (a panel route here, a GraphQL mutation through its schema extensions).

An action is refused to anyone but an admin (`refusal`, the one role rule: RoleGuard asks
it too); its work runs as one unit of work (what it announces is published after the
commit); and it is appended to the audit log (`server.audit`: the given field NAMES, never
their values) in a transaction of its own, whatever its outcome: ok, error or denied.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Iterable
from typing import Protocol, TypeVar

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from server.audit import FORBIDDEN, ok_entry, raised_entry, refused_entry, write_entry
from server.auth import Principal
from server.broker import Broker
from server.errors import InvalidInput
from server.ids import encode_global_id
from server.unit_of_work import unit_of_work

T = TypeVar("T")

# Actions a viewer may take: none (its own logout is `POST /logout`, not an action).
VIEWER_ACTIONS: frozenset[str] = frozenset()


class Forbidden(Exception):
    """The principal may not take the action; nothing was done."""

    code = FORBIDDEN


class ActionServices(Protocol):
    """What an action needs of the app (the GraphQL `AppServices` has both)."""

    sessionmaker: async_sessionmaker[AsyncSession]
    broker: Broker


def refusal(principal: Principal, action: str, what: str = "change anything") -> str | None:
    """Why `principal` may not take `action` (None when it may): viewers read only."""
    if principal.is_admin or action in VIEWER_ACTIONS:
        return None
    return f"forbidden: the {principal.role.value} role may not {what}: it reads only (admins only)"


async def perform(
    services: ActionServices,
    principal: Principal,
    action: str,
    work: Callable[[AsyncSession], Awaitable[T]],
    *,
    object_type: str,
    object_id: int | None = None,
    fields: Iterable[str] = (),
    client_address: str | None = None,
    error_codes: Callable[[T], list[str]] | None = None,
) -> T:
    """Take `action` as `principal`: refuse it (Forbidden) unless allowed, else run `work` as
    one unit of work and publish what it announced once committed; audit it either way.

    `object_id` is the primary key of the `object_type` row the action is about, if known
    before (the row `work` returns, when it has an `id`, names it after); `fields` are the
    NAMES of the fields the caller was given (as a mutation's audit names its input's).
    InvalidInput passes through (rolled back) for the caller to show. `error_codes` reads
    the user errors a committed result still carries (an import's bad links): the action is
    then audited as an error with those codes, as GraphQL audits a payload's userErrors.
    """
    given = list(fields)
    asked = None if object_id is None else encode_global_id(object_type, object_id)
    message = refusal(principal, action)
    if message is not None:
        denied = raised_entry(action, FORBIDDEN, asked, given)
        await write_entry(services.sessionmaker, principal, denied, client_address)
        raise Forbidden(message)
    try:
        async with services.sessionmaker() as session, unit_of_work(session, services.broker):
            result = await work(session)
    except InvalidInput as exc:
        codes = [error.code.value for error in exc.errors]
        entry = refused_entry(action, codes, asked, given)
        await asyncio.shield(write_entry(services.sessionmaker, principal, entry, client_address))
        raise
    except BaseException as exc:  # cancelled (it may have committed), or unexpected
        code = "CANCELLED" if isinstance(exc, asyncio.CancelledError) else None
        entry = raised_entry(action, code, asked, given)
        await asyncio.shield(write_entry(services.sessionmaker, principal, entry, client_address))
        raise
    done = _object_id(object_type, result) or asked
    codes = [] if error_codes is None else error_codes(result)
    entry = refused_entry(action, codes, done, given) if codes else ok_entry(action, done, given)
    await asyncio.shield(write_entry(services.sessionmaker, principal, entry, client_address))
    return result


def _object_id(object_type: str, result: object) -> str | None:
    """The global ID of the row an action returned, if it returned one."""
    pk = getattr(result, "id", None)
    return encode_global_id(object_type, pk) if isinstance(pk, int) else None
