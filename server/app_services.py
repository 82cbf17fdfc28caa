"""What the app hands every request (AppServices) and who a subscriber counts against
(client_key): shared by GraphQL and the HTTP/SSE/panel routes, which import no GraphQL."""

from __future__ import annotations

from dataclasses import dataclass, field

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.requests import HTTPConnection

from runner.renderpool import RenderPool
from server.access import PRINCIPAL_SCOPE_KEY
from server.auth import Principal, TokenHasher
from server.broker import Broker
from server.db import SessionFactory
from server.metrics import Metrics
from server.secretbox import SecretBox
from server.settings import Settings
from server.stream_pages import SharedPages
from server.subscribers import SubscriberLimits


@dataclass
class AppServices:
    """What the app hands every request: settings, sessions, key ring, template renderer,
    broker, metrics."""

    settings: Settings
    sessionmaker: async_sessionmaker[AsyncSession]
    secret_box: SecretBox
    render_pool: RenderPool
    token_hasher: TokenHasher
    broker: Broker = field(default_factory=Broker)
    metrics: Metrics = field(default_factory=Metrics)
    subscriber_limits: SubscriberLimits = field(init=False)
    stream_reads: SessionFactory | None = None  # live streams' own pool (server.db)
    replay_pages: SharedPages = field(default_factory=SharedPages)  # followers' shared reads

    def __post_init__(self) -> None:
        self.subscriber_limits = SubscriberLimits(
            self.settings.max_subscribers, self.settings.max_subscribers_per_client
        )

    @property
    def stream_sessions(self) -> SessionFactory:
        """Sessions for live streams' reads: their own pool (the app's sessionmaker when
        none was given)."""
        return self.stream_reads or self.sessionmaker

    @property
    def follow_poll_seconds(self) -> float | None:
        """Live followers also re-read the database this often on PostgreSQL: a safety net
        under LISTEN/NOTIFY (server.pgbroker). None on SQLite (one process)."""
        bind = self.sessionmaker.kw.get("bind")
        if bind is None or bind.dialect.name == "sqlite":
            return None
        return self.settings.follow_poll_seconds


def client_key(connection: HTTPConnection | None, principal: Principal | None = None) -> str:
    """Who a subscriber counts against: its credential (the API token, else the user) when
    it has one, whatever address it comes from (`principal`, else the one the request's
    scope carries); the client's address otherwise (behind a reverse proxy, run uvicorn
    with --proxy-headers)."""
    if principal is None and connection is not None:
        principal = connection.scope.get(PRINCIPAL_SCOPE_KEY)
    if principal is not None and principal.token_id is not None:
        return f"token:{principal.token_id}"
    if principal is not None and principal.user_id is not None:
        return f"user:{principal.user_id}"
    client = None if connection is None else connection.client
    return f"address:{client.host if client is not None else 'unknown'}"
