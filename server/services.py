"""Services (GitHub, OpenAI, ...): their shared token and profiles' own account tokens."""

from __future__ import annotations

from typing import Any

from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from server.broker import SCHEDULE_TOPIC
from server.errors import ErrorCode, InvalidInput, UserError
from server.known_secrets import mark_secrets_changed
from server.models import NAME_MAX, URL_MAX, ProfileService, Service
from server.policies import policy_field
from server.probes import reschedule
from server.profiles import delete_link, get_profile
from server.secretbox import SecretBox
from server.unit_of_work import announce
from server.validation import (
    FieldSpec,
    apply_fields,
    ensure_unique,
    env_var_field,
    json_object_field,
    text_field,
    url_field,
)

TOKEN_MAX = 8192
KIND_MAX = 64

SERVICE_FIELDS = [
    FieldSpec("name", "name", text_field(NAME_MAX, label="name"), required=True),
    FieldSpec("kind", "kind", text_field(KIND_MAX, label="kind")),
    FieldSpec("baseUrl", "base_url", url_field(URL_MAX)),
    FieldSpec("envVar", "env_var", env_var_field, required=True),
    FieldSpec("settings", "settings", json_object_field),
    FieldSpec("rateLimitPolicy", "rate_limit_policy", policy_field("rateLimitPolicy")),
]

LINK_POLICY = policy_field("rateLimitPolicy")


def check_token(value: Any, field: str = "token") -> str:
    """A token as given (inner whitespace or a control character is an error: neither is
    ever part of a real token)."""
    if not isinstance(value, str):
        raise InvalidInput.one(field, "token must be a string", ErrorCode.INVALID)
    token = value.strip()
    if not token:
        raise InvalidInput.one(
            field, "token cannot be blank (use null to remove it)", ErrorCode.BLANK
        )
    if len(token) > TOKEN_MAX:
        raise InvalidInput.one(field, f"token is longer than {TOKEN_MAX}", ErrorCode.TOO_LONG)
    if any(ch.isspace() for ch in token):
        raise InvalidInput.one(field, "token must not contain whitespace", ErrorCode.INVALID)
    if not token.isprintable():  # a NUL would crash every run given it (an env var's value)
        raise InvalidInput.one(
            field, "token must not contain control characters", ErrorCode.INVALID
        )
    return token


def _set_token(
    session: AsyncSession,
    target: Service | ProfileService,
    box: SecretBox,
    values: dict[str, Any],
) -> None:
    if "token" not in values:
        return
    raw = values["token"]
    mark_secrets_changed(session)
    target.token_encrypted = None if raw is None else box.encrypt(check_token(raw))


def _schedule_probes(session: AsyncSession, service: Service, values: dict[str, Any]) -> None:
    """A saved policy's scheduled probe is due at once (or never, without an interval);
    the runners' schedules are woken to take it."""
    if "rateLimitPolicy" not in values:
        return
    reschedule(service)
    if service.next_probe_at is not None:
        announce(session, SCHEDULE_TOPIC, None)


async def get_service(session: AsyncSession, service_id: int, *, field: str = "id") -> Service:
    """The service with this id, or a NOT_FOUND error on `field`."""
    service = await session.get(Service, service_id)
    if service is None:
        raise InvalidInput.one(field, "no such service", ErrorCode.NOT_FOUND)
    return service


async def create_service(session: AsyncSession, box: SecretBox, values: dict[str, Any]) -> Service:
    """Validate and add a service; its shared token (optional) is stored encrypted."""
    service = Service(kind="generic", settings={}, rate_limit_policy={})
    apply_fields(service, values, SERVICE_FIELDS, creating=True)
    _set_token(session, service, box, values)
    _schedule_probes(session, service, values)
    await ensure_unique(session, Service.name_key, service.name, field="name", label="service")
    session.add(service)
    await session.flush()
    return service


async def update_service(
    session: AsyncSession, box: SecretBox, service_id: int, values: dict[str, Any]
) -> Service:
    """Apply changes to a service; `token: null` removes the shared token."""
    service = await get_service(session, service_id)
    apply_fields(service, values, SERVICE_FIELDS, creating=False)
    _set_token(session, service, box, values)
    _schedule_probes(session, service, values)
    if "name" in values:
        await ensure_unique(
            session,
            Service.name_key,
            service.name,
            field="name",
            label="service",
            exclude_id=service.id,
        )
    await session.flush()
    return service


async def delete_service(session: AsyncSession, service_id: int) -> list[str]:
    """Delete a service, its profile links and usage history. Returns notices."""
    service = await get_service(session, service_id)
    links = await session.scalars(
        select(ProfileService.profile_id).where(ProfileService.service_id == service.id)
    )
    count = len(links.all())
    await session.execute(delete(Service).where(Service.id == service.id))
    notices = [f"service {service.name!r} deleted"]
    if count:
        notices.append(f"unlinked from {count} profile(s)")
    return notices


async def link_service(
    session: AsyncSession, box: SecretBox, profile_id: int, service_id: int, values: dict[str, Any]
) -> ProfileService:
    """Link a profile to a service (or update the link's own token and policy override when
    it exists); `rateLimitPolicy` overrides the service's policy key by key, null clears it."""
    profile = await get_profile(session, profile_id, field="profileId")
    service = await get_service(session, service_id, field="serviceId")
    link = await session.get(ProfileService, (profile.id, service.id))
    if link is None:
        link = ProfileService(profile_id=profile.id, service_id=service.id)
        session.add(link)
    _set_token(session, link, box, values)
    if "rateLimitPolicy" in values:
        raw = values["rateLimitPolicy"]
        link.rate_limit_policy = {} if raw is None else LINK_POLICY(raw)
    await session.flush()
    return link


async def unlink_service(session: AsyncSession, profile_id: int, service_id: int) -> None:
    """Remove a profile's link to a service (and the profile's own token with it)."""
    await get_profile(session, profile_id, field="profileId")
    await get_service(session, service_id, field="serviceId")
    missing = UserError(
        ("serviceId",), "the profile is not linked to this service", ErrorCode.NOT_FOUND
    )
    await delete_link(
        session, ProfileService, profile_id, ProfileService.service_id, service_id, missing
    )
