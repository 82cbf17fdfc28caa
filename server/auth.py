"""Who is asking: admins' passwords (argon2id), panel sessions, API tokens (`crl_...`), roles.

Domain functions take an `AsyncSession` and `flush()`; the caller commits. Nothing here
logs or returns a password, a token or a session id in clear (only their previews).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Literal

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError
from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from server.errors import ErrorCode, InvalidInput
from server.models import NAME_MAX, ApiToken, Meta, Role, User, UserSession, utcnow
from server.secretbox import SecretBox

TOKEN_PREFIX = "crl_"  # noqa: S105 - a prefix, not a secret
API_TOKEN_KEY = "api_token_key"  # noqa: S105 - corral_meta: the tokens' HMAC key, encrypted
PASSWORD_MIN = 8
PASSWORD_MAX = 1024  # argon2 hashes any length; a megabyte "password" only costs CPU
# last_used_at / last_seen_at are written at most this often (not on every request).
TOUCH_EVERY = timedelta(seconds=60)

_hasher = PasswordHasher()  # argon2id with the library's (RFC 9106 low-memory) parameters
# Checked against when the user does not exist, so a wrong name costs as long as a wrong
# password (no user enumeration by timing).
_DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


def set_password_cost(*, time_cost: int, memory_kib: int, parallelism: int) -> None:
    """Hash new passwords (and the dummy) with these argon2id parameters instead. For the
    test suite, whose hundreds of logins would otherwise spend minutes of CPU on purpose;
    Corral itself never calls it. Existing hashes verify either way (they carry theirs)."""
    global _hasher, _DUMMY_HASH
    _hasher = PasswordHasher(time_cost=time_cost, memory_cost=memory_kib, parallelism=parallelism)
    _DUMMY_HASH = _hasher.hash(secrets.token_urlsafe(16))


PrincipalKind = Literal["user", "token", "cli", "system"]


@dataclass(frozen=True)
class Principal:
    """Who a request acts as, and through what (a session or an API token)."""

    kind: PrincipalKind
    name: str
    role: Role
    user_id: int | None = None
    token_id: int | None = None
    session_id: int | None = None
    csrf_token: str | None = None

    @property
    def is_admin(self) -> bool:
        return self.role is Role.ADMIN


CLI = Principal(kind="cli", name="cli", role=Role.ADMIN)


# --- passwords -------------------------------------------------------------------------


def hash_password(password: str) -> str:
    """An argon2id hash of `password`."""
    return _hasher.hash(password)


def verify_password(password_hash: str | None, password: str) -> bool:
    """Whether `password` matches; with no hash, the same work is done and False returned."""
    try:
        return _hasher.verify(password_hash or _DUMMY_HASH, password) and password_hash is not None
    except (VerificationError, InvalidHashError):
        return False


def check_password(password: str) -> str:
    """The password if acceptable, else InvalidInput on `password`."""
    if len(password) < PASSWORD_MIN:
        raise InvalidInput.one(
            "password", f"must be at least {PASSWORD_MIN} characters.", ErrorCode.INVALID
        )
    if len(password) > PASSWORD_MAX:
        raise InvalidInput.one(
            "password", f"must be at most {PASSWORD_MAX} characters.", ErrorCode.TOO_LONG
        )
    return password


def check_user_name(name: str) -> str:
    """A user name: 1 to NAME_MAX printable characters, no spaces at either end."""
    cleaned = name.strip()
    if not cleaned:
        raise InvalidInput.one("name", "must not be blank.", ErrorCode.BLANK)
    if len(cleaned) > NAME_MAX:
        raise InvalidInput.one(
            "name", f"must be at most {NAME_MAX} characters.", ErrorCode.TOO_LONG
        )
    if not cleaned.isprintable():
        raise InvalidInput.one("name", "must hold printable characters only.", ErrorCode.INVALID)
    return cleaned


def check_role(role: str) -> Role:
    """`admin` or `viewer`, else InvalidInput on `role`."""
    try:
        return Role(role.strip().lower())
    except ValueError:
        raise InvalidInput.one("role", "must be admin or viewer.", ErrorCode.INVALID) from None


# --- users -----------------------------------------------------------------------------


async def find_user(session: AsyncSession, name: str) -> User | None:
    """The user called `name`, or None."""
    return await session.scalar(select(User).where(User.name == name.strip()))


async def create_user(
    session: AsyncSession, name: str, password: str, role: str | Role = Role.ADMIN
) -> User:
    """Add a user with an argon2id hash of `password`."""
    name = check_user_name(name)
    user_role = check_role(str(role))
    check_password(password)
    if await find_user(session, name) is not None:
        raise InvalidInput.one("name", f"a user {name!r} exists already.", ErrorCode.TAKEN)
    user = User(name=name, password_hash=hash_password(password), role=user_role)
    session.add(user)
    await session.flush()
    return user


async def set_password(session: AsyncSession, name: str, password: str) -> User:
    """Change a user's password and end every session of theirs."""
    user = await find_user(session, name)
    if user is None:
        raise InvalidInput.one("name", f"no user {name!r}.", ErrorCode.NOT_FOUND)
    check_password(password)
    user.password_hash = hash_password(password)
    await session.execute(delete(UserSession).where(UserSession.user_id == user.id))
    await session.flush()
    return user


