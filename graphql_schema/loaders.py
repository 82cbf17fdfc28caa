"""DataLoaders: every nested list costs one query per batch, not one per parent."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, TypeVarTuple

from sqlalchemy import Row, Select, func, select
from strawberry.dataloader import DataLoader

from server.models import (
    Base,
    CommandService,
    CommandTemplate,
    Profile,
    ProfileProxy,
    ProfileService,
    Proxy,
    Service,
    ServiceUsage,
)

if TYPE_CHECKING:
    from graphql_schema import profiles as profile_types
    from graphql_schema import proxies as proxy_types
    from graphql_schema import services as service_types
    from graphql_schema.context import Context

M = TypeVar("M", bound=Base)
Ts = TypeVarTuple("Ts")


@dataclass(frozen=True)
class ProxyUse:
    """A profile's proxies (by name) and its default one, ready to answer."""

    proxies: list[proxy_types.Proxy]
    default: proxy_types.Proxy | None


class Loaders:
    """The request's loaders, built lazily by the context. The profiles' links come back as
    ready GraphQL objects, one object per service and proxy a request (a page of 500
    profiles links the same few services a thousand times)."""

    def __init__(self, context: Context) -> None:
        self._context = context
        self.profile = DataLoader(self._by_id(Profile))
        self.service = DataLoader(self._by_id(Service))
        self.proxy = DataLoader(self._by_id(Proxy))
        self.template = DataLoader(self._by_id(CommandTemplate))
        self.profile_services = DataLoader(self._profile_services)
        self.profile_proxies = DataLoader(self._profile_proxies)
        self.service_profiles = DataLoader(self._service_profiles)
        self.proxy_profiles = DataLoader(self._proxy_profiles)
        self.command_services = DataLoader(self._command_services)
        self.service_usage = DataLoader(self._service_usage)
        self._services: dict[int, service_types.Service] = {}
        self._proxies: dict[int, proxy_types.Proxy] = {}

    def service_node(self, row: Service) -> service_types.Service:
        """The request's GraphQL object of a service row."""
        node = self._services.get(row.id)
        if node is None:
            from graphql_schema.services import Service as ServiceNode

            node = self._services[row.id] = ServiceNode.from_row(row)
        return node

    def proxy_node(self, row: Proxy) -> proxy_types.Proxy:
        """The request's GraphQL object of a proxy row."""
        node = self._proxies.get(row.id)
        if node is None:
            from graphql_schema.proxies import Proxy as ProxyNode

            node = self._proxies[row.id] = ProxyNode.from_row(row)
        return node

    async def _rows(self, stmt: Select[*Ts]) -> Sequence[Row[*Ts]]:
        async with self._context.reading() as session:
            return (await session.execute(stmt)).all()

    def _by_id(self, model: type[M]) -> Any:
        async def load(ids: list[int]) -> list[M | None]:
            rows = await self._rows(select(model).where(model.id.in_(ids)))  # type: ignore[attr-defined]
            found: dict[int, M] = {row[0].id: row[0] for row in rows}  # type: ignore[attr-defined]
            return [found.get(pk) for pk in ids]

        return load

    async def _grouped(self, keys: list[int], stmt: Any) -> list[list[Any]]:
        groups: dict[int, list[Any]] = defaultdict(list)
        for row in await self._rows(stmt):
            key: int = row[0]
            values: tuple[Any, ...] = tuple(row[1:])
            groups[key].append(values[0] if len(values) == 1 else values)
        return [groups.get(key, []) for key in keys]

    async def _profile_services(
        self, ids: list[int]
    ) -> list[list[profile_types.ProfileServiceLink]]:
        from graphql_schema.profiles import ProfileServiceLink

        stmt = (
            select(
                ProfileService.profile_id,
                ProfileService.token_encrypted,
                ProfileService.created_at,
                Service,
            )
            .join(Service, Service.id == ProfileService.service_id)
            .where(ProfileService.profile_id.in_(ids))
            .order_by(Service.name)
        )
        groups: dict[int, list[ProfileServiceLink]] = defaultdict(list)
        for profile_id, token, created_at, service in await self._rows(stmt):
            link = ProfileServiceLink(
                service=self.service_node(service),
                has_token=token is not None,
                created_at=created_at,
                token_encrypted=token,
            )
            groups[profile_id].append(link)
        return [groups.get(key, []) for key in ids]

    async def _profile_proxies(self, ids: list[int]) -> list[ProxyUse]:
        stmt = (
            select(ProfileProxy.profile_id, ProfileProxy.is_default, Proxy)
            .join(Proxy, Proxy.id == ProfileProxy.proxy_id)
            .where(ProfileProxy.profile_id.in_(ids))
            .order_by(Proxy.name)
        )
        proxies: dict[int, list[proxy_types.Proxy]] = defaultdict(list)
        defaults: dict[int, proxy_types.Proxy] = {}
        for profile_id, is_default, proxy in await self._rows(stmt):
            node = self.proxy_node(proxy)
            proxies[profile_id].append(node)
            if is_default:
                defaults.setdefault(profile_id, node)
        return [ProxyUse(proxies.get(key, []), defaults.get(key)) for key in ids]

    async def _service_profiles(self, ids: list[int]) -> list[list[Profile]]:
        stmt = (
            select(ProfileService.service_id, Profile)
            .join(Profile, Profile.id == ProfileService.profile_id)
            .where(ProfileService.service_id.in_(ids))
            .order_by(Profile.name)
        )
        return await self._grouped(ids, stmt)

    async def _proxy_profiles(self, ids: list[int]) -> list[list[Profile]]:
        stmt = (
            select(ProfileProxy.proxy_id, Profile)
            .join(Profile, Profile.id == ProfileProxy.profile_id)
            .where(ProfileProxy.proxy_id.in_(ids))
            .order_by(Profile.name)
        )
        return await self._grouped(ids, stmt)

    async def _command_services(self, ids: list[int]) -> list[list[Service]]:
        stmt = (
            select(CommandService.command_id, Service)
            .join(Service, Service.id == CommandService.service_id)
            .where(CommandService.command_id.in_(ids))
            .order_by(Service.name)
        )
        return await self._grouped(ids, stmt)

    async def _service_usage(self, ids: list[int]) -> list[ServiceUsage | None]:
        """The latest observation of each service's shared token."""
        latest = (
            select(ServiceUsage.service_id, func.max(ServiceUsage.id).label("last_id"))
            .where(ServiceUsage.service_id.in_(ids), ServiceUsage.profile_id.is_(None))
            .group_by(ServiceUsage.service_id)
            .subquery()
        )
        stmt = select(ServiceUsage).join(latest, ServiceUsage.id == latest.c.last_id)
        found = {row[0].service_id: row[0] for row in await self._rows(stmt)}
        return [found.get(pk) for pk in ids]
