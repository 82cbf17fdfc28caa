"""`corral user ...` (create, list, set-password, delete), the first admin that `corral serve`
makes on a new embedded installation, and the refusal to listen beyond this machine with
no admin."""

from __future__ import annotations

import asyncio
import re
import socket
import subprocess
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select

from server.auth import check_login, load_token_hasher, start_session
from server.cli import main
from server.db import create_engine, create_sessionmaker
from server.models import AuditEvent, User, UserSession
from server.secretbox import load_secret_box
from server.settings import Settings
from tests.conftest import TEST_KEY
from tests.fixtures.processes import browser_login, first_admin_password, free_port, stop
from tests.test_cli import run_corral, serve  # noqa: F401 - the `serve` fixture, used below

PASSWORD = "a long enough password"


@pytest.fixture
def cli(settings: Settings, monkeypatch: pytest.MonkeyPatch) -> Settings:
    """The environment `corral` reads, pointing at the test database."""
    monkeypatch.setenv("CORRAL_DATA_DIR", str(settings.data_dir))
    monkeypatch.setenv("CORRAL_SECRET_KEY", TEST_KEY)
    if settings.database_url is not None:
        monkeypatch.setenv("CORRAL_DATABASE_URL", settings.database_url)
    monkeypatch.setenv("CORRAL_USER_PASSWORD", PASSWORD)
    return settings


def query(settings: Settings, work: Any) -> Any:
    async def run() -> Any:
        engine = create_engine(settings)
        try:
            async with create_sessionmaker(engine)() as session:
                result = await work(session)
                await session.commit()
                return result
        finally:
            await engine.dispose()

    return asyncio.run(run())


def password_works(settings: Settings, name: str, password: str) -> bool:
    async def work(session: Any) -> bool:
        return await check_login(session, name, password) is not None

    return bool(query(settings, work))


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1, err  # one line, no traceback
    assert err.startswith("corral: error: ")
    return err


