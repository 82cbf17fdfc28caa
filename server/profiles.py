"""Profiles: a Chrome user-data-dir with its browser settings, services and proxies."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from sqlalchemy import Select, delete, false, select
from sqlalchemy.ext.asyncio import AsyncSession

from server.errors import ErrorCode, InvalidInput
from server.models import NAME_MAX, PATH_MAX, Profile, name_key
from server.settings import Settings
from server.storage import profile_dir_problem
from server.validation import (
    TEXT_MAX,
    FieldInvalid,
    FieldSpec,
    apply_fields,
    bool_field,
    clean_text,
    ensure_unique,
    int_field,
    tags_field,
    text_field,
)


def _user_data_dir(value: Any) -> str | None:
    if isinstance(value, str) and not value.strip():
        return None
    path = clean_text(value, PATH_MAX, "userDataDir")
    if not Path(path).is_absolute():
        raise FieldInvalid("userDataDir must be an absolute path")
    return path


PROFILE_FIELDS = [
    FieldSpec("name", "name", text_field(NAME_MAX, label="name"), required=True),
    FieldSpec("userDataDir", "user_data_dir", _user_data_dir),
    FieldSpec("userAgent", "user_agent", text_field(1024, blank_ok=True, label="userAgent")),
    FieldSpec("locale", "locale", text_field(35, blank_ok=True, label="locale")),
    FieldSpec("timezone", "timezone", text_field(64, blank_ok=True, label="timezone")),
    FieldSpec("viewportWidth", "viewport_width", int_field(200, 10_000, label="viewportWidth")),
    FieldSpec("viewportHeight", "viewport_height", int_field(200, 10_000, label="viewportHeight")),
    FieldSpec("headless", "headless", bool_field),
    FieldSpec("tags", "tags", tags_field),
    FieldSpec("notes", "notes", text_field(TEXT_MAX, blank_ok=True, label="notes")),
    FieldSpec(
        "runnerAffinity", "runner_affinity", text_field(NAME_MAX, blank_ok=True, label="runner")
    ),
]


def user_data_dir(profile: Profile, settings: Settings) -> str:
    """The profile's user-data-dir: its own, else `<data_dir>/profiles/<id>`."""
    return profile.user_data_dir or str(settings.profiles_dir / str(profile.id))


async def get_profile(session: AsyncSession, profile_id: int, *, field: str = "id") -> Profile:
    """The profile with this id, or a NOT_FOUND error on `field`."""
    profile = await session.get(Profile, profile_id)
    if profile is None:
        raise InvalidInput.one(field, "no such profile", ErrorCode.NOT_FOUND)
    return profile


def check_user_data_dir(profile: Profile, settings: Settings | None) -> None:
    """A profile's own user-data-dir may not open up Corral's files or the system to its
    commands (server/storage.py: profile_dir_problem)."""
    if settings is None or not profile.user_data_dir:
        return
    problem = profile_dir_problem(profile.user_data_dir, settings)
    if problem is not None:
        raise InvalidInput.one("userDataDir", problem, ErrorCode.INVALID)


async def create_profile(
    session: AsyncSession, values: dict[str, Any], settings: Settings | None = None
) -> Profile:
    """Validate and add a profile."""
    profile = Profile(tags=[], headless=True)
    apply_fields(profile, values, PROFILE_FIELDS, creating=True)
    check_user_data_dir(profile, settings)
    await ensure_unique(session, Profile.name_key, profile.name, field="name", label="profile")
    session.add(profile)
    await session.flush()
    return profile


async def update_profile(
    session: AsyncSession,
    profile_id: int,
    values: dict[str, Any],
    settings: Settings | None = None,
) -> Profile:
    """Validate and apply changes to a profile; absent keys stay as they are."""
    profile = await get_profile(session, profile_id)
    apply_fields(profile, values, PROFILE_FIELDS, creating=False)
    if "userDataDir" in values:
        check_user_data_dir(profile, settings)
    if "name" in values:
        await ensure_unique(
            session,
            Profile.name_key,
            profile.name,
            field="name",
            label="profile",
            exclude_id=profile.id,
        )
    await session.flush()
    return profile


async def delete_profile(session: AsyncSession, profile_id: int) -> list[str]:
    """Delete a profile; its links go, its commands stay (profile name kept). Returns notices."""
    profile = await get_profile(session, profile_id)
    await session.execute(delete(Profile).where(Profile.id == profile.id))
    return [f"profile {profile.name!r} deleted; its command history is kept"]


def name_search(stmt: Select[tuple[Profile]], search: str | None) -> Select[tuple[Profile]]:
    """`stmt` narrowed to profiles whose name contains `search` (case-insensitive)."""
    if search and "\x00" in search:  # no name can contain NUL (and PostgreSQL rejects it)
        return stmt.where(false())
    if search:
        pattern = f"%{_escape_like(name_key(search))}%"
        return stmt.where(Profile.name_key.like(pattern, escape="\\"))
    return stmt


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


async def profiles_by_ids(session: AsyncSession, ids: list[int]) -> dict[int, Profile]:
    """Profiles keyed by id (missing ids absent)."""
    rows = await session.scalars(select(Profile).where(Profile.id.in_(ids)))
    return {row.id: row for row in rows}
