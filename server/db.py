"""Database engine and sessions: one engine and one sessionmaker per app."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import sqlalchemy
from sqlalchemy import Engine, event
from sqlalchemy.engine import URL, make_url
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    AsyncSession,
    async_sessionmaker,
    create_async_engine,
)

from server.settings import Settings
from server.storage import secure_data_dir, secure_sqlite_file

SQLITE_BUSY_TIMEOUT_MS = 5000
STORE_CHECKPOINT_PAGES = 4000


def create_engine(settings: Settings, **kwargs: Any) -> AsyncEngine:
    """Create the async engine for the configured database (SQLite gets WAL and a busy timeout).

    Every engine hides statement parameters from its errors and logs: they hold what
    clients sent and commands printed, and an error is logged (issue 10).
    """
    url = make_url(settings.resolved_database_url)
    if url.get_backend_name() == "sqlite":
        if url.database and url.database != ":memory:":
            database = Path(url.database)
            if database.resolve().parent == settings.data_dir.resolve():
                secure_data_dir(settings.data_dir)  # Corral's own folder: 0700
            secure_sqlite_file(database)
        engine = create_async_engine(
            url,
            connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
            hide_parameters=True,
            **kwargs,
        )
        event.listen(engine.sync_engine, "connect", _sqlite_on_connect)
        event.listen(engine.sync_engine, "begin", _sqlite_on_begin)
        return engine
    # Enough connections for every running command's writer plus API requests; no ping
    # per checkout (a round trip each time), connections are recycled instead.
    pool_size = settings.max_concurrency * 2 + 5
    options: dict[str, Any] = {
        "pool_size": pool_size,
        "max_overflow": 10,
        "pool_recycle": 1800,
        "hide_parameters": True,
    }
    return create_async_engine(url, **(options | kwargs))


def create_sync_engine(url: URL) -> Engine:
    """A blocking engine on the same SQLite file, for work done in a thread of its own
    (the runner's log store): same pragmas, same BEGIN IMMEDIATE."""
    engine = sqlalchemy.create_engine(
        url.set(drivername="sqlite"),
        connect_args={"timeout": SQLITE_BUSY_TIMEOUT_MS / 1000},
        pool_size=1,
        max_overflow=0,
        hide_parameters=True,
    )
    event.listen(engine, "connect", _sqlite_on_connect)
    event.listen(engine, "connect", _fewer_checkpoints)
    event.listen(engine, "begin", _sqlite_on_begin)
    return engine


def _fewer_checkpoints(dbapi_connection: Any, _record: Any) -> None:
    # The log store commits often and big: checkpoint (and fsync) every 16 MiB of WAL
    # rather than every 4 MiB.
    dbapi_connection.execute(f"PRAGMA wal_autocheckpoint={STORE_CHECKPOINT_PAGES}")


def _sqlite_on_connect(dbapi_connection: Any, _record: Any) -> None:
    # Let SQLAlchemy emit BEGIN itself (pysqlite's implicit transactions would defer it).
    dbapi_connection.isolation_level = None
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute(f"PRAGMA busy_timeout={SQLITE_BUSY_TIMEOUT_MS}")
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA synchronous=NORMAL")
    cursor.close()


READ_ONLY = {"corral_read_only": True}  # execution options of a connection that only reads


def _sqlite_on_begin(connection: Any) -> None:
    # IMMEDIATE takes the write lock up front: two deferred transactions that both read,
    # then write, would fail with "database is locked" without waiting the busy timeout.
    # A connection that only reads (READ_ONLY) must not hold up the writers: it defers.
    if connection.get_execution_options().get("corral_read_only"):
        connection.exec_driver_sql("BEGIN")
    else:
        connection.exec_driver_sql("BEGIN IMMEDIATE")


def sqlite_timestamp(value: datetime) -> str:
    """A timestamp as SQLite keeps it: naive UTC text, the way server.models.UTCDateTime
    stores it (for statements that go to sqlite3 directly)."""
    return value.astimezone(UTC).replace(tzinfo=None).isoformat(" ", "microseconds")


def is_sqlite(engine: AsyncEngine) -> bool:
    """True when the engine talks to SQLite."""
    return engine.dialect.name == "sqlite"


def create_sessionmaker(engine: AsyncEngine) -> async_sessionmaker[AsyncSession]:
    """The app's one sessionmaker; objects stay readable after commit."""
    return async_sessionmaker(engine, expire_on_commit=False)


# Opens one session for a short read (an async_sessionmaker, or StreamSessions).
SessionFactory = Callable[[], AbstractAsyncContextManager[AsyncSession]]


class StreamSessions:
    """Sessions for live log streams' replays, on an engine of their own (issue 16).

    Followers (SSE, GraphQL subscriptions, the panel's tails) read from a pool of `size`
    connections that nothing else uses, so however many replay at once, and however slowly
    their clients read, the runner's lease renewals and the requests' mutations keep their
    pool. A reader past `size` waits for a free connection as long as it takes (a
    semaphore in front of the pool), rather than failing a pool timeout.
    """

    def __init__(self, settings: Settings) -> None:
        size = settings.stream_pool_size
        # They only read, a statement at a time: on PostgreSQL without BEGIN and ROLLBACK,
        # two of the three round trips of a follower's read (each statement sees what is
        # committed, as in a READ COMMITTED transaction). A follower of another process's
        # lines reads after each notification: on a loaded 2-core machine this took the
        # read from ~65 to ~15 ms (benchmarks/scale_out.py, issue 14).
        backend = make_url(settings.resolved_database_url).get_backend_name()
        autocommit = {"isolation_level": "AUTOCOMMIT"} if backend == "postgresql" else {}
        self.engine = create_engine(settings, pool_size=size, max_overflow=0, **autocommit)
        self._sessionmaker = create_sessionmaker(self.engine)
        self._slots = asyncio.Semaphore(size)

    @asynccontextmanager
    async def __call__(self) -> AsyncIterator[AsyncSession]:
        async with self._slots, self._sessionmaker() as session:
            yield session

    async def dispose(self) -> None:
        """Close the pool's connections."""
        await self.engine.dispose()
