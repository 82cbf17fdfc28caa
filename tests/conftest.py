"""Shared fixtures: the same tests on SQLite and PostgreSQL, each test on a clean database.

PostgreSQL comes from CORRAL_TEST_POSTGRES_URL (the README's test command and .ci/run set
it to the local server). When it is set, an unreachable server fails the run: never a skip.
Each test session gets its own database (created, migrated, dropped), and each test starts
from empty tables. SQLite tests copy a migrated database file, so each starts fresh too.
"""

from __future__ import annotations

import asyncio
import logging
import os
import shutil
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from sqlalchemy import event, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)
from starlette.applications import Starlette

from server import auth, migrate
from server.app import create_app
from server.db import create_engine, create_sessionmaker
from server.models import Base
from server.secretbox import generate_key
from server.settings import Settings
from tests.fixtures.auth import (  # re-exported: tests import them from here
    admin_headers,
    bearer,  # noqa: F401
    issue_api_token,
)

# Cheap argon2id for the suite's many logins (0.3-0.4 s each with the production parameters
# on this 2-core machine); tests/test_login.py checks the production parameters themselves.
auth.set_password_cost(time_cost=1, memory_kib=1024, parallelism=1)

pytest_plugins = [
    "tests.fixtures.netfakes",  # the `site` and `upstream` fixtures
    "tests.fixtures.fake_providers",  # `fake_providers`: fake GitHub and OpenAI-style APIs
    "tests.fixtures.heap",  # `steady_heap`: no full collection of the worker's heap mid-test
]

PG_ENV = "CORRAL_TEST_POSTGRES_URL"
TEST_KEY = generate_key()


def postgres_admin_url() -> str | None:
    url = os.environ.get(PG_ENV, "").strip()
    return url or None


async def _create_database(admin_url: str, name: str) -> str:
    engine = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as connection:
            await connection.execute(text(f'CREATE DATABASE "{name}"'))
    finally:
        await engine.dispose()
    return make_url(admin_url).set(database=name).render_as_string(hide_password=False)


