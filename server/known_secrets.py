"""Every secret Corral holds, for the redactor that masks them in every command's output.

A command is untrusted code: whatever it manages to read (another service's token, a
proxy's password, Corral's own key), it must not get into a stored or streamed line.
The runner keeps a redactor of all of them; the domain services that write a secret mark
their unit of work (`mark_secrets_changed`), and the handler announces it once committed.
"""

from __future__ import annotations

import json

from sqlalchemy import select, union_all
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncSession

from server.models import ProfileService, Proxy, Service
from server.secretbox import SecretBox
from server.settings import Settings

SECRETS_CHANGED = "corral.secrets_changed"  # a key of `AsyncSession.info`
TOKEN = "token"  # noqa: S105 - a kind of stored secret, not one
CREDENTIALS = "credentials"


def mark_secrets_changed(session: AsyncSession) -> None:
    """Note that this unit of work writes a secret (announced after its commit)."""
    session.info[SECRETS_CHANGED] = True


def take_secrets_changed(session: AsyncSession) -> bool:
    """Whether the unit of work just committed wrote a secret (and forget it)."""
    return bool(session.info.pop(SECRETS_CHANGED, False))


async def stored_ciphertexts(session: AsyncSession) -> list[tuple[str, bytes]]:
    """Every encrypted secret in the database, with its kind (TOKEN or CREDENTIALS)."""
    query = union_all(
        select(Service.token_encrypted.label("c")).where(Service.token_encrypted.is_not(None)),
        select(ProfileService.token_encrypted).where(ProfileService.token_encrypted.is_not(None)),
    )
    tokens = await session.scalars(query)
    credentials = await session.scalars(
        select(Proxy.credentials_encrypted).where(Proxy.credentials_encrypted.is_not(None))
    )
    found = [(TOKEN, c) for c in tokens] + [(CREDENTIALS, c) for c in credentials]
    return [(kind, bytes(c)) for kind, c in found if c is not None]


def plaintexts(kind: str, ciphertext: bytes, box: SecretBox) -> list[str]:
    """The secret values one stored ciphertext holds.

    A proxy's password (or VMess/VLESS id) counts; its user name does not: names are often
    short common words that would be masked in every command's output (a command's own
    proxy user name is still masked in its own output).
    """
    text = box.decrypt(ciphertext)
    if kind == TOKEN:
        return [text]
    password = json.loads(text).get("password")
    return [password] if isinstance(password, str) and password else []


def process_secrets(settings: Settings, box: SecretBox) -> list[str]:
    """Secrets that live outside the database: the secret keys and the database password."""
    found: list[str] = list(box.key_texts)
    if settings.database_url is not None:
        password = make_url(settings.database_url).password
        if password:
            found.append(str(password))
    return found
