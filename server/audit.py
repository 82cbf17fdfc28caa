"""The audit log: every mutation and login, appended (who, through what, what, on which
object, when, outcome, from where). Never a secret's value: callers pass names and ids."""

from __future__ import annotations

import dataclasses
import logging
from typing import Any, Literal

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from runner.store_errors import database_unreachable
from server.auth import Principal
from server.ids import decode_global_id
from server.models import AuditEvent

log = logging.getLogger("corral.audit")

Outcome = Literal["ok", "error", "denied"]


async def record_event(
    session: AsyncSession,
    *,
    principal: Principal | None,
    action: str,
    outcome: Outcome,
    object_type: str | None = None,
    object_id: str | None = None,
    detail: dict[str, Any] | None = None,
    client_address: str | None = None,
    actor: str | None = None,
) -> AuditEvent:
    """Append one audit event (flushed; the caller commits). `actor` names who tried when
    there is no principal (a failed login's user name)."""
    event = AuditEvent(
        actor=actor if principal is None else principal.name,
        actor_kind="anonymous" if principal is None else principal.kind,
        token_id=None if principal is None else principal.token_id,
        session_id=None if principal is None else principal.session_id,
        action=action[:64],
        object_type=object_type,
        object_id=None if object_id is None else object_id[:64],
        outcome=outcome,
        detail=detail,
        client_address=None if client_address is None else client_address[:64],
    )
    session.add(event)
    await session.flush()
    return event


# --- one event per action, whoever calls (a GraphQL mutation, a panel route) ------------

FORBIDDEN = "FORBIDDEN"


@dataclasses.dataclass
class AuditEntry:
    """What one action did, as the audit log records it: the given field NAMES (never their
    values), the object's global ID, and the error codes it ended with."""

    action: str
    outcome: Outcome
    object_id: str | None
    detail: dict[str, Any]


def ok_entry(action: str, object_id: str | None, fields: list[str]) -> AuditEntry:
    """An action that did what it was asked."""
    return AuditEntry(action, "ok", object_id, {"fields": fields})


def refused_entry(
    action: str, codes: list[str], object_id: str | None, fields: list[str]
) -> AuditEntry:
    """An action that ended with user errors (denied when one of them is FORBIDDEN)."""
    outcome: Outcome = "denied" if FORBIDDEN in codes else "error"
    return AuditEntry(action, outcome, object_id, {"fields": fields, "userErrors": codes})


def raised_entry(
    action: str, code: str | None, object_id: str | None, fields: list[str]
) -> AuditEntry:
    """An action that raised: refused (FORBIDDEN: denied), cancelled, or unexpected."""
    outcome: Outcome = "denied" if code == FORBIDDEN else "error"
    return AuditEntry(action, outcome, object_id, {"fields": fields, "error": code or "ERROR"})


async def write_entry(
    sessions: async_sessionmaker[AsyncSession],
    principal: Principal | None,
    entry: AuditEntry,
    client_address: str | None = None,
) -> None:
    """Append the entry in a transaction of its own, after the action's: a rolled-back
    action is on record too. A failure is logged, never raised."""
    decoded = None if entry.object_id is None else decode_global_id(entry.object_id)
    try:
        async with sessions() as session:
            await record_event(
                session,
                principal=principal,
                action=entry.action,
                outcome=entry.outcome,
                object_type=None if decoded is None else decoded[0],
                object_id=entry.object_id,
                detail=entry.detail,
                client_address=client_address,
            )
            await session.commit()
    except Exception as exc:
        # The row holds names and ids only, so the exception's text may be logged as is. An
        # action that failed as the database went away left nothing to audit: one line, no
        # traceback (an outage logged one per request). One that took effect stays an ERROR.
        away = database_unreachable(exc) and entry.outcome != "ok"
        log.log(
            logging.WARNING if away else logging.ERROR,
            "could not record the audit event %s (%s) by %s on %s%s",
            entry.action,
            entry.outcome,
            None if principal is None else principal.name,
            entry.object_id,
            f": the database is unreachable ({type(exc).__name__})" if away else "",
            exc_info=not away,
        )
