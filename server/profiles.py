"""Profiles: a Chrome user-data-dir with its browser settings, services and proxies."""

from __future__ import annotations

import asyncio
import functools
import os
import re
import shutil
import zoneinfo
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from sqlalchemy import Select, delete, false, func, select
from sqlalchemy.ext.asyncio import AsyncSession

from server.errors import ErrorCode, InvalidInput, UserError
from server.models import NAME_MAX, PATH_MAX, Command, CommandStatus, Profile, name_key
from server.runners import LABEL_PREFIX
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


# Browser settings are checked when saved, not when Chromium refuses them at launch
# (issue 12, item 2).
USER_AGENT_MAX = 512
LOCALE_MAX = 35
# A BCP 47 language tag as Chromium's --lang and Playwright's `locale` take it: language,
# optional script, region and variants (`en`, `en-US`, `zh-Hant-TW`, `de-CH-1996`).
LOCALE_RE = re.compile(
    r"^[A-Za-z]{2,3}(-[A-Za-z]{4})?(-(?:[A-Za-z]{2}|[0-9]{3}))?"
    r"(-(?:[A-Za-z0-9]{5,8}|[0-9][A-Za-z0-9]{3}))*$"
)
TIMEZONE_KEY_RE = re.compile(r"^[A-Za-z0-9_+\-]+(/[A-Za-z0-9_+\-]+)*$")


@functools.cache
def _known_timezones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())


def is_known_timezone(name: str) -> bool:
    """True for an IANA time zone name this host knows (any well-formed name on a host
    without a tz database)."""
    known = _known_timezones()
    return bool(TIMEZONE_KEY_RE.match(name)) and (not known or name in known | {"UTC"})


def _timezone(value: Any) -> str | None:
    name: str | None = text_field(64, blank_ok=True, label="timezone")(value)
    if name is None:
        return None
    if not is_known_timezone(name):
        raise FieldInvalid(
            f"timezone {name!r} is not an IANA time zone (e.g. Europe/Berlin, America/New_York, "
            "UTC)"
        )
    return name


def _locale(value: Any) -> str | None:
    tag: str | None = text_field(LOCALE_MAX, blank_ok=True, label="locale")(value)
    if tag is None:
        return None
    if not LOCALE_RE.match(tag):
        hint = f" (did you mean {tag.replace('_', '-')!r}?)" if "_" in tag else ""
        raise FieldInvalid(f"locale {tag!r} is not a BCP 47 language tag like en-US{hint}")
    return tag


def _runner_affinity(value: Any) -> str | None:
    affinity: str | None = text_field(NAME_MAX, blank_ok=True, label="runner")(value)
    if affinity is not None and not affinity.removeprefix(LABEL_PREFIX).strip():
        raise FieldInvalid(
            f"runner {affinity!r} names no label: a runner's name (e.g. box-1), or "
            f"{LABEL_PREFIX}<label> (e.g. {LABEL_PREFIX}gpu)"
        )
    return affinity


def _user_agent(value: Any) -> str | None:
    agent: str | None = text_field(USER_AGENT_MAX, blank_ok=True, label="userAgent")(value)
    if agent is not None and not all(" " <= char <= "~" for char in agent):
        raise FieldInvalid("userAgent must be printable ASCII (it is sent as an HTTP header)")
    return agent


PROFILE_FIELDS = [
    FieldSpec("name", "name", text_field(NAME_MAX, label="name"), required=True),
    FieldSpec("userDataDir", "user_data_dir", _user_data_dir),
    FieldSpec("userAgent", "user_agent", _user_agent),
    FieldSpec("locale", "locale", _locale),
    FieldSpec("timezone", "timezone", _timezone),
    FieldSpec("viewportWidth", "viewport_width", int_field(200, 10_000, label="viewportWidth")),
    FieldSpec("viewportHeight", "viewport_height", int_field(200, 10_000, label="viewportHeight")),
    FieldSpec("headless", "headless", bool_field),
    FieldSpec("tags", "tags", tags_field),
    FieldSpec("notes", "notes", text_field(TEXT_MAX, blank_ok=True, label="notes")),
    FieldSpec("runnerAffinity", "runner_affinity", _runner_affinity),
]


class ProfileLocation(Protocol):
    """What `user_data_dir` reads of a profile: a row, or a page's plain record of one."""

    @property
    def id(self) -> int: ...

    @property
    def user_data_dir(self) -> str | None: ...


def user_data_dir(profile: ProfileLocation, settings: Settings) -> str:
    """The profile's user-data-dir: its own, else `<data_dir>/profiles/<id>`."""
    return profile.user_data_dir or str(settings.profiles_dir / str(profile.id))


async def get_profile(session: AsyncSession, profile_id: int, *, field: str = "id") -> Profile:
    """The profile with this id, or a NOT_FOUND error on `field`."""
    profile = await session.get(Profile, profile_id)
    if profile is None:
        raise InvalidInput.one(field, "no such profile", ErrorCode.NOT_FOUND)
    return profile


async def delete_link(
    session: AsyncSession, link: Any, profile_id: int, other: Any, other_id: int, missing: UserError
) -> None:
    """Delete the row of a profile's link table (`link`: ProfileService, ProfileProxy) joining
    the profile to `other_id` in column `other`; `missing` when there was none. The one copy
    that unlinkService and detachProxy share (issue 15, item 5)."""
    result = await session.execute(
        delete(link).where(link.profile_id == profile_id, other == other_id)
    )
    if not getattr(result, "rowcount", 0):
        raise InvalidInput([missing])


