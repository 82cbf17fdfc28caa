"""GraphQL: proxies (credentials write-only), chains and profiles' use of them."""

from __future__ import annotations

import enum
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any

import strawberry
from graphql import GraphQLError
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from strawberry.scalars import JSON

from graphql_schema.context import Info
from graphql_schema.limits import CountedList
from graphql_schema.mutation import perform, provided
from graphql_schema.relay import (
    Connection,
    DeletePayload,
    Node,
    UserError,
    encode_id,
    optional_pk,
    paginate,
    pk_of,
)
from server import models
from server import proxies as proxy_domain
from server.proxy_health import PROXY_CHECKS_KEPT, is_flagged
from server.routing import initial_rules, set_routing_rules
from xray.binary import installed_binary

if TYPE_CHECKING:
    from graphql_schema.profiles import Profile

ProfileRef = Annotated["Profile", strawberry.lazy("graphql_schema.profiles")]


@strawberry.enum
class ProxyProtocol(enum.Enum):
    HTTP = "http"
    HTTPS = "https"
    SOCKS5 = "socks5"
    SHADOWSOCKS = "shadowsocks"
    VMESS = "vmess"
    VLESS = "vless"
    TROJAN = "trojan"


@strawberry.type(description="The last health check of a proxy.")
class ProxyHealth:
    ok: bool
    latency_ms: float | None
    error: str | None
    exit_ip: str | None
    checked_at: datetime
    binary: str | None = strawberry.field(
        description="The proxy binary of this host that sidecars and checks use, with its "
        "version (`xray 1.8.24`, `v2ray 4.34.0`); null when none is installed."
    )


@strawberry.enum(description="What started a proxy health check.")
class ProxyCheckTrigger(enum.Enum):
    SCHEDULE = "schedule"
    MANUAL = "manual"


@strawberry.type(description="One health check of a proxy (its history keeps the last 50).")
class ProxyCheck:
    checked_at: datetime
    ok: bool
    latency_ms: float | None
    exit_ip: str | None
    error: str | None
    trigger: ProxyCheckTrigger

    @classmethod
    def from_row(cls, row: models.ProxyCheck) -> ProxyCheck:
        return cls(
            checked_at=row.checked_at,
            ok=row.ok,
            latency_ms=row.latency_ms,
            exit_ip=row.exit_ip,
            error=row.error,
            trigger=ProxyCheckTrigger(row.trigger),
        )


@strawberry.enum(description="Where a routing rule sends what it matches.")
class RoutingAction(enum.Enum):
    PROXY = "PROXY"
    VIA = "VIA"
    DIRECT = "DIRECT"
    BLOCK = "BLOCK"


@strawberry.type(description="A routing rule: what it matches (all given parts) and where it goes.")
class RoutingRule:
    domains: list[str] = strawberry.field(
        description="Xray domain matchers: full:, domain:, keyword:, regexp:, geosite:."
    )
    ips: list[str] = strawberry.field(description="Addresses, CIDRs or geoip:cc.")
    ports: str | None = strawberry.field(description="e.g. 443, 1000-2000 or 80,443.")
    network: str | None = strawberry.field(description="tcp, udp or tcp,udp.")
    action: RoutingAction
    via_proxy_id: strawberry.Private[int | None]

    @strawberry.field(description="The proxy a VIA rule goes through (its own chain).")
    async def via_proxy(self, info: Info) -> Proxy | None:
        if self.via_proxy_id is None:
            return None
        row = await info.context.loaders.proxy.load(self.via_proxy_id)
        return None if row is None else Proxy.from_row(row)

    @classmethod
    def from_stored(cls, rule: dict[str, Any]) -> RoutingRule:
        return cls(
            domains=list(rule.get("domains") or []),
            ips=list(rule.get("ips") or []),
            ports=rule.get("ports"),
            network=rule.get("network"),
            action=RoutingAction(rule.get("action", "PROXY")),
            via_proxy_id=rule.get("via_proxy_id"),
        )


