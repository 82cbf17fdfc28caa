"""Encryption at rest for tokens and proxy credentials (Fernet / MultiFernet).

The key comes from `CORRAL_SECRET_KEY` (comma-separated keys rotate: the first one
encrypts, all decrypt), else from `secret.key` in the data dir, which the embedded
default creates with mode 0600 (a looser mode is tightened at start). A check value in
`corral_meta` makes a wrong key fail at start with one clear message instead of producing
garbage later. `corral rotate-key` (server/keyrotation.py) re-encrypts every stored secret
under a new key.
"""

from __future__ import annotations

import os
from pathlib import Path

from cryptography.fernet import Fernet, InvalidToken, MultiFernet
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from server.models import Meta
from server.settings import Settings
from server.storage import PRIVATE_DIR_MODE, PRIVATE_FILE_MODE, secure_data_dir, tighten

CHECK_KEY = "secret_check"
CHECK_PLAINTEXT = "corral-secret-check-v1"


class SecretKeyError(Exception):
    """The secret key is missing, malformed, or not the one this database was written with."""


class SecretBox:
    """Encrypts and decrypts secret strings with the configured key ring."""

    def __init__(self, keys: list[bytes]) -> None:
        if not keys:
            raise SecretKeyError("no secret key given")
        try:
            self._fernet = MultiFernet([Fernet(key) for key in keys])
        except ValueError as exc:
            raise SecretKeyError(
                "CORRAL_SECRET_KEY is not a valid Fernet key (32 url-safe base64-encoded "
                "bytes; make one with `corral genkey`)"
            ) from exc
        # Kept for the runner's redactor: a command that reads the key never prints it.
        self.key_texts = tuple(key.decode() for key in keys)

    def encrypt(self, plaintext: str) -> bytes:
        """Encrypt a secret for storage."""
        return self._fernet.encrypt(plaintext.encode())

    def decrypt(self, ciphertext: bytes) -> str:
        """Decrypt a stored secret; raises SecretKeyError when the key does not fit."""
        try:
            return self._fernet.decrypt(ciphertext).decode()
        except InvalidToken as exc:
            raise SecretKeyError("a stored secret does not decrypt with the current key") from exc

    def rotate(self, ciphertext: bytes) -> bytes:
        """Re-encrypt a stored secret under the first key; raises SecretKeyError when no key
        of the ring decrypts it."""
        try:
            return self._fernet.rotate(ciphertext)
        except InvalidToken as exc:
            raise SecretKeyError("a stored secret does not decrypt with any key given") from exc


def generate_key() -> str:
    """A new random Fernet key, as text."""
    return Fernet.generate_key().decode()


def load_secret_box(settings: Settings) -> SecretBox:
    """Build the key ring from settings, creating the embedded default's key file if needed."""
    keys = configured_keys(settings)
    if keys is not None:
        return SecretBox(keys)
    path = settings.secret_key_file
    if path.exists():
        # An interrupted `corral rotate-key` left some secrets under the new key: read them.
        pending = new_key_file(path)
        keys = [read_key_file(path)] + ([read_key_file(pending)] if pending.exists() else [])
        return SecretBox(keys)
    if not settings.is_embedded:
        raise SecretKeyError(
            f"CORRAL_SECRET_KEY is required with an external database "
            f"(or put a key in {path}); make one with `corral genkey`"
        )
    _write_key_file(path, generate_key())
    return SecretBox([read_key_file(path)])


def new_key_file(key_file: Path) -> Path:
    """Where `corral rotate-key` keeps the new key until every secret is under it."""
    return key_file.with_name(key_file.name + ".new")


def configured_keys(settings: Settings) -> list[bytes] | None:
    """The key ring given in CORRAL_SECRET_KEY (first key first), None when it is unset."""
    if settings.secret_key is None:
        return None
    raw = settings.secret_key.get_secret_value()
    keys = [part.strip().encode() for part in raw.split(",") if part.strip()]
    if not keys:
        raise SecretKeyError("CORRAL_SECRET_KEY is set but empty")
    return keys


def read_key_file(path: Path) -> bytes:
    """The key in a key file, made 0600 in a 0700 folder whatever they had (an INFO line
    says so)."""
    tighten(path.parent, PRIVATE_DIR_MODE)
    tighten(path, PRIVATE_FILE_MODE)
    key = path.read_text().strip().encode()
    if not key:
        raise SecretKeyError(f"{path} is empty")
    return key


def _write_key_file(path: Path, key: str) -> None:
    secure_data_dir(path.parent)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as handle:
        handle.write(key + "\n")


async def verify_secret_box(session: AsyncSession, box: SecretBox) -> None:
    """Check the key against this database's check value, writing one on first use."""
    stored = await session.scalar(select(Meta.value).where(Meta.key == CHECK_KEY))
    if stored is None:
        session.add(Meta(key=CHECK_KEY, value=box.encrypt(CHECK_PLAINTEXT).decode()))
        await session.flush()
        return
    try:
        ok = box.decrypt(stored.encode()) == CHECK_PLAINTEXT
    except SecretKeyError:
        ok = False
    if not ok:
        raise SecretKeyError(
            "CORRAL_SECRET_KEY is not the key this database's secrets were encrypted with"
        )


def token_preview(secret: str) -> str:
    """A recognisable, non-revealing preview: `ghp_…a1b2` (less of short secrets)."""
    if len(secret) >= 16:
        return f"{secret[:4]}…{secret[-4:]}"
    if len(secret) >= 8:
        return f"…{secret[-2:]}"
    return "…"
