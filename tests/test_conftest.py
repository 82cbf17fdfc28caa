"""The suite's own fixtures: what each test may take for granted."""

from __future__ import annotations

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import create_async_engine

from server.db import create_sessionmaker
from server.models import Base, Profile, Proxy
from tests.conftest import _empty_tables


async def test_each_postgresql_test_starts_from_empty_tables_and_first_ids(
    postgres_url: str,
) -> None:
    # Whatever this worker's previous test left (the fixtures empty the tables before a
    # test, not after: a test that made a profile "p" made this one fail at its insert).
    await _empty_tables(postgres_url)
    engine = create_async_engine(postgres_url)
    try:
        async with create_sessionmaker(engine)() as session:
            session.add(Profile(name="p"))
            hop = Proxy(name="hop", protocol="socks5", host="127.0.0.1", port=1080)
            session.add(hop)
            await session.flush()
            # A row that references another of its own table (emptied all the same).
            session.add(
                Proxy(name="via", protocol="http", host="127.0.0.1", port=3128, via_id=hop.id)
            )
            await session.commit()
        await _empty_tables(postgres_url)
        async with create_sessionmaker(engine)() as session:
            for table in Base.metadata.sorted_tables:
                count = await session.scalar(select(func.count()).select_from(table))
                assert count == 0, table.name
            again = Proxy(name="again", protocol="socks5", host="127.0.0.1", port=1080)
            session.add_all([Profile(name="again"), again])
            await session.flush()
            assert again.id == 1  # the ids start again
            await session.rollback()
    finally:
        await engine.dispose()
        await _empty_tables(postgres_url)