@strawberry.type(description="An upstream proxy; chained through `via` when set.")
class Proxy(Node):
    id: strawberry.ID
    name: str
    protocol: ProxyProtocol
    host: str
    port: int
    has_credentials: bool = strawberry.field(description="Credentials are write-only.")
    settings: JSON = strawberry.field(description="Transport/TLS settings (no secrets).")
    created_at: datetime
    updated_at: datetime
    row: strawberry.Private[models.Proxy]

    @classmethod
    def from_row(cls, row: models.Proxy) -> Proxy:
        return cls(
            id=encode_id("Proxy", row.id),
            name=row.name,
            protocol=ProxyProtocol(row.protocol),
            host=row.host,
            port=row.port,
            has_credentials=row.credentials_encrypted is not None,
            settings=JSON(row.settings),
            created_at=row.created_at,
            updated_at=row.updated_at,
            row=row,
        )

    @strawberry.field(description="The proxy this hop is dialed through.")
    async def via(self, info: Info) -> Proxy | None:
        if self.row.via_id is None:
            return None
        row = await info.context.loaders.proxy.load(self.row.via_id)
        return None if row is None else Proxy.from_row(row)

    @strawberry.field(
        description="Ordered, first match wins; a new proxy starts with the default block "
        "list; what no rule matches goes through this proxy's chain."
    )
    def routing_rules(self) -> list[RoutingRule]:
        return [RoutingRule.from_stored(rule) for rule in self.row.routing_rules]

    @strawberry.field
    def health(self, info: Info) -> ProxyHealth | None:
        row = self.row
        if row.health_checked_at is None or row.health_ok is None:
            return None
        return ProxyHealth(
            ok=row.health_ok,
            latency_ms=row.health_latency_ms,
            error=row.health_error,
            exit_ip=row.health_exit_ip,
            checked_at=row.health_checked_at,
            binary=_binary_label(info.context.settings.xray_bin),
        )

    @strawberry.field(
        description="Its last health checks, newest first (scheduled and on demand).",
        extensions=[CountedList()],
    )
    async def checks(self, info: Info, last: int = 10) -> list[ProxyCheck]:
        if not 1 <= last <= PROXY_CHECKS_KEPT:
            raise GraphQLError(f"last must be between 1 and {PROXY_CHECKS_KEPT}")
        rows = await info.context.loaders.proxy_checks.load((self.row.id, last))
        return [ProxyCheck.from_row(row) for row in rows]

    @strawberry.field(description="Health checks failed in a row (0 after a passing one).")
    def consecutive_failures(self) -> int:
        return self.row.health_failures or 0

    @strawberry.field(
        description="It failed its last CORRAL_PROXY_FLAG_AFTER checks in a row; with "
        "CORRAL_HOLD_ON_FLAGGED_PROXY, runs through it wait until a check passes."
    )
    def flagged(self, info: Info) -> bool:
        return is_flagged(self.row, info.context.settings.proxy_flag_after)

    @strawberry.field(description="When the schedule checks it next (null: not scheduled yet).")
    def next_check_at(self) -> datetime | None:
        return self.row.next_check_at

    @strawberry.field(description="Profiles that may use this proxy.", extensions=[CountedList()])
    async def profiles(self, info: Info) -> list[ProfileRef]:
        from graphql_schema.profiles import Profile

        rows = await info.context.loaders.proxy_profiles.load(self.row.id)
        return [Profile.from_row(row) for row in rows]


def _binary_label(setting: str | None) -> str | None:
    binary = installed_binary(setting)
    return None if binary is None else binary.label


PROTOCOL_HELP = "http, https, socks5, shadowsocks, vmess, vless or trojan (any case)."
CREDENTIAL_HELP = (
    "Write-only. The password (http/https/socks5/shadowsocks/trojan) or the user UUID "
    "(vmess/vless); null removes it."
)


@strawberry.input
class CreateProxyInput:
    name: str
    protocol: str = strawberry.field(description=PROTOCOL_HELP)
    host: str
    port: int
    username: str | None = strawberry.field(default=strawberry.UNSET, description="Write-only.")
    password: str | None = strawberry.field(default=strawberry.UNSET, description=CREDENTIAL_HELP)
    settings: JSON | None = strawberry.UNSET
    via_id: strawberry.ID | None = strawberry.field(
        default=strawberry.UNSET, description="Dial this proxy through another one."
    )