def check_user_data_dir(profile: Profile, settings: Settings | None) -> None:
    """A profile's own user-data-dir may not open up Corral's files or the system to its
    commands (server/storage.py: profile_dir_problem)."""
    if settings is None or not profile.user_data_dir:
        return
    problem = profile_dir_problem(profile.user_data_dir, settings)
    if problem is not None:
        raise InvalidInput.one("userDataDir", problem, ErrorCode.INVALID)


def _real(path: str) -> Path:
    return Path(os.path.realpath(os.path.normpath(path)))


async def ensure_own_user_data_dir(session: AsyncSession, profile: Profile) -> None:
    """Two profiles cannot share a user-data-dir, nor hold one inside the other: Chromium
    locks the directory, so their runs would fail (issue 12, item 5). Paths are compared
    normalised and with symlinks resolved. Default dirs live in the workspace, where an
    own dir may not be (check_user_data_dir), so only own dirs are compared."""
    if not profile.user_data_dir:
        return
    mine = _real(profile.user_data_dir)
    stmt = select(Profile.name, Profile.user_data_dir).where(Profile.user_data_dir.is_not(None))
    if profile.id is not None:
        stmt = stmt.where(Profile.id != profile.id)
    with session.no_autoflush:
        rows = (await session.execute(stmt)).all()
    for name, path in rows:
        theirs = _real(path or "/")
        if theirs == mine:
            problem = f"profile {name!r} already uses this user-data-dir ({theirs})"
        elif theirs in mine.parents or mine in theirs.parents:
            problem = f"this user-data-dir and profile {name!r}'s ({theirs}) are nested"
        else:
            continue
        raise InvalidInput.one("userDataDir", problem, ErrorCode.TAKEN)


def _refuse_unknown_keys(values: dict[str, Any]) -> None:
    known = {spec.api_name for spec in PROFILE_FIELDS}
    unknown = sorted(key for key in values if key not in known)
    if unknown:
        raise InvalidInput(
            [
                UserError((key,), f"unknown profile setting {key!r}", ErrorCode.INVALID)
                for key in unknown
            ]
        )


async def create_profile(
    session: AsyncSession, values: dict[str, Any], settings: Settings | None = None
) -> Profile:
    """Validate and add a profile."""
    _refuse_unknown_keys(values)
    profile = Profile(tags=[], headless=True)
    apply_fields(profile, values, PROFILE_FIELDS, creating=True)
    check_user_data_dir(profile, settings)
    await ensure_own_user_data_dir(session, profile)
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
    _refuse_unknown_keys(values)
    profile = await get_profile(session, profile_id)
    apply_fields(profile, values, PROFILE_FIELDS, creating=False)
    if "userDataDir" in values:
        check_user_data_dir(profile, settings)
        await ensure_own_user_data_dir(session, profile)
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


@dataclass
class ProfileDeletion:
    """A deleted profile's notices, and the browser data to remove once that is committed."""

    notices: list[str]
    data_dir: Path | None = None


async def delete_profile_and_data(
    session: AsyncSession, profile_id: int, settings: Settings, *, delete_data: bool
) -> ProfileDeletion:
    """Delete a profile and say what becomes of its browser data (cookies, sessions on
    disk): with `delete_data`, Corral's own default dir in the workspace is removed after
    the commit (remove_profile_data); a dir the admin chose is never removed, only named."""
    profile = await get_profile(session, profile_id)
    path = Path(user_data_dir(profile, settings))
    ours = profile.user_data_dir is None
    if delete_data and ours:
        await _ensure_not_running(session, profile)
    notices = await delete_profile(session, profile_id)
    if not delete_data:
        notices.append(
            f"its browser data at {path} is kept (deleteData: true removes Corral's own copy)"
        )
        return ProfileDeletion(notices)
    if not ours:
        notices.append(
            f"its browser data at {path} is kept: the directory was chosen by an admin, outside "
            "Corral's workspace, so Corral does not remove it"
        )
        return ProfileDeletion(notices)
    return ProfileDeletion(notices, path)


async def _ensure_not_running(session: AsyncSession, profile: Profile) -> None:
    running = await session.scalar(
        select(func.count())
        .select_from(Command)
        .where(Command.profile_id == profile.id, Command.status == CommandStatus.RUNNING)
    )
    if running:
        raise InvalidInput.one(
            "deleteData",
            f"profile {profile.name!r} has a running command using its browser data; cancel it "
            "first",
            ErrorCode.IN_USE,
        )


async def remove_profile_data(deletion: ProfileDeletion, settings: Settings) -> list[str]:
    """Remove a deleted profile's own dir (after the commit); the notices say what happened."""
    if deletion.data_dir is None:
        return deletion.notices
    outcome = await asyncio.to_thread(_remove_own_dir, deletion.data_dir, settings.profiles_dir)
    return [*deletion.notices, outcome]


def _remove_own_dir(path: Path, profiles_dir: Path) -> str:
    root = Path(os.path.realpath(profiles_dir))
    if path.is_symlink() or Path(os.path.realpath(path)).parent != root:
        return f"its browser data at {path} is kept: not a directory of Corral's workspace"
    if not path.exists():
        return f"it had no browser data on this host ({path})"
    try:
        shutil.rmtree(path)
    except OSError as exc:
        return f"its browser data at {path} could not be removed: {exc.strerror or exc}"
    return f"its browser data at {path} was removed"


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
