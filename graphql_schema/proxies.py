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
from graphql_schema.enums import ProxyProtocol
from graphql_schema.limits import CountedList
from graphql_schema.mutation import optional_input, perform, provided
from graphql_schema.relay import (
    USER_ERRORS,
    After,
    Connection,
    DeletePayload,
    First,
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


ProxyIdArg = Annotated[strawberry.ID, strawberry.argument(description="The proxy's ID.")]


@strawberry.type(description="The last health check of a proxy.")
class ProxyHealth:
    ok: bool = strawberry.field(description="The check URL answered through the proxy.")
    latency_ms: float | None = strawberry.field(
        description="How long the check's fetch took, in milliseconds (null: it failed)."
    )
    error: str | None = strawberry.field(description="Why the check failed, in words.")
    exit_ip: str | None = strawberry.field(
        description="The address the check URL saw the request come from."
    )
    checked_at: datetime = strawberry.field(description="When the check ran.")
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
    checked_at: datetime = strawberry.field(description="When the check ran.")
    ok: bool = strawberry.field(description="The check URL answered through the proxy.")
    latency_ms: float | None = strawberry.field(
        description="How long the check's fetch took, in milliseconds (null: it failed)."
    )
    exit_ip: str | None = strawberry.field(
        description="The address the check URL saw the request come from."
    )
    error: str | None = strawberry.field(description="Why the check failed, in words.")
    trigger: ProxyCheckTrigger = strawberry.field(description="What started the check.")

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
    action: RoutingAction = strawberry.field(description="Where matching traffic goes.")
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
    id: strawberry.ID = strawberry.field(description="The proxy's global ID.")
    name: str = strawberry.field(description="Unique name.")
    protocol: ProxyProtocol = strawberry.field(description="The upstream's protocol.")
    host: str = strawberry.field(description="The upstream's host name or address.")
    port: int = strawberry.field(description="The upstream's port.")
    has_credentials: bool = strawberry.field(description="Credentials are write-only.")
    settings: JSON = strawberry.field(description="Transport/TLS settings (no secrets).")
    created_at: datetime = strawberry.field(description="When the proxy was made.")
    updated_at: datetime = strawberry.field(description="When the proxy last changed.")
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

    @strawberry.field(description="Its last health check (null: never checked).")
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
    async def checks(
        self,
        info: Info,
        last: Annotated[
            int, strawberry.argument(description=f"How many (1 to {PROXY_CHECKS_KEPT}).")
        ] = 10,
    ) -> list[ProxyCheck]:
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
SETTINGS_HELP = "Transport/TLS settings (a JSON object; no secrets)."
CREDENTIAL_HELP = (
    "Write-only. The password (http/https/socks5/shadowsocks/trojan) or the user UUID "
    "(vmess/vless); null removes it."
)


@strawberry.input(description="A new upstream proxy.")
class CreateProxyInput:
    name: str = strawberry.field(description="Unique name.")
    protocol: str = strawberry.field(description=PROTOCOL_HELP)
    host: str = strawberry.field(description="The upstream's host name or address.")
    port: int = strawberry.field(description="The upstream's port (1 to 65535).")
    username: str | None = optional_input("Write-only.")
    password: str | None = optional_input(CREDENTIAL_HELP)
    settings: JSON | None = optional_input(SETTINGS_HELP)
    via_id: strawberry.ID | None = optional_input("Dial this proxy through another one.")


@strawberry.input(description="Changes to a proxy; unset fields stay as they are.")
class UpdateProxyInput:
    id: strawberry.ID = strawberry.field(description="The proxy to change.")
    name: str | None = optional_input("Unique name.")
    protocol: str | None = optional_input(PROTOCOL_HELP)
    host: str | None = optional_input("The upstream's host name or address.")
    port: int | None = optional_input("The upstream's port (1 to 65535).")
    username: str | None = optional_input("Write-only.")
    password: str | None = optional_input(CREDENTIAL_HELP)
    settings: JSON | None = optional_input(SETTINGS_HELP)
    via_id: strawberry.ID | None = optional_input(
        "Dial this proxy through another one (null: direct)."
    )


@strawberry.input(description="Which proxy a profile may use.")
class AttachProxyInput:
    profile_id: strawberry.ID = strawberry.field(description="The profile.")
    proxy_id: strawberry.ID = strawberry.field(description="The proxy it may use.")
    is_default: bool | None = strawberry.field(
        default=None,
        description="Make it the profile's default (unset: only when it has none yet).",
    )


@strawberry.input(description="A routing rule; give at least one of domains, ips, ports, network.")
class RoutingRuleInput:
    domains: list[str] = strawberry.field(
        default_factory=list,
        description="Xray domain matchers: full:, domain:, keyword:, regexp:, geosite:.",
    )
    ips: list[str] = strawberry.field(
        default_factory=list, description="Addresses, CIDRs or geoip:cc."
    )
    ports: str | None = strawberry.field(default=None, description="e.g. 443, 1000-2000 or 80,443.")
    network: str | None = strawberry.field(default=None, description="tcp, udp or tcp,udp.")
    action: RoutingAction = strawberry.field(
        default=RoutingAction.PROXY, description="Where matching traffic goes."
    )
    via_proxy_id: strawberry.ID | None = strawberry.field(
        default=None, description="The proxy of a VIA rule."
    )


@strawberry.input(description="A proxy's new routing rules, replacing the old ones.")
class SetRoutingRulesInput:
    proxy_id: strawberry.ID = strawberry.field(description="The proxy.")
    rules: list[RoutingRuleInput] = strawberry.field(
        description="Ordered, first match wins; an empty list sends all through the chain."
    )


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


@strawberry.type(description="The result of a proxy mutation.")
class ProxyPayload:
    proxy: Proxy | None = strawberry.field(
        default=None, description="The proxy as saved (null on error)."
    )
    user_errors: list[UserError] = strawberry.field(default_factory=list, description=USER_ERRORS)


@strawberry.type(description="The result of attaching or detaching a proxy.")
class AttachProxyPayload:
    profile: ProfileRef | None = strawberry.field(
        default=None, description="The profile (null on error)."
    )
    proxy: Proxy | None = strawberry.field(default=None, description="The proxy (null on error).")
    user_errors: list[UserError] = strawberry.field(default_factory=list, description=USER_ERRORS)


async def resolve_proxies(
    info: Info, first: First = None, after: After = None
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
    @strawberry.mutation(
        description="Make a proxy; it starts with the default routing rules (block list)."
    )
    async def create_proxy(
        self,
        info: Info,
        input: Annotated[CreateProxyInput, strawberry.argument(description="The new proxy.")],
    ) -> ProxyPayload:
        box, settings = info.context.secret_box, info.context.settings

        async def work(session: AsyncSession) -> models.Proxy:
            rules, binary = initial_rules(settings), installed_binary(settings.xray_bin)
            return await proxy_domain.create_proxy(
                session, box, _proxy_values(input), routing_rules=rules, binary=binary
            )

        row, errors = await perform(info, work)
        return ProxyPayload(proxy=None if row is None else Proxy.from_row(row), user_errors=errors)

    @strawberry.mutation(description="Change a proxy's fields (or its credentials).")
    async def update_proxy(
        self,
        info: Info,
        input: Annotated[UpdateProxyInput, strawberry.argument(description="The changes.")],
    ) -> ProxyPayload:
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
    async def delete_proxy(self, info: Info, id: ProxyIdArg) -> DeletePayload:
        async def work(session: AsyncSession) -> list[str]:
            return await proxy_domain.delete_proxy(session, pk_of(id, "Proxy", field="id"))

        notices, errors = await perform(info, work)
        if errors:
            return DeletePayload(user_errors=errors)
        return DeletePayload(deleted_id=id, notices=notices or [])

    @strawberry.mutation(description="Let a profile use a proxy.")
    async def attach_proxy(
        self,
        info: Info,
        input: Annotated[AttachProxyInput, strawberry.argument(description="The attachment.")],
    ) -> AttachProxyPayload:
        async def work(session: AsyncSession) -> tuple[models.Profile, models.Proxy]:
            profile_pk = pk_of(input.profile_id, "Profile", field="profileId")
            proxy_pk = pk_of(input.proxy_id, "Proxy", field="proxyId")
            await proxy_domain.attach_proxy(session, profile_pk, proxy_pk, input.is_default)
            return await _profile_and_proxy(session, profile_pk, proxy_pk)

        return _attach_payload(*await perform(info, work))

    @strawberry.mutation(description="Stop a profile from using a proxy.")
    async def detach_proxy(
        self,
        info: Info,
        profile_id: Annotated[strawberry.ID, strawberry.argument(description="The profile.")],
        proxy_id: Annotated[strawberry.ID, strawberry.argument(description="The proxy.")],
    ) -> AttachProxyPayload:
        async def work(session: AsyncSession) -> tuple[models.Profile, models.Proxy]:
            profile_pk = pk_of(profile_id, "Profile", field="profileId")
            proxy_pk = pk_of(proxy_id, "Proxy", field="proxyId")
            await proxy_domain.detach_proxy(session, profile_pk, proxy_pk)
            return await _profile_and_proxy(session, profile_pk, proxy_pk)

        return _attach_payload(*await perform(info, work))


@strawberry.type(description="The result of an import of share links.")
class ImportProxiesPayload:
    proxies: list[Proxy] = strawberry.field(
        default_factory=list, description="The proxies made from the good links."
    )
    user_errors: list[UserError] = strawberry.field(default_factory=list, description=USER_ERRORS)


@strawberry.type
class ProxyImportMutations:
    @strawberry.mutation(
        description="Import share links (vless, vmess, trojan, ss, socks5, http(s)); each bad "
        "link is its own userError (field [links, index]), the good ones are created."
    )
    async def import_proxies(
        self,
        info: Info,
        links: Annotated[list[str], strawberry.argument(description="Share links, one a string.")],
    ) -> ImportProxiesPayload:
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
    async def set_routing_rules(
        self,
        info: Info,
        input: Annotated[SetRoutingRulesInput, strawberry.argument(description="The rules.")],
    ) -> ProxyPayload:
        ctx = info.context

        async def work(session: AsyncSession) -> models.Proxy:
            pk = pk_of(input.proxy_id, "Proxy", field="proxyId")
            rules = _stored_rules(input)
            return await set_routing_rules(session, ctx.settings, ctx.secret_box, pk, rules)

        row, errors = await perform(info, work)
        return ProxyPayload(proxy=None if row is None else Proxy.from_row(row), user_errors=errors)

    @strawberry.mutation(description="Fetch the check URL through the proxy now; record health.")
    async def check_proxy(self, info: Info, id: ProxyIdArg) -> ProxyPayload:
        ctx = info.context

        async def work(session: AsyncSession) -> models.Proxy:
            pk = pk_of(id, "Proxy", field="id")
            return await proxy_domain.check_proxy(
                session, ctx.app.sessionmaker, ctx.settings, ctx.secret_box, pk
            )

        row, errors = await perform(info, work)
        return ProxyPayload(proxy=None if row is None else Proxy.from_row(row), user_errors=errors)