@strawberry.input
class UpdateProxyInput:
    id: strawberry.ID
    name: str | None = strawberry.UNSET
    protocol: str | None = strawberry.field(default=strawberry.UNSET, description=PROTOCOL_HELP)
    host: str | None = strawberry.UNSET
    port: int | None = strawberry.UNSET
    username: str | None = strawberry.field(default=strawberry.UNSET, description="Write-only.")
    password: str | None = strawberry.field(default=strawberry.UNSET, description=CREDENTIAL_HELP)
    settings: JSON | None = strawberry.UNSET
    via_id: strawberry.ID | None = strawberry.UNSET


@strawberry.input
class AttachProxyInput:
    profile_id: strawberry.ID
    proxy_id: strawberry.ID
    is_default: bool | None = strawberry.field(
        default=None,
        description="Make it the profile's default (unset: only when it has none yet).",
    )


@strawberry.input(description="A routing rule; give at least one of domains, ips, ports, network.")
class RoutingRuleInput:
    domains: list[str] = strawberry.field(default_factory=list)
    ips: list[str] = strawberry.field(default_factory=list)
    ports: str | None = None
    network: str | None = None
    action: RoutingAction = RoutingAction.PROXY
    via_proxy_id: strawberry.ID | None = strawberry.field(
        default=None, description="The proxy of a VIA rule."
    )


@strawberry.input
class SetRoutingRulesInput:
    proxy_id: strawberry.ID
    rules: list[RoutingRuleInput]


def _stored_rules(data: SetRoutingRulesInput) -> list[dict[str, Any]]:
    return [
        {
            "domains": rule.domains,
            "ips": rule.ips,
            "ports": rule.ports,
            "network": rule.network,
            "action": rule.action.value,
            "via_proxy_id": optional_pk(
                rule.via_proxy_id, "Proxy", field=f"rules.{index}.viaProxyId"
            ),
        }
        for index, rule in enumerate(data.rules)
    ]


@strawberry.type
class ProxyPayload:
    proxy: Proxy | None = None
    user_errors: list[UserError] = strawberry.field(default_factory=list)


@strawberry.type
class AttachProxyPayload:
    profile: ProfileRef | None = None
    proxy: Proxy | None = None
    user_errors: list[UserError] = strawberry.field(default_factory=list)


async def resolve_proxies(
    info: Info, first: int | None = None, after: str | None = None
) -> Connection[Proxy]:
    """Proxies by creation order."""
    return await paginate(info, select(models.Proxy), models.Proxy.id, Proxy.from_row, first, after)


def _proxy_values(data: CreateProxyInput | UpdateProxyInput) -> dict[str, object]:
    values = provided(data)
    if "viaId" in values:
        values["viaId"] = optional_pk(values["viaId"], "Proxy", field="viaId")
    return values


async def _profile_and_proxy(
    session: AsyncSession, profile_pk: int, proxy_pk: int
) -> tuple[models.Profile, models.Proxy]:
    return (
        await session.get_one(models.Profile, profile_pk),
        await session.get_one(models.Proxy, proxy_pk),
    )


def _attach_payload(
    result: tuple[models.Profile, models.Proxy] | None, errors: list[UserError]
) -> AttachProxyPayload:
    from graphql_schema.profiles import Profile

    if result is None:
        return AttachProxyPayload(user_errors=errors)
    return AttachProxyPayload(profile=Profile.from_row(result[0]), proxy=Proxy.from_row(result[1]))


