"""The one Alembic tree goes up and down from empty on SQLite and on PostgreSQL."""

from pathlib import Path
from typing import Any

import pytest
from sqlalchemy import inspect

from server import migrate
from server.db import create_engine
from server.models import Base
from server.settings import Settings
from tests.conftest import TEST_KEY


@pytest.fixture(params=["sqlite", "postgresql"])
def empty_database(request: pytest.FixtureRequest, tmp_path: Path) -> Settings:
    if request.param == "sqlite":
        return Settings(data_dir=tmp_path, secret_key=TEST_KEY)
    url = request.getfixturevalue("postgres_databases")("corral_migration")
    return Settings(database_url=url, secret_key=TEST_KEY)


async def _tables(settings: Settings) -> set[str]:
    engine = create_engine(settings)
    try:
        async with engine.connect() as connection:
            names: Any = await connection.run_sync(lambda c: inspect(c).get_table_names())
            return set(names) - {"alembic_version"}
    finally:
        await engine.dispose()


async def test_migrations_up_down_up(empty_database: Settings) -> None:
    engine = create_engine(empty_database)
    try:
        assert await migrate.current_revision(engine) is None
        await migrate.upgrade(engine)
        assert await migrate.is_up_to_date(engine)
        assert await _tables(empty_database) == set(Base.metadata.tables)

        await migrate.downgrade(engine, "base")
        assert await migrate.current_revision(engine) is None
        assert await _tables(empty_database) == set()

        await migrate.upgrade(engine)
        assert await migrate.current_revision(engine) == migrate.head_revision()
    finally:
        await engine.dispose()


async def test_models_match_the_migrations(empty_database: Settings) -> None:
    """Autogenerate finds nothing to add: the models and the tree agree."""
    from alembic.autogenerate import compare_metadata
    from alembic.migration import MigrationContext

    engine = create_engine(empty_database)
    try:
        await migrate.upgrade(engine)
        async with engine.connect() as connection:
            diff = await connection.run_sync(
                lambda c: compare_metadata(MigrationContext.configure(c), Base.metadata)
            )
        assert diff == []
    finally:
        await engine.dispose()