async def delete_user(session: AsyncSession, name: str) -> User:
    """Remove a user: their sessions end and the API tokens they made are revoked (a token
    is their access too: one made with an admin session kept a deleted admin in); the last
    admin stays, or nobody could administer Corral."""
    user = await find_user(session, name)
    if user is None:
        raise InvalidInput.one("name", f"no user {name!r}.", ErrorCode.NOT_FOUND)
    if user.role is Role.ADMIN and await count_admins(session) <= 1:
        raise InvalidInput.one(
            "name",
            f"{user.name!r} is the last admin: make another admin first.",
            ErrorCode.IN_USE,
        )
    await session.execute(delete(UserSession).where(UserSession.user_id == user.id))
    await session.execute(
        update(ApiToken)
        .where(ApiToken.user_id == user.id, ApiToken.revoked_at.is_(None))
        .values(revoked_at=utcnow())
    )
    await session.delete(user)
    await session.flush()
    return user


async def list_users(session: AsyncSession) -> list[User]:
    """Every user, by name."""
    return list(await session.scalars(select(User).order_by(User.name)))


async def has_users(session: AsyncSession) -> bool:
    """Whether any user exists (none on a new installation)."""
    return await session.scalar(select(User.id).limit(1)) is not None


async def count_admins(session: AsyncSession) -> int:
    """How many users have the admin role."""
    return len(list(await session.scalars(select(User.id).where(User.role == Role.ADMIN))))


async def check_login(session: AsyncSession, name: str, password: str) -> User | None:
    """The user if `password` is theirs (rehashing an outdated hash), else None; as slow
    for an unknown name as for a wrong password."""
    # A name no user can have (too long; a NUL, which PostgreSQL text refuses) is not looked up.
    plausible = len(name) <= NAME_MAX and name.isprintable()
    user = await find_user(session, name) if plausible else None
    # argon2 takes tens of milliseconds of CPU on purpose: not on the event loop.
    stored = None if user is None else user.password_hash
    if not await asyncio.to_thread(verify_password, stored, password[:PASSWORD_MAX]):
        return None
    assert user is not None
    if _hasher.check_needs_rehash(user.password_hash):
        user.password_hash = await asyncio.to_thread(hash_password, password)
    user.last_login_at = utcnow()
    await session.flush()
    return user


# --- API tokens ------------------------------------------------------------------------


class TokenHasher:
    """HMAC-SHA256 under this installation's token key: a database dump alone cannot be
    checked against guesses. (Tokens hold 256 random bits: a fast hash is enough.)"""

    def __init__(self, key: bytes) -> None:
        self._key = key

    def digest(self, plaintext: str) -> str:
        return hmac.new(self._key, plaintext.encode(), hashlib.sha256).hexdigest()

    def derive(self, purpose: str) -> bytes:
        """A key for another purpose (the session cookies' signature), from the same one."""
        return hmac.new(self._key, purpose.encode(), hashlib.sha256).digest()


async def load_token_hasher(session: AsyncSession, box: SecretBox) -> TokenHasher:
    """The installation's token key (made, encrypted, on first use)."""
    stored = await session.scalar(select(Meta.value).where(Meta.key == API_TOKEN_KEY))
    if stored is None:
        key = secrets.token_bytes(32)
        session.add(Meta(key=API_TOKEN_KEY, value=box.encrypt(key.hex()).decode()))
        await session.flush()
        return TokenHasher(key)
    return TokenHasher(bytes.fromhex(box.decrypt(stored.encode())))


def looks_like_api_token(text: str) -> bool:
    return text.startswith(TOKEN_PREFIX) and 16 < len(text) < 200


async def create_api_token(
    session: AsyncSession,
    hasher: TokenHasher,
    *,
    name: str,
    role: str | Role = Role.VIEWER,
    created_by: Principal | None = None,
    expires_at: datetime | None = None,
) -> tuple[ApiToken, str]:
    """A new token and its plaintext (shown once; only its keyed hash is kept)."""
    name = check_user_name(name)
    token_role = check_role(str(role))
    if created_by is not None and token_role is Role.ADMIN and not created_by.is_admin:
        raise InvalidInput.one("role", "a viewer cannot make an admin token.", ErrorCode.FORBIDDEN)
    if expires_at is not None and expires_at.tzinfo is None:
        expires_at = expires_at.replace(tzinfo=UTC)  # a time without a zone is taken as UTC
    if expires_at is not None and expires_at <= utcnow():
        raise InvalidInput.one("expiresAt", "must be in the future.", ErrorCode.OUT_OF_RANGE)
    plaintext = TOKEN_PREFIX + secrets.token_urlsafe(32)
    token = ApiToken(
        name=name,
        role=token_role,
        token_hash=hasher.digest(plaintext),
        preview=f"{plaintext[:8]}…{plaintext[-4:]}",
        created_by=None if created_by is None else created_by.name,
        user_id=None if created_by is None else created_by.user_id,
        expires_at=expires_at,
    )
    session.add(token)
    await session.flush()
    return token, plaintext


