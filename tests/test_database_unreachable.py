"""`database_unreachable`: the API's word for "the database is away" (UNAVAILABLE, a 503)
is said only of errors the database stack raised, not of every OSError or timeout."""

from __future__ import annotations

import asyncio
import socket
from pathlib import Path

import pytest
from sqlalchemy import text
from sqlalchemy.ext.asyncio import create_async_engine

from runner.store_errors import database_unreachable, raised_by_database, retryable_database_error


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])  # closed again when the block ends


async def _error_of_a_database_that_is_away() -> BaseException:
    url = f"postgresql+asyncpg://postgres@127.0.0.1:{_closed_port()}/nothing"
    engine = create_async_engine(url)
    try:
        async with engine.connect() as connection:
            await connection.execute(text("SELECT 1"))
    except Exception as exc:
        return exc
    finally:
        await engine.dispose()
    raise AssertionError("a closed port answered")


async def test_a_refused_database_connection_is_unreachable() -> None:
    error = await _error_of_a_database_that_is_away()
    assert isinstance(error, OSError)  # raised by the driver's connect, as our own would be
    assert raised_by_database(error)
    assert database_unreachable(error)


async def test_our_own_oserrors_and_timeouts_are_not_the_database(tmp_path: Path) -> None:
    try:
        (tmp_path / "missing" / "file").read_text()
    except OSError as exc:
        missing = exc
    try:
        async with asyncio.timeout(0.01):
            await asyncio.sleep(1)
    except TimeoutError as exc:
        slow = exc
    for error in (missing, slow):
        assert retryable_database_error(error)  # the runner's store: only database work
        assert not raised_by_database(error)
        assert not database_unreachable(error)


def test_a_refused_statement_is_not_unreachable() -> None:
    import sqlite3

    connection = sqlite3.connect(":memory:")
    with pytest.raises(sqlite3.OperationalError) as refused:
        connection.execute("SELECT * FROM no_such_table")
    assert not database_unreachable(refused.value)