@strawberry.type
class ProxyMutations:
    @strawberry.mutation
    async def create_proxy(self, info: Info, input: CreateProxyInput) -> ProxyPayload:
        box, settings = info.context.secret_box, info.context.settings

        async def work(session: AsyncSession) -> models.Proxy:
            rules, binary = initial_rules(settings), installed_binary(settings.xray_bin)
            return await proxy_domain.create_proxy(
                session, box, _proxy_values(input), routing_rules=rules, binary=binary
            )

        row, errors = await perform(info, work)
        return ProxyPayload(proxy=None if row is None else Proxy.from_row(row), user_errors=errors)

    @strawberry.mutation
    async def update_proxy(self, info: Info, input: UpdateProxyInput) -> ProxyPayload:
        box, binary = info.context.secret_box, installed_binary(info.context.settings.xray_bin)

        async def work(session: AsyncSession) -> models.Proxy:
            pk = pk_of(input.id, "Proxy", field="id")
            values = _proxy_values(input)
            return await proxy_domain.update_proxy(session, box, pk, values, binary=binary)

        row, errors = await perform(info, work)
        return ProxyPayload(proxy=None if row is None else Proxy.from_row(row), user_errors=errors)

    @strawberry.mutation(
        description="Delete a proxy; profiles using it are detached (see notices)."
    )
    async def delete_proxy(self, info: Info, id: strawberry.ID) -> DeletePayload:
        async def work(session: AsyncSession) -> list[str]:
            return await proxy_domain.delete_proxy(session, pk_of(id, "Proxy", field="id"))

        notices, errors = await perform(info, work)
        if errors:
            return DeletePayload(user_errors=errors)
        return DeletePayload(deleted_id=id, notices=notices or [])

    @strawberry.mutation(description="Let a profile use a proxy.")
    async def attach_proxy(self, info: Info, input: AttachProxyInput) -> AttachProxyPayload:
        async def work(session: AsyncSession) -> tuple[models.Profile, models.Proxy]:
            profile_pk = pk_of(input.profile_id, "Profile", field="profileId")
            proxy_pk = pk_of(input.proxy_id, "Proxy", field="proxyId")
            await proxy_domain.attach_proxy(session, profile_pk, proxy_pk, input.is_default)
            return await _profile_and_proxy(session, profile_pk, proxy_pk)

        return _attach_payload(*await perform(info, work))

    @strawberry.mutation(description="Stop a profile from using a proxy.")
    async def detach_proxy(
        self, info: Info, profile_id: strawberry.ID, proxy_id: strawberry.ID
    ) -> AttachProxyPayload:
        async def work(session: AsyncSession) -> tuple[models.Profile, models.Proxy]:
            profile_pk = pk_of(profile_id, "Profile", field="profileId")
            proxy_pk = pk_of(proxy_id, "Proxy", field="proxyId")
            await proxy_domain.detach_proxy(session, profile_pk, proxy_pk)
            return await _profile_and_proxy(session, profile_pk, proxy_pk)

        return _attach_payload(*await perform(info, work))


@strawberry.type
class ImportProxiesPayload:
    proxies: list[Proxy] = strawberry.field(default_factory=list)
    user_errors: list[UserError] = strawberry.field(default_factory=list)


@strawberry.type
class ProxyImportMutations:
    @strawberry.mutation(
        description="Import share links (vless, vmess, trojan, ss, socks5, http(s)); each bad "
        "link is its own userError (field [links, index]), the good ones are created."
    )
    async def import_proxies(self, info: Info, links: list[str]) -> ImportProxiesPayload:
        box, settings = info.context.secret_box, info.context.settings
        rules, binary = initial_rules(settings), installed_binary(settings.xray_bin)
        async with info.context.writing() as session:
            created, errors = await proxy_domain.import_proxies(
                session, box, links, routing_rules=rules, binary=binary
            )
        return ImportProxiesPayload(
            proxies=[Proxy.from_row(row) for row in created],
            user_errors=[UserError.from_value(error) for error in errors],
        )

    @strawberry.mutation(
        description="Replace a proxy's routing rules (ordered, first match wins); refused "
        "whole when a rule is malformed or the installed Xray binary cannot run it."
    )
    async def set_routing_rules(self, info: Info, input: SetRoutingRulesInput) -> ProxyPayload:
        ctx = info.context

        async def work(session: AsyncSession) -> models.Proxy:
            pk = pk_of(input.proxy_id, "Proxy", field="proxyId")
            rules = _stored_rules(input)
            return await set_routing_rules(session, ctx.settings, ctx.secret_box, pk, rules)

        row, errors = await perform(info, work)
        return ProxyPayload(proxy=None if row is None else Proxy.from_row(row), user_errors=errors)

    @strawberry.mutation(description="Fetch the check URL through the proxy now; record health.")
    async def check_proxy(self, info: Info, id: strawberry.ID) -> ProxyPayload:
        ctx = info.context

        async def work(session: AsyncSession) -> models.Proxy:
            pk = pk_of(id, "Proxy", field="id")
            return await proxy_domain.check_proxy(
                session, ctx.app.sessionmaker, ctx.settings, ctx.secret_box, pk
            )

        row, errors = await perform(info, work)
        return ProxyPayload(proxy=None if row is None else Proxy.from_row(row), user_errors=errors)
