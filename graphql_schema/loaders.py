"""DataLoaders: every nested list costs one query per batch, not one per parent."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, TypeVar, TypeVarTuple

from sqlalchemy import Row, Select, and_, bindparam, func, select
from sqlalchemy.orm import aliased
from strawberry.dataloader import DataLoader
from strawberry.scalars import JSON

from server.models import (
    Base,
    CommandService,
    CommandTemplate,
    Profile,
    ProfileProxy,
    ProfileService,
    Proxy,
    ProxyCheck,
    Service,
    ServiceUsage,
)
from server.usage import Point as UsagePoint
from server.usage import history_since

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


def _each_target_once(
    link_columns: list[Any], target_id: Any, target: type[Service] | type[Proxy], ids: Any
) -> Select[Any]:
    """The links of the profiles `ids` (`link_columns`, then `target_id`), ordered by their
    target's name, each with its target row on the first of its links only (None on the
    others): one statement still, but a page of 500 profiles linked to the same few
    services no longer reads and decodes each service's row (its JSON, its times) once a
    link (issue 16)."""
    profile_id = link_columns[0]
    numbered = (
        select(
            *link_columns,
            target_id,
            func.row_number().over(partition_by=target_id, order_by=profile_id).label("nth"),
        )
        .where(profile_id.in_(ids))
        .subquery()
    )
    names = aliased(target)
    linked_id = numbered.c[target_id.key]
    return (
        select(*(numbered.c[column.key] for column in link_columns), linked_id, target)
        .join(names, names.id == linked_id)
        .outerjoin(target, and_(target.id == linked_id, numbered.c.nth == 1))
        .order_by(names.name)
    )


# The profiles' links, built once (with the profile ids as an expanding parameter): a page
# built these statements' subquery, aliases and joins anew each time (issue 16).
_LINK_COLUMNS = [
    ProfileService.profile_id,
    ProfileService.token_encrypted,
    ProfileService.rate_limit_policy,
    ProfileService.created_at,
]
_LINKS_TO_SERVICES = _each_target_once(
    _LINK_COLUMNS, ProfileService.service_id, Service, bindparam("ids", expanding=True)
)
_PROXY_USES = _each_target_once(
    [ProfileProxy.profile_id, ProfileProxy.is_default],
    ProfileProxy.proxy_id,
    Proxy,
    bindparam("ids", expanding=True),
)


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
        self.profile_services = DataLoader(self.links_to_services)
        self.profile_proxies = DataLoader(self.proxy_uses)
        self.service_profiles = DataLoader(self._service_profiles)
        self.proxy_profiles = DataLoader(self._proxy_profiles)
        self.command_services = DataLoader(self._command_services)
        self.service_usage = DataLoader(self._service_usage)
        self.proxy_checks = DataLoader(self._proxy_checks)
        self.own_token_usage = DataLoader(self._own_token_usage)
        self.usage_history = DataLoader(self._usage_history)
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

    async def _rows(
        self, stmt: Select[*Ts], params: dict[str, Any] | None = None
    ) -> Sequence[Row[*Ts]]:
        async with self._context.reading() as session:
            return (await session.execute(stmt, params)).all()

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

    async def links_to_services(
        self, ids: list[int]
    ) -> list[list[profile_types.ProfileServiceLink]]:
        """The service links of each profile of `ids`, in one statement (also the batch of
        `profile_services`; a page calls it directly, without a future per profile)."""
        from graphql_schema.profiles import ProfileServiceLink

        rows: Sequence[Any] = await self._rows(_LINKS_TO_SERVICES, {"ids": ids})
        nodes = {row[-1].id: self.service_node(row[-1]) for row in rows if row[-1] is not None}
        groups: dict[int, list[ProfileServiceLink]] = defaultdict(list)
        for profile_id, token, policy, created_at, service_id, _service in rows:
            groups[profile_id].append(
                ProfileServiceLink(
                    service=nodes[service_id],
                    has_token=token is not None,
                    rate_limit_policy=JSON(policy or {}),
                    created_at=created_at,
                    token_encrypted=token,
                    profile_id=profile_id,
                )
            )
        return [groups.get(key, []) for key in ids]

    async def proxy_uses(self, ids: list[int]) -> list[ProxyUse]:
        """The proxies of each profile of `ids`, in one statement (also the batch of
        `profile_proxies`)."""
        rows: Sequence[Any] = await self._rows(_PROXY_USES, {"ids": ids})
        nodes = {row[-1].id: self.proxy_node(row[-1]) for row in rows if row[-1] is not None}
        proxies: dict[int, list[proxy_types.Proxy]] = defaultdict(list)
        defaults: dict[int, proxy_types.Proxy] = {}
        for profile_id, is_default, proxy_id, _proxy in rows:
            node = nodes[proxy_id]
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

    async def _proxy_checks(self, keys: list[tuple[int, int]]) -> list[list[ProxyCheck]]:
        """The last checks of each proxy, newest first (keys: (proxy id, how many)), one
        statement per distinct count asked for."""
        found: dict[tuple[int, int], list[ProxyCheck]] = defaultdict(list)
        for last in {last for _, last in keys}:
            ids = [proxy_id for proxy_id, wanted in keys if wanted == last]
            numbered = (
                select(
                    ProxyCheck.id,
                    func.row_number()
                    .over(partition_by=ProxyCheck.proxy_id, order_by=ProxyCheck.id.desc())
                    .label("nth"),
                )
                .where(ProxyCheck.proxy_id.in_(ids))
                .subquery()
            )
            stmt = (
                select(ProxyCheck)
                .join(numbered, numbered.c.id == ProxyCheck.id)
                .where(numbered.c.nth <= last)
                .order_by(ProxyCheck.proxy_id, ProxyCheck.id.desc())
            )
            for (check,) in await self._rows(stmt):
                found[(check.proxy_id, last)].append(check)
        return [found.get(key, []) for key in keys]

    async def _own_token_usage(self, keys: list[tuple[int, int]]) -> list[ServiceUsage | None]:
        """The latest observation of each (service, profile)'s own token."""
        service_ids = {service_id for service_id, _ in keys}
        profile_ids = {profile_id for _, profile_id in keys}
        latest = (
            select(func.max(ServiceUsage.id).label("last_id"))
            .where(
                ServiceUsage.service_id.in_(service_ids),
                ServiceUsage.profile_id.in_(profile_ids),
            )
            .group_by(ServiceUsage.service_id, ServiceUsage.profile_id)
            .subquery()
        )
        stmt = select(ServiceUsage).join(latest, ServiceUsage.id == latest.c.last_id)
        found = {(row[0].service_id, row[0].profile_id): row[0] for row in await self._rows(stmt)}
        return [found.get(key) for key in keys]

    async def _usage_history(
        self, keys: list[tuple[int, datetime]]
    ) -> list[list[tuple[Profile | None, list[UsagePoint]]]]:
        """Each service's observations since its key's time, per token (the shared one
        first, then profiles by name), in one statement per distinct `since`."""
        by_since: dict[datetime, list[int]] = defaultdict(list)
        for service_id, since in keys:
            by_since[since].append(service_id)
        answers: dict[tuple[int, datetime], list[tuple[Profile | None, list[UsagePoint]]]] = {}
        for since, service_ids in by_since.items():
            answers |= {
                (service_id, since): tokens
                for service_id, tokens in (await self._history_since(service_ids, since)).items()
            }
        return [answers.get(key, []) for key in keys]

    async def _history_since(
        self, service_ids: list[int], since: datetime
    ) -> dict[int, list[tuple[Profile | None, list[UsagePoint]]]]:
        async with self._context.reading() as session:
            return await history_since(session, service_ids, since)