def token_is_active(token: ApiToken, now: datetime | None = None) -> bool:
    """Whether the token still authenticates (not revoked, not expired)."""
    now = now or utcnow()
    return token.revoked_at is None and (token.expires_at is None or token.expires_at > now)


async def list_api_tokens(session: AsyncSession) -> list[ApiToken]:
    """Every API token (revoked and expired ones too), oldest first."""
    return list(await session.scalars(select(ApiToken).order_by(ApiToken.id)))


async def revoke_api_token(session: AsyncSession, token_id: int) -> ApiToken:
    """Mark a token revoked (kept for the audit trail); revoking twice is a no-op."""
    token = await session.get(ApiToken, token_id)
    if token is None:
        raise InvalidInput.one("id", "no such API token.", ErrorCode.NOT_FOUND)
    if token.revoked_at is None:
        token.revoked_at = utcnow()
        await session.flush()
    return token


async def find_live_token(
    session: AsyncSession, hasher: TokenHasher, plaintext: str
) -> ApiToken | None:
    """The live (not revoked, not expired) token with this plaintext, else None; reads only."""
    if not looks_like_api_token(plaintext):
        return None
    token = await session.scalar(
        select(ApiToken).where(ApiToken.token_hash == hasher.digest(plaintext))
    )
    return token if token is not None and token_is_active(token, utcnow()) else None


def needs_touch(last: datetime | None) -> bool:
    """Whether a last-used time is old enough to be written again (at most once a minute)."""
    return last is None or utcnow() - last >= TOUCH_EVERY


async def touch_api_token(session: AsyncSession, token_id: int) -> None:
    """Record that a token was used now."""
    await session.execute(
        update(ApiToken).where(ApiToken.id == token_id).values(last_used_at=utcnow())
    )


def token_principal(token: ApiToken) -> Principal:
    """Who a request with this API token acts as."""
    return Principal(
        kind="token",
        name=token.created_by or token.name,
        role=Role(token.role),
        user_id=token.user_id,
        token_id=token.id,
    )


# --- panel sessions --------------------------------------------------------------------


@dataclass(frozen=True)
class SessionPolicy:
    idle: timedelta
    absolute: timedelta


async def start_session(
    session: AsyncSession, hasher: TokenHasher, user: User, client_address: str | None
) -> tuple[UserSession, str]:
    """A new login session for `user` and the id its cookie carries (a new one at every
    login: a session id planted before the login is worthless after it)."""
    raw_id = secrets.token_urlsafe(32)
    row = UserSession(
        id_hash=hasher.digest(raw_id),
        user_id=user.id,
        csrf_token=secrets.token_urlsafe(32),
        client_address=client_address,
    )
    session.add(row)
    await session.flush()
    return row, raw_id


@dataclass(frozen=True)
class FoundSession:
    """A login session looked up by its id: live (with its user) or expired."""

    row: UserSession
    user: User | None
    expired: bool


async def find_session(
    session: AsyncSession, hasher: TokenHasher, raw_id: str, policy: SessionPolicy
) -> FoundSession | None:
    """The login session with this id, live or expired, or None; reads only."""
    if not 20 < len(raw_id) < 100:
        return None
    row = await session.scalar(
        select(UserSession).where(UserSession.id_hash == hasher.digest(raw_id))
    )
    if row is None:
        return None
    now = utcnow()
    if now - row.last_seen_at > policy.idle or now - row.created_at > policy.absolute:
        return FoundSession(row, None, expired=True)
    return FoundSession(row, await session.get(User, row.user_id), expired=False)


async def touch_session(session: AsyncSession, session_id: int) -> None:
    """Record that a login session was used now (its idle time starts again)."""
    await session.execute(
        update(UserSession).where(UserSession.id == session_id).values(last_seen_at=utcnow())
    )


def session_principal(user: User, row: UserSession) -> Principal:
    """Who a request with this login session acts as."""
    return Principal(
        kind="user",
        name=user.name,
        role=Role(user.role),
        user_id=user.id,
        session_id=row.id,
        csrf_token=row.csrf_token,
    )


async def end_session(session: AsyncSession, session_id: int) -> None:
    """Log a session out."""
    await session.execute(delete(UserSession).where(UserSession.id == session_id))
    await session.flush()
