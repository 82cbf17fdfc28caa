"""The per-request GraphQL context: settings, one DB session (serialised), secrets, loaders."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncSession
from strawberry.types import Info as StrawberryInfo

from server.access import PRINCIPAL_SCOPE_KEY
from server.app_services import AppServices
from server.auth import Principal
from server.broker import Broker
from server.secretbox import SecretBox, token_preview
from server.settings import Settings
from server.unit_of_work import unit_of_work

if TYPE_CHECKING:
    from graphql_schema.loaders import Loaders


class RequestFinished(RuntimeError):
    """The request's session was asked for after the request ended."""


@dataclass
class Context:
    """One request's context. GraphQL resolves fields concurrently, and an AsyncSession
    allows one operation at a time, so every use of the session holds `lock` (closing too).

    Some work can outlive the response: graphql-core settles sibling fields of a field that
    failed in the background, and a DataLoader batch whose callers were cancelled is
    cancelled but never awaited. Such work still holds or wants the session when the
    request ends, so `close` waits for the lock, and the session is not reopened after it.
    """

    app: AppServices
    request: Any = None
    response: Any = None
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    _session: AsyncSession | None = None
    _principal: Principal | None = None
    _loaders: Loaders | None = None
    _closed: bool = False
    _previews: dict[bytes, str] = field(default_factory=dict)

    @property
    def settings(self) -> Settings:
        return self.app.settings

    @property
    def secret_box(self) -> SecretBox:
        return self.app.secret_box

    def token_preview(self, ciphertext: bytes | None) -> str | None:
        """The preview of a stored token (None when there is none), decrypted once a
        request: a service's shared token is on every profile linked to it."""
        if ciphertext is None:
            return None
        preview = self._previews.get(ciphertext)
        if preview is None:
            preview = self._previews[ciphertext] = token_preview(
                self.secret_box.decrypt(ciphertext)
            )
        return preview

    @property
    def principal(self) -> Principal | None:
        """Who this request acts as (None only before a WebSocket's connection_init)."""
        if self._principal is not None:
            return self._principal
        scope = getattr(self.request, "scope", None)
        return None if scope is None else scope.get(PRINCIPAL_SCOPE_KEY)

    @principal.setter
    def principal(self, value: Principal | None) -> None:
        self._principal = value

    @property
    def broker(self) -> Broker:
        return self.app.broker

    @property
    def session(self) -> AsyncSession:
        """The request's session, opened on first use (closed by `close`)."""
        if self._closed:
            raise RequestFinished("the request is over; its database session is closed")
        if self._session is None:
            self._session = self.app.sessionmaker()
        return self._session

    @property
    def loaders(self) -> Loaders:
        if self._loaders is None:
            from graphql_schema.loaders import Loaders

            self._loaders = Loaders(self)
        return self._loaders

    @asynccontextmanager
    async def reading(self) -> AsyncIterator[AsyncSession]:
        """The session, held alone for one read. The transaction ends with the read, so a
        request never holds SQLite's lock while it does something slow (a proxy check)."""
        async with self.lock:
            try:
                yield self.session
            except BaseException:
                # Not a commit: after a lost connection it raised PendingRollbackError,
                # which hid the error that says the database is away.
                await self.session.rollback()
                raise
            await self.session.commit()

    @asynccontextmanager
    async def writing(self) -> AsyncIterator[AsyncSession]:
        """A unit of work (`server.unit_of_work`): commit on success and announce what it
        wrote; roll back on InvalidInput or a constraint race."""
        async with self.lock, unit_of_work(self.session, self.broker) as session:
            yield session
        # Fresh loaders: the payload must show what was just written, not cached rows.
        self._loaders = None

    async def close(self) -> None:
        """Close the session once no one holds it; later uses raise RequestFinished."""
        async with self.lock:
            self._closed = True
            if self._session is not None:
                await self._session.close()
                self._session = None


Info = StrawberryInfo[Context, None]