async def _drop_database(admin_url: str, name: str) -> None:
    engine = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as connection:
            await connection.execute(text(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)'))
    finally:
        await engine.dispose()


async def _migrated(settings: Settings) -> None:
    engine = create_engine(settings)
    try:
        await migrate.upgrade(engine)
    finally:
        await engine.dispose()


@pytest.fixture(scope="session")
def postgres_databases() -> Iterator[Any]:
    """Makes throwaway PostgreSQL databases on the test server; drops them at the end."""
    admin = postgres_admin_url()
    created: list[str] = []

    def make(prefix: str = "corral_test") -> str:
        if admin is None:
            pytest.skip(f"{PG_ENV} is not set (the README's test command sets it)")
        name = f"{prefix}_{os.getpid()}_{uuid.uuid4().hex[:8]}"
        try:
            url = asyncio.run(_create_database(admin, name))
        except OSError as exc:  # unreachable server: fail, never skip
            pytest.fail(f"PostgreSQL at {admin} is unreachable: {exc}")
        created.append(name)
        return url

    yield make
    for name in created:
        asyncio.run(_drop_database(admin or "", name))


@pytest.fixture(scope="session")
def postgres_url(postgres_databases: Any) -> str:
    """One migrated PostgreSQL database for the session's tests (emptied before each)."""
    url: str = postgres_databases()
    asyncio.run(_migrated(Settings(database_url=url, secret_key=TEST_KEY)))
    return url


@pytest.fixture(scope="session")
def sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A migrated SQLite file that each test copies."""
    folder = tmp_path_factory.mktemp("sqlite-template")
    asyncio.run(_migrated(Settings(data_dir=folder, secret_key=TEST_KEY)))
    return folder / "corral.db"


async def _empty_tables(url: str) -> None:
    """What `TRUNCATE ... RESTART IDENTITY CASCADE` did, at a quarter of its cost per test
    (0.2 s instead of 0.8 s on a loaded 2-core machine; TRUNCATE makes new files for every
    table): DELETE every row with the foreign-key triggers off (every table is emptied, so
    no reference is left dangling), restart every sequence, in one transaction and one round
    trip on a bare asyncpg connection (no engine to build)."""
    dsn = make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)
    connection = await asyncpg.connect(dsn)
    try:
        sequences = await connection.fetch(
            "SELECT format('%I.%I', sequence_schema, sequence_name) AS name"
            " FROM information_schema.sequences"
        )
        # Names from our own models and the catalog, not input.
        deletes = "".join(f'DELETE FROM "{t.name}"; ' for t in Base.metadata.sorted_tables)  # noqa: S608
        restarts = "".join(f"ALTER SEQUENCE {row['name']} RESTART; " for row in sequences)
        await connection.execute(
            f"BEGIN; SET LOCAL session_replication_role = replica; {deletes}{restarts}COMMIT;"
        )
    finally:
        await connection.close()


@pytest.fixture(autouse=True)
def no_runner_errors(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """A test fails when Corral logged an error (e.g. a runner pass that crashed)."""
    yield
    errors = [
        record.getMessage()
        for record in caplog.get_records("call")
        if record.levelno >= logging.ERROR and record.name.startswith("corral")
    ]
    assert errors == [], errors


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    """The database backend under test (every test using `settings` runs on both)."""
    return str(request.param)


@pytest.fixture
def settings(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Settings:
    """Settings for a clean, migrated database of the current backend."""
    data_dir = tmp_path / "data"
    data_dir.mkdir()
    if backend == "sqlite":
        shutil.copy(request.getfixturevalue("sqlite_template"), data_dir / "corral.db")
        return Settings(data_dir=data_dir, secret_key=TEST_KEY, auto_migrate=False)
    url = request.getfixturevalue("postgres_url")
    asyncio.run(_empty_tables(url))
    return Settings(data_dir=data_dir, database_url=url, secret_key=TEST_KEY)


@pytest.fixture
async def sessionmaker(settings: Settings) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    """The database alone: no app, no runner (the test plays the runner)."""
    engine = create_engine(settings)
    try:
        yield create_sessionmaker(engine)
    finally:
        await engine.dispose()


@pytest.fixture
async def app(settings: Settings) -> AsyncIterator[Starlette]:
    """The app with its lifespan running; `app.state.admin_token` is an admin API token."""
    application = create_app(settings)
    async with application.router.lifespan_context(application):
        application.state.admin_token = await issue_api_token(application)
        yield application


@pytest.fixture
async def client(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    """An HTTP client of the app, authenticated with an admin API token."""
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://localhost", headers=admin_headers(app)
    ) as http:
        yield http


class GraphQLError(AssertionError):
    pass


@dataclass
class GraphQLClient:
    """Posts operations to /graphql; `errors` in a response fail the test unless expected."""

    http: httpx.AsyncClient

    async def __call__(self, query: str, **variables: Any) -> dict[str, Any]:
        body = await self.raw(query, **variables)
        if body.get("errors"):
            raise GraphQLError(body["errors"])
        data: dict[str, Any] = body["data"]
        return data

    async def raw(self, query: str, **variables: Any) -> dict[str, Any]:
        response = await self.http.post("/graphql", json={"query": query, "variables": variables})
        assert response.status_code == 200, response.text
        body: dict[str, Any] = response.json()
        return body


@pytest.fixture
def gql(client: httpx.AsyncClient) -> GraphQLClient:
    return GraphQLClient(client)


@dataclass
class StatementCounter:
    statements: list[str] = field(default_factory=list)

    def __call__(self, _conn: Any, _cursor: Any, statement: str, *_args: Any) -> None:
        self.statements.append(statement)


@pytest.fixture
def count_statements(app: Starlette) -> Iterator[StatementCounter]:
    """Records every SQL statement the app's engine sends."""
    engine: AsyncEngine = app.state.engine
    counter = StatementCounter()
    event.listen(engine.sync_engine, "before_cursor_execute", counter)
    yield counter
    event.remove(engine.sync_engine, "before_cursor_execute", counter)
