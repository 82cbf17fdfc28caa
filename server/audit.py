"""The audit log: every mutation and login, appended (who, through what, what, on which
object, when, outcome, from where). Never a secret's value: callers pass names and ids."""

from __future__ import annotations

from typing import Any, Literal

from sqlalchemy.ext.asyncio import AsyncSession

from server.auth import Principal
from server.models import AuditEvent

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
