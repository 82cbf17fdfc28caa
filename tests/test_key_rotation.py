"""`corral rotate-key`: every secret ends under the new key alone, batch by batch, resumably.

Each test reads the raw ciphertext columns and tries them with Fernet directly: after a
rotation every secret opens with the new key alone and none with the old key alone.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Callable

import pytest
from cryptography.fernet import Fernet, InvalidToken
from pydantic import SecretStr
from sqlalchemy import select

from server.cli import main
from server.db import create_engine, create_sessionmaker
from server.keyrotation import KeyRotationError, RotationReport, rotate_key
from server.models import Meta, Profile, ProfileService, Proxy, Service
from server.secretbox import CHECK_KEY, CHECK_PLAINTEXT, generate_key, load_secret_box
from server.settings import Settings
from tests.conftest import TEST_KEY

NEW_KEY = generate_key()
EXPECTED_COUNTS = {
    "service tokens": 3,
    "profile tokens": 2,
    "proxy credentials": 4,
    "settings": 2,
}
PLAIN_META = ("schema_note", "not a secret, never touched")


class Interrupted(Exception):
    """Stands for a kill between two batches."""


def stop_after(batches: int) -> Callable[[str, int], None]:
    seen: list[str] = []

    def on_batch(kind: str, _rows: int) -> None:
        seen.append(kind)
        if len(seen) >= batches:
            raise Interrupted

    return on_batch


def with_keys(settings: Settings, keys: str | None) -> Settings:
    return settings.model_copy(update={"secret_key": SecretStr(keys) if keys else None})


def key_file_settings(settings: Settings, key: str) -> Settings:
    """The same database, its key in `secret.key` (the embedded default's way)."""
    path = settings.secret_key_file
    path.write_text(key + "\n")
    path.chmod(0o600)
    return with_keys(settings, None)


async def seed(settings: Settings, key: str) -> dict[str, str]:
    """Secrets of every kind under `key`; their plaintexts by `table/primary key`."""
    fernet = Fernet(key.encode())
    expected: dict[str, str] = {}
    engine = create_engine(settings)
    try:
        async with create_sessionmaker(engine)() as session:
            profiles = [Profile(name=f"profile {n}") for n in range(2)]
            services = [
                Service(name=f"service {n}", env_var=f"TOKEN_{n}", token_encrypted=None)
                for n in range(4)
            ]
            proxies = [
                Proxy(name=f"proxy {n}", protocol="http", host="h", port=n + 1) for n in range(4)
            ]
            session.add_all([*profiles, *services, *proxies])
            await session.flush()
            for service in services[:3]:
                expected[f"services/{service.id}"] = f"service-token-{service.id}"
                service.token_encrypted = fernet.encrypt(
                    expected[f"services/{service.id}"].encode()
                )
            for profile in profiles:
                plain = f"profile-token-{profile.id}"
                expected[f"profile_services/{profile.id},{services[0].id}"] = plain
                session.add(
                    ProfileService(
                        profile_id=profile.id,
                        service_id=services[0].id,
                        token_encrypted=fernet.encrypt(plain.encode()),
                    )
                )
            for proxy in proxies:
                expected[f"proxies/{proxy.id}"] = f'{{"password": "pw-{proxy.id}"}}'
                proxy.credentials_encrypted = fernet.encrypt(
                    expected[f"proxies/{proxy.id}"].encode()
                )
            metas = {CHECK_KEY: CHECK_PLAINTEXT, "api_token_key": "random-api-token-key"}
            for name, plain in metas.items():
                expected[f"corral_meta/{name}"] = plain
                session.add(Meta(key=name, value=fernet.encrypt(plain.encode()).decode()))
            session.add(Meta(key=PLAIN_META[0], value=PLAIN_META[1]))
            await session.commit()
    finally:
        await engine.dispose()
    return expected


async def raw_secrets(settings: Settings) -> dict[str, bytes]:
    """Every stored ciphertext, as the columns hold it, by `table/primary key`."""
    engine = create_engine(settings)
    raw: dict[str, bytes] = {}
    try:
        async with create_sessionmaker(engine)() as session:
            for sid, token in await session.execute(select(Service.id, Service.token_encrypted)):
                if token is not None:
                    raw[f"services/{sid}"] = token
            links = select(
                ProfileService.profile_id, ProfileService.service_id, ProfileService.token_encrypted
            )
            for pid, sid, token in await session.execute(links):
                if token is not None:
                    raw[f"profile_services/{pid},{sid}"] = token
            for xid, creds in await session.execute(select(Proxy.id, Proxy.credentials_encrypted)):
                if creds is not None:
                    raw[f"proxies/{xid}"] = creds
            for name, value in await session.execute(select(Meta.key, Meta.value)):
                if name == PLAIN_META[0]:
                    assert value == PLAIN_META[1]  # a plain setting is never touched
                else:
                    raw[f"corral_meta/{name}"] = value.encode()
    finally:
        await engine.dispose()
    return raw


def opens_with(key: str, token: bytes) -> str | None:
    try:
        return Fernet(key.encode()).decrypt(token).decode()
    except InvalidToken:
        return None


async def assert_only_under(
    settings: Settings, expected: dict[str, str], key: str, old: str
) -> None:
    raw = await raw_secrets(settings)
    assert set(raw) == set(expected)
    for where, token in raw.items():
        assert opens_with(key, token) == expected[where], where
        assert opens_with(old, token) is None, where


async def test_rotation_puts_every_secret_under_the_first_key(settings: Settings) -> None:
    expected = await seed(settings, TEST_KEY)
    report = await rotate_key(with_keys(settings, f"{NEW_KEY},{TEST_KEY}"))
    assert report.counts == EXPECTED_COUNTS
    await assert_only_under(settings, expected, NEW_KEY, TEST_KEY)
    assert "can now be removed from CORRAL_SECRET_KEY" in "\n".join(report.lines())
    # A second run re-encrypts again (under the same key): harmless.
    again = await rotate_key(with_keys(settings, f"{NEW_KEY},{TEST_KEY}"))
    assert again.counts == EXPECTED_COUNTS
    await assert_only_under(settings, expected, NEW_KEY, TEST_KEY)


def test_report_counts_read_naturally() -> None:
    counts = {"service tokens": 1, "profile tokens": 0, "proxy credentials": 1, "settings": 1}
    assert RotationReport(counts).summary() == (
        "re-encrypted 1 service token, 0 profile tokens, 1 proxy credentials, 1 setting"
    )


async def test_interrupted_rotation_resumes(settings: Settings) -> None:
    expected = await seed(settings, TEST_KEY)
    ring = with_keys(settings, f"{NEW_KEY},{TEST_KEY}")
    with pytest.raises(Interrupted):
        await rotate_key(ring, batch_size=1, on_batch=stop_after(2))
    raw = await raw_secrets(settings)
    rotated = [where for where, token in raw.items() if opens_with(NEW_KEY, token)]
    assert len(rotated) == 2  # two batches of one committed, the rest untouched
    assert all(opens_with(TEST_KEY, raw[where]) for where in set(raw) - set(rotated))
    report = await rotate_key(ring, batch_size=1)
    assert report.counts == EXPECTED_COUNTS
    await assert_only_under(settings, expected, NEW_KEY, TEST_KEY)


async def test_key_file_rotation_replaces_secret_key_and_resumes(settings: Settings) -> None:
    old_key = generate_key()
    file_settings = key_file_settings(settings, old_key)
    expected = await seed(settings, old_key)
    key_file = settings.secret_key_file
    pending = key_file.with_name("secret.key.new")

    with pytest.raises(Interrupted):
        await rotate_key(file_settings, batch_size=2, on_batch=stop_after(2))
    assert key_file.read_text().strip() == old_key
    assert pending.stat().st_mode & 0o777 == 0o600
    new_key = pending.read_text().strip()
    raw = await raw_secrets(settings)
    assert sum(opens_with(new_key, token) is not None for token in raw.values()) == 3  # 2 + 1
    # Meanwhile a server reads every secret, whichever key it is under.
    box = load_secret_box(file_settings)
    assert {where: box.decrypt(token) for where, token in raw.items()} == expected

    report = await rotate_key(file_settings, batch_size=2)
    assert report.counts == EXPECTED_COUNTS
    assert key_file.read_text().strip() == new_key  # the interrupted run's new key
    assert key_file.stat().st_mode & 0o777 == 0o600
    assert not pending.exists()
    await assert_only_under(settings, expected, new_key, old_key)
    backup = report.old_key_file
    assert backup is not None
    assert backup.name.startswith("secret.key.old-")
    assert backup.read_text().strip() == old_key
    assert backup.stat().st_mode & 0o777 == 0o600
    lines = "\n".join(report.lines())
    assert str(backup) in lines
    assert "delete it" in lines
    assert old_key not in lines
    assert new_key not in lines


async def test_one_key_is_nothing_to_rotate_to(settings: Settings) -> None:
    await seed(settings, TEST_KEY)
    before = await raw_secrets(settings)
    with pytest.raises(KeyRotationError, match=r"holds one key.*`corral genkey`"):
        await rotate_key(with_keys(settings, TEST_KEY))
    assert await raw_secrets(settings) == before


async def test_key_file_that_does_not_fit_changes_nothing(settings: Settings) -> None:
    await seed(settings, TEST_KEY)
    before = await raw_secrets(settings)
    wrong = generate_key()
    with pytest.raises(KeyRotationError, match=r"neither .*secret.key nor .*secret.key.new holds"):
        await rotate_key(key_file_settings(settings, wrong))
    assert settings.secret_key_file.read_text().strip() == wrong
    assert await raw_secrets(settings) == before


async def test_undecryptable_secret_stops_naming_its_row(settings: Settings) -> None:
    expected = await seed(settings, TEST_KEY)
    stray = "stray-credentials"
    engine = create_engine(settings)
    try:
        async with create_sessionmaker(engine)() as session:
            proxy = Proxy(name="stray", protocol="http", host="h", port=9)
            proxy.credentials_encrypted = Fernet(generate_key().encode()).encrypt(stray.encode())
            session.add(proxy)
            await session.commit()
            stray_id = proxy.id
    finally:
        await engine.dispose()
    with pytest.raises(KeyRotationError) as failure:
        await rotate_key(with_keys(settings, f"{NEW_KEY},{TEST_KEY}"), batch_size=2)
    message = str(failure.value)
    assert f"proxies.credentials_encrypted of the row with id {stray_id}" in message
    assert stray not in message
    assert "\n" not in message
    # Consistent: every other secret still opens with the ring.
    ring = [NEW_KEY, TEST_KEY]
    raw = await raw_secrets(settings)
    del raw[f"proxies/{stray_id}"]
    opened = {
        w: next(p for k in ring if (p := opens_with(k, t)) is not None) for w, t in raw.items()
    }
    assert opened == expected


HOLD_OPEN = "import sys, time; f = open(sys.argv[1]); print(1, flush=True); time.sleep(60)"


@pytest.mark.parametrize("backend", ["sqlite"])  # only the embedded database is looked for
async def test_refuses_while_a_process_has_the_embedded_database_open(settings: Settings) -> None:
    database = str(settings.data_dir / "corral.db")
    with subprocess.Popen(
        [sys.executable, "-c", HOLD_OPEN, database], stdout=subprocess.PIPE, text=True
    ) as holder:
        try:
            assert holder.stdout is not None
            assert holder.stdout.readline()
            with pytest.raises(KeyRotationError, match=f"process {holder.pid} has the embedded"):
                await rotate_key(with_keys(settings, f"{NEW_KEY},{TEST_KEY}"))
        finally:
            holder.kill()


def test_cli_rotate_key(
    settings: Settings, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    expected = asyncio.run(seed(settings, TEST_KEY))
    for name in [name for name in os.environ if name.startswith("CORRAL_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("CORRAL_DATA_DIR", str(settings.data_dir))
    if settings.database_url is not None:
        monkeypatch.setenv("CORRAL_DATABASE_URL", settings.database_url)

    monkeypatch.setenv("CORRAL_SECRET_KEY", TEST_KEY)
    assert main(["rotate-key"]) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err.startswith("corral: error: CORRAL_SECRET_KEY holds one key")
    assert err.count("\n") == 1
    assert TEST_KEY not in err

    monkeypatch.setenv("CORRAL_SECRET_KEY", f"{NEW_KEY},{TEST_KEY}")
    assert main(["rotate-key", "--batch-size", "2"]) == 0
    out, err = capsys.readouterr()
    assert "re-encrypted 3 service tokens, 2 profile tokens, 4 proxy credentials, 2 settings" in out
    assert "can now be removed from CORRAL_SECRET_KEY" in out
    assert NEW_KEY not in out + err
    assert TEST_KEY not in out + err
    asyncio.run(assert_only_under(settings, expected, NEW_KEY, TEST_KEY))

    monkeypatch.delenv("CORRAL_SECRET_KEY")  # the key file's way: secret.key holds the key
    key_file_settings(settings, NEW_KEY)
    assert main(["rotate-key"]) == 0
    out, _err = capsys.readouterr()
    assert f"the old key is kept in {settings.secret_key_file}.old-" in out
    assert settings.secret_key_file.read_text().strip() != NEW_KEY

    assert main(["rotate-key", "--batch-size", "0"]) == 1
    assert capsys.readouterr().err == "corral: error: --batch-size must be at least 1\n"
