"""The models' typed columns, on SQLite and PostgreSQL."""

from __future__ import annotations

from sqlalchemy import select, text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from server.models import (
    ApiToken,
    Command,
    CommandStatus,
    Proxy,
    ProxyProtocol,
    Role,
    Service,
    ServiceUsage,
    UsageSource,
    User,
)


async def test_enum_columns_read_back_as_members_and_store_their_values(
    sessionmaker: async_sessionmaker[AsyncSession],
) -> None:
    async with sessionmaker() as session, session.begin():
        service = Service(name="gh", env_var="GH_TOKEN", settings={})
        session.add_all(
            [
                Command(source="x", argv=["x"], status=CommandStatus.TIMED_OUT),
                Proxy(name="p", protocol=ProxyProtocol.SOCKS5, host="h", port=1, settings={}),
                User(name="u", password_hash="x", role=Role.VIEWER),
                ApiToken(name="t", role=Role.ADMIN, token_hash="h", preview="p"),
                service,
            ]
        )
        await session.flush()
        session.add(ServiceUsage(service_id=service.id, source=UsageSource.PROBE))
    async with sessionmaker() as session:
        # What the columns hold is the values, as raw SQL (the runner's statements) reads them.
        raw = await session.execute(
            text(
                "SELECT c.status, p.protocol, u.role, t.role, s.source FROM commands c,"
                " proxies p, users u, api_tokens t, service_usage s"
            )
        )
        assert tuple(raw.one()) == ("TIMED_OUT", "socks5", "viewer", "admin", "probe")
        # The ORM gives the members back, and compares and filters with them.
        command = await session.scalar(
            select(Command).where(Command.status == CommandStatus.TIMED_OUT)
        )
        assert command is not None
        assert command.status is CommandStatus.TIMED_OUT
        assert command.status.is_final
        assert (await session.scalar(select(Proxy.protocol))) is ProxyProtocol.SOCKS5
        assert (await session.scalar(select(User.role))) is Role.VIEWER
        assert (await session.scalar(select(ApiToken.role))) is Role.ADMIN
        assert (await session.scalar(select(ServiceUsage.source))) is UsageSource.PROBE
