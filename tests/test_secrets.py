"""Secrets at rest: Fernet with the configured key; wrong or missing keys fail clearly."""

import logging
import os
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import delete, select
from sqlalchemy.ext.asyncio import AsyncSession

from server.db import create_engine, create_sessionmaker
from server.models import Meta, Service
from server.secretbox import (
    CHECK_KEY,
    CHECK_PLAINTEXT,
    SecretBox,
    SecretKeyError,
    generate_key,
    load_secret_box,
    token_preview,
    verify_secret_box,
)
from server.settings import Settings
from tests.conftest import GraphQLClient

TOKEN = "ghp_" + "S3cr3tT0k3nValue" * 2 + "a1b2"


def test_embedded_default_creates_a_private_key_file(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path / "data")
    box = load_secret_box(settings)
    key_file = settings.secret_key_file
    assert key_file.stat().st_mode & 0o777 == 0o600
    again = load_secret_box(settings)
    assert again.decrypt(box.encrypt("x")) == "x"


def test_key_file_readable_by_others_is_tightened(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = Settings(data_dir=tmp_path)
    box = load_secret_box(settings)
    os.chmod(settings.secret_key_file, 0o644)
    with caplog.at_level(logging.INFO, logger="corral.storage"):
        again = load_secret_box(settings)
    assert again.decrypt(box.encrypt("x")) == "x"
    assert settings.secret_key_file.stat().st_mode & 0o777 == 0o600
    assert "tightened" in caplog.text
    assert "644" in caplog.text


def test_external_database_requires_a_key(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path, database_url="postgresql+asyncpg://u@h/db")
    with pytest.raises(SecretKeyError, match="CORRAL_SECRET_KEY is required"):
        load_secret_box(settings)


def test_malformed_key_is_a_clear_error() -> None:
    with pytest.raises(SecretKeyError, match="not a valid Fernet key"):
        load_secret_box(Settings(secret_key="not-a-key"))


def test_rotation_decrypts_with_old_keys() -> None:
    old, new = generate_key(), generate_key()
    ciphertext = SecretBox([old.encode()]).encrypt("t")
    rotated = load_secret_box(Settings(secret_key=f"{new},{old}"))
    assert rotated.decrypt(ciphertext) == "t"


@pytest.mark.parametrize(
    ("secret", "preview"),
    [(TOKEN, "ghp_…a1b2"), ("sk-12345678", "…78"), ("abc", "…")],
)
def test_token_preview(secret: str, preview: str) -> None:
    assert token_preview(secret) == preview


async def test_wrong_key_is_refused_at_start(settings: Settings) -> None:
    engine = create_engine(settings)
    try:
        async with create_sessionmaker(engine)() as session:
            await verify_secret_box(session, load_secret_box(settings))
            await session.commit()
        wrong = SecretBox([generate_key().encode()])
        async with create_sessionmaker(engine)() as session:
            with pytest.raises(SecretKeyError, match="not the key this database"):
                await verify_secret_box(session, wrong)
    finally:
        await engine.dispose()


# On SQLite a session's read already holds the write lock (BEGIN IMMEDIATE): no such race.
@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
async def test_processes_starting_at_once_on_a_new_database_agree_on_the_key_check(
    settings: Settings, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Two `corral runner`s (or a runner and `corral serve`) starting together on a database
    without the key's check value: one writes it, the other checks its key against it (it
    used to die on the primary key with a traceback). The other process's write is made to
    land between this one's read and its write."""
    from server.app import prepare_database

    engine, other = create_engine(settings), create_engine(settings)
    box = load_secret_box(settings)
    try:
        async with create_sessionmaker(engine)() as session:
            await session.execute(delete(Meta).where(Meta.key == CHECK_KEY))
            await session.commit()
        read = AsyncSession.scalar
        raced: list[bool] = []

        async def read_then_race(self: AsyncSession, *args: Any, **kwargs: Any) -> Any:
            value = await read(self, *args, **kwargs)
            if not raced:  # the other process writes the check value now
                raced.append(True)
                async with create_sessionmaker(other)() as theirs:
                    theirs.add(Meta(key=CHECK_KEY, value=box.encrypt(CHECK_PLAINTEXT).decode()))
                    await theirs.commit()
            return value

        monkeypatch.setattr(AsyncSession, "scalar", read_then_race)
        await prepare_database(settings, engine)
        assert raced
        async with create_sessionmaker(engine)() as session:
            checks = list(await session.scalars(select(Meta.value).where(Meta.key == CHECK_KEY)))
        assert len(checks) == 1
    finally:
        await engine.dispose()
        await other.dispose()


async def test_token_plaintext_is_never_stored(gql: GraphQLClient, settings: Settings) -> None:
    data = await gql(
        'mutation($t: String!) { createService(input: {name: "GitHub", envVar: "GITHUB_TOKEN",'
        " token: $t}) { service { hasToken tokenPreview } userErrors { message } } }",
        t=TOKEN,
    )
    assert data["createService"]["service"] == {"hasToken": True, "tokenPreview": "ghp_…a1b2"}
    engine = create_engine(settings)
    try:
        async with create_sessionmaker(engine)() as session:
            stored = await session.scalar(select(Service.token_encrypted))
        assert stored is not None
        assert TOKEN.encode() not in stored
        assert load_secret_box(settings).decrypt(stored) == TOKEN
    finally:
        await engine.dispose()
    if settings.is_embedded:
        for path in settings.data_dir.glob("corral.db*"):
            assert TOKEN.encode() not in path.read_bytes()