def test_user_create_list_set_password_delete(
    cli: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    assert main(["user", "create", "alice"]) == 0
    assert "user 'alice' created (admin)" in capsys.readouterr().out
    assert main(["user", "create", "victor", "--role", "viewer"]) == 0
    capsys.readouterr()

    assert main(["user", "list"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0].split()[:2] == ["NAME", "ROLE"]
    assert re.match(r"alice\s+admin\s+\d{4}-\d\d-\d\d \d\d:\d\d\s+never$", lines[1]), lines
    assert re.match(r"victor\s+viewer\s+", lines[2]), lines
    assert password_works(cli, "alice", PASSWORD)

    async def log_in(session: Any) -> None:
        user = await check_login(session, "alice", PASSWORD)
        assert user is not None
        box = load_secret_box(cli)
        await start_session(session, await load_token_hasher(session, box), user, None)

    query(cli, log_in)
    monkeypatch.setenv("CORRAL_USER_PASSWORD", "another good password")
    assert main(["user", "set-password", "alice"]) == 0
    assert not password_works(cli, "alice", PASSWORD)
    assert password_works(cli, "alice", "another good password")

    async def sessions(session: Any) -> list[UserSession]:
        return list(await session.scalars(select(UserSession)))

    assert query(cli, sessions) == []  # a new password ends every session

    assert main(["user", "delete", "victor"]) == 0
    capsys.readouterr()
    assert main(["user", "list"]) == 0
    assert "victor" not in capsys.readouterr().out

    async def events(session: Any) -> list[tuple[str, str, str]]:
        rows = await session.scalars(select(AuditEvent).order_by(AuditEvent.id))
        return [(e.actor_kind, e.action, e.outcome) for e in rows]

    assert query(cli, events) == [
        ("cli", "createUser", "ok"),
        ("cli", "createUser", "ok"),
        ("cli", "setUserPassword", "ok"),
        ("cli", "deleteUser", "ok"),
    ]

    async def hashes(session: Any) -> list[str]:
        return list(await session.scalars(select(User.password_hash)))

    assert all(h.startswith("$argon2id$") for h in query(cli, hashes))


def test_last_admin_cannot_be_deleted(cli: Settings, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["user", "create", "alice"]) == 0
    assert main(["user", "create", "victor", "--role", "viewer"]) == 0
    capsys.readouterr()
    assert main(["user", "delete", "alice"]) == 1
    assert "'alice' is the last admin" in one_error_line(capsys)
    assert main(["user", "create", "bob"]) == 0
    assert main(["user", "delete", "alice"]) == 0


def test_user_mistakes_are_one_line(
    cli: Settings, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CORRAL_USER_PASSWORD", "short")
    assert main(["user", "create", "alice"]) == 1
    assert "password: must be at least 8 characters" in one_error_line(capsys)

    monkeypatch.delenv("CORRAL_USER_PASSWORD")
    typed = iter(["first password", "second password"])
    monkeypatch.setattr("getpass.getpass", lambda _prompt="": next(typed))
    assert main(["user", "create", "alice"]) == 1
    assert "the two passwords differ" in one_error_line(capsys)

    typed = iter([PASSWORD, PASSWORD])
    assert main(["user", "create", "alice"]) == 0
    assert password_works(cli, "alice", PASSWORD)
    monkeypatch.setenv("CORRAL_USER_PASSWORD", PASSWORD)
    capsys.readouterr()
    assert main(["user", "create", "bob", "--role", "root"]) == 1
    assert "role: must be admin or viewer" in one_error_line(capsys)
    assert main(["user", "create", "alice"]) == 1
    assert "a user 'alice' exists already" in one_error_line(capsys)
    assert main(["user", "set-password", "nobody"]) == 1
    assert "no user 'nobody'" in one_error_line(capsys)
    assert main(["user", "delete", "nobody"]) == 1
    one_error_line(capsys)


def test_first_start_makes_an_admin_and_shows_its_password_once(
    serve: tuple[subprocess.Popen[str], str],  # noqa: F811 - the fixture imported above
    tmp_path: Path,
) -> None:
    process, base = serve
    password, before = first_admin_password(process)
    assert "change it with `corral user set-password admin`" in before[-1]
    with httpx.Client(base_url=base) as browser:
        assert browser_login(browser, "admin", password).status_code == 303
        assert "admin (admin)" in browser.get("/").text
    _code, rest = stop(process)
    output = "".join(before) + rest
    assert output.count(password) == 1, output  # printed once; never logged
    assert password.encode() not in (tmp_path / ".corral" / "corral.db").read_bytes()
    listed = run_corral("user", "list", cwd=tmp_path)
    assert listed.stdout.splitlines()[1].split()[:2] == ["admin", "admin"]
    # A second start makes no other admin and shows no password (it gets as far as
    # listening, on a port taken here, so it stops there).
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        again = run_corral("serve", "--port", str(taken.getsockname()[1]), cwd=tmp_path)
    assert again.returncode != 0
    assert "first admin" not in again.stdout + again.stderr
    assert len(run_corral("user", "list", cwd=tmp_path).stdout.splitlines()) == 2


def test_serve_beyond_loopback_needs_an_admin(tmp_path: Path) -> None:
    everywhere = "0.0.0.0"  # noqa: S104 - refused before it listens
    refused = run_corral("serve", "--host", everywhere, "--port", str(free_port()), cwd=tmp_path)
    assert refused.returncode == 1
    assert refused.stderr.count("\n") == 1, refused.stderr
    assert "while no admin user exists" in refused.stderr
    assert "first admin" not in refused.stdout  # nor does it make one with a shown password


def test_serve_beyond_loopback_needs_an_admin_on_postgresql(
    tmp_path: Path, postgres_databases: Any
) -> None:
    env = {
        "CORRAL_DATABASE_URL": postgres_databases("corral_users"),
        "CORRAL_SECRET_KEY": run_corral("genkey", cwd=tmp_path).stdout.strip(),
    }
    assert run_corral("migrate", cwd=tmp_path, **env).returncode == 0
    refused = run_corral("serve", "--host", "10.1.2.3", cwd=tmp_path, **env)
    assert refused.returncode == 1
    assert "while no admin user exists" in refused.stderr
    created = run_corral(
        "user",
        "create",
        "root",
        "--role",
        "viewer",
        cwd=tmp_path,
        CORRAL_USER_PASSWORD=PASSWORD,
        **env,
    )
    assert created.returncode == 0, created.stderr
    refused = run_corral("serve", "--host", "10.1.2.3", cwd=tmp_path, **env)
    assert "while no admin user exists" in refused.stderr  # a viewer is no admin
