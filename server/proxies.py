"""Proxies: upstream hops (with credentials encrypted), chains via other proxies, and links."""

from __future__ import annotations

import ipaddress
import json
import re
from typing import Any

from sqlalchemy import delete, select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from server.broker import QUEUE_TOPIC
from server.db import READ_ONLY
from server.errors import ErrorCode, InvalidInput, UserError
from server.known_secrets import mark_secrets_changed
from server.models import HOST_MAX, NAME_MAX, Profile, ProfileProxy, Proxy, ProxyProtocol, utcnow
from server.profiles import delete_link, get_profile
from server.proxy_health import CheckTrigger, add_check
from server.secretbox import SecretBox
from server.settings import Settings
from server.unit_of_work import announce
from server.validation import (
    FieldInvalid,
    FieldSpec,
    apply_fields,
    clean_text,
    ensure_unique,
    int_field,
    json_object_field,
    text_field,
)
from xray.binary import XrayBinary, XrayBinaryError, find_binary
from xray.config import ConfigError, build_config, features_used
from xray.health import HealthResult, check_chain
from xray.hops import (
    MAX_CHAIN_HOPS,
    Hop,
    credential_problems,
    shadowsocks_method,
    shadowsocks_method_problem,
)
from xray.links import ShareLinkError, parse_share_link

MAX_IMPORT_LINKS = 500
CREDENTIAL_MAX = 1024
# Where in `settings` a feature the binary may lack is asked for.
FEATURE_FIELDS = {
    "reality": ("security",),
    "xtls-flow": ("flow",),
    "shadowsocks-2022": ("method",),
    "xchacha20": ("method",),
    "xhttp": ("network",),
    "grpc": ("network",),
    "httpupgrade": ("network",),
    "h2": ("network",),
}
HOSTNAME_RE = re.compile(
    r"^(?=.{1,253}$)([A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)"
    r"(\.[A-Za-z0-9_]([A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?)*\.?$"
)


def parse_protocol(value: Any) -> ProxyProtocol:
    """A known protocol name, case-insensitively (`SOCKS5`, `socks5`)."""
    if not isinstance(value, str) or value.strip().lower() not in ProxyProtocol._value2member_map_:
        known = ", ".join(p.value for p in ProxyProtocol)
        raise FieldInvalid(f"unknown protocol {value!r}; use one of {known}")
    return ProxyProtocol(value.strip().lower())


def parse_host(value: Any) -> str:
    """A hostname or an IP address, without scheme, path or port."""
    host = clean_text(value, HOST_MAX, "host")
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        pass
    if not HOSTNAME_RE.match(host):
        # Not quoted: a pasted URL or share link here carries its credentials.
        raise FieldInvalid("host must be a hostname or IP address (no scheme, user, path or port)")
    return host.lower().rstrip(".")


PROXY_FIELDS = [
    FieldSpec("name", "name", text_field(NAME_MAX, label="name"), required=True),
    FieldSpec("protocol", "protocol", parse_protocol, required=True),
    FieldSpec("host", "host", parse_host, required=True),
    FieldSpec("port", "port", int_field(1, 65535, label="port"), required=True),
    FieldSpec("settings", "settings", json_object_field),
]


def read_credentials(proxy: Proxy, box: SecretBox) -> dict[str, str]:
    """The proxy's decrypted credentials ({} when it has none)."""
    if proxy.credentials_encrypted is None:
        return {}
    loaded: dict[str, str] = json.loads(box.decrypt(proxy.credentials_encrypted))
    return loaded


def _set_credentials(
    session: AsyncSession, proxy: Proxy, box: SecretBox, values: dict[str, Any]
) -> None:
    if "username" not in values and "password" not in values:
        return
    mark_secrets_changed(session)
    credentials = read_credentials(proxy, box)
    for key in ("username", "password"):
        if key not in values:
            continue
        raw = values[key]
        if raw is None or raw == "":
            credentials.pop(key, None)
            continue
        if not isinstance(raw, str) or len(raw) > CREDENTIAL_MAX:
            raise InvalidInput.one(
                key, f"{key} must be a string of at most {CREDENTIAL_MAX}", ErrorCode.INVALID
            )
        credentials[key] = raw
    proxy.credentials_encrypted = box.encrypt(json.dumps(credentials)) if credentials else None


def _check_protocol_rules(proxy: Proxy, box: SecretBox, binary: XrayBinary | None) -> None:
    protocol = ProxyProtocol(proxy.protocol)
    credentials = read_credentials(proxy, box)
    errors = [
        UserError(
            (problem.field,),
            problem.message,
            ErrorCode.REQUIRED if problem.missing else ErrorCode.INVALID,
        )
        for problem in credential_problems(
            protocol.value, credentials.get("username"), credentials.get("password")
        )
    ]
    if protocol is ProxyProtocol.SHADOWSOCKS and not shadowsocks_method(
        proxy.settings.get("method")
    ):
        errors.append(
            UserError(("settings", "method"), shadowsocks_method_problem(), ErrorCode.INVALID)
        )
    if not errors:
        errors += _config_problems(proxy, credentials, binary)
    if errors:
        raise InvalidInput(errors)


def hop_of(proxy: Proxy, credentials: dict[str, str]) -> Hop:
    """The proxy as one hop of a sidecar config (credentials given decrypted)."""
    return Hop(
        name=proxy.name,
        protocol=proxy.protocol,
        host=proxy.host,
        port=proxy.port,
        username=credentials.get("username"),
        password=credentials.get("password"),
        settings=dict(proxy.settings),
    )


def _config_problems(
    proxy: Proxy, credentials: dict[str, str], binary: XrayBinary | None
) -> list[UserError]:
    """What the sidecar config generator would refuse (bad transport/TLS settings), and
    what the installed binary cannot run (skipped on a host without one: the runner
    refuses it when the sidecar starts)."""
    hop = hop_of(proxy, credentials)
    try:
        build_config([hop], 1080)
        features = features_used([hop])
    except ConfigError as exc:
        return [UserError(("settings",), exc.message, ErrorCode.INVALID)]
    if binary is None:
        return []
    return [
        UserError(
            ("settings", *FEATURE_FIELDS.get(feature, ())),
            binary.needs(feature),
            ErrorCode.UNSUPPORTED,
        )
        for feature in binary.unsupported(features)
    ]


async def get_proxy(session: AsyncSession, proxy_id: int, *, field: str = "id") -> Proxy:
    """The proxy with this id, or a NOT_FOUND error on `field`."""
    proxy = await session.get(Proxy, proxy_id)
    if proxy is None:
        raise InvalidInput.one(field, "no such proxy", ErrorCode.NOT_FOUND)
    return proxy


async def _set_via(session: AsyncSession, proxy: Proxy, values: dict[str, Any]) -> None:
    """Point `proxy` at its next hop, refusing loops (A via B via A) and over-long chains."""
    if "viaId" not in values:
        return
    via_id = values["viaId"]
    if via_id is None:
        proxy.via_id = None
        return
    hop = await get_proxy(session, via_id, field="viaId")
    seen = {proxy.id} if proxy.id is not None else set()
    chain = [proxy.name, hop.name]
    current: Proxy | None = hop
    while current is not None:
        if current.id in seen:
            raise InvalidInput.one(
                "viaId", "the proxy chain loops: " + " via ".join(chain), ErrorCode.CHAIN_LOOP
            )
        seen.add(current.id)
        if len(seen) > MAX_CHAIN_HOPS:
            raise InvalidInput.one(
                "viaId", f"a proxy chain has at most {MAX_CHAIN_HOPS} hops", ErrorCode.INVALID
            )
        current = await session.get(Proxy, current.via_id) if current.via_id else None
        if current is not None:
            chain.append(current.name)
    proxy.via_id = hop.id


async def create_proxy(
    session: AsyncSession,
    box: SecretBox,
    values: dict[str, Any],
    *,
    routing_rules: list[dict[str, Any]],
    binary: XrayBinary | None,
) -> Proxy:
    """Validate and add a proxy; credentials are stored encrypted.

    `routing_rules` are its first rules (`server.routing.initial_rules`: the default set);
    what `binary` (the installed one, `xray.binary.installed_binary`) cannot run is refused.
    """
    proxy = Proxy(settings={}, routing_rules=routing_rules)
    apply_fields(proxy, values, PROXY_FIELDS, creating=True)
    _set_credentials(session, proxy, box, values)
    _check_protocol_rules(proxy, box, binary)
    await ensure_unique(session, Proxy.name_key, proxy.name, field="name", label="proxy")
    await _set_via(session, proxy, values)
    session.add(proxy)
    await session.flush()
    return proxy


async def update_proxy(
    session: AsyncSession,
    box: SecretBox,
    proxy_id: int,
    values: dict[str, Any],
    *,
    binary: XrayBinary | None,
) -> Proxy:
    """Apply changes to a proxy; `username`/`password: null` removes them."""
    proxy = await get_proxy(session, proxy_id)
    apply_fields(proxy, values, PROXY_FIELDS, creating=False)
    _set_credentials(session, proxy, box, values)
    _check_protocol_rules(proxy, box, binary)
    if "name" in values:
        await ensure_unique(
            session, Proxy.name_key, proxy.name, field="name", label="proxy", exclude_id=proxy.id
        )
    await _set_via(session, proxy, values)
    await session.flush()
    return proxy


async def delete_proxy(session: AsyncSession, proxy_id: int) -> list[str]:
    """Delete a proxy, detaching it from the profiles that use it. Returns notices.

    A proxy that is another proxy's `via` hop is refused: its chain would silently lose a hop.
    """
    proxy = await get_proxy(session, proxy_id)
    dependants = (await session.scalars(select(Proxy.name).where(Proxy.via_id == proxy.id))).all()
    if dependants:
        raise InvalidInput.one(
            "id",
            f"proxy {proxy.name!r} is the next hop of {', '.join(sorted(dependants))}; "
            "change their via first",
            ErrorCode.IN_USE,
        )
    routed = await _routing_users(session, proxy.id)
    if routed:
        raise InvalidInput.one(
            "id",
            f"VIA routing rules of {', '.join(sorted(routed))} send traffic through proxy "
            f"{proxy.name!r}; change those rules first",
            ErrorCode.IN_USE,
        )
    users = (
        await session.scalars(
            select(Profile.name)
            .join(ProfileProxy, ProfileProxy.profile_id == Profile.id)
            .where(ProfileProxy.proxy_id == proxy.id)
            .order_by(Profile.name)
        )
    ).all()
    await session.execute(delete(Proxy).where(Proxy.id == proxy.id))
    notices = [f"proxy {proxy.name!r} deleted"]
    if users:
        notices.append(f"detached from profile(s): {', '.join(users)}")
    return notices


async def _routing_users(session: AsyncSession, proxy_id: int) -> list[str]:
    """Names of the proxies whose VIA routing rules send traffic through `proxy_id`."""
    rows = await session.execute(select(Proxy.name, Proxy.routing_rules))
    return [
        name for name, rules in rows if any(rule.get("via_proxy_id") == proxy_id for rule in rules)
    ]


async def attach_proxy(
    session: AsyncSession, profile_id: int, proxy_id: int, is_default: bool | None
) -> ProfileProxy:
    """Let a profile use a proxy; the first one attached (or `isDefault`) becomes its default."""
    profile = await get_profile(session, profile_id, field="profileId")
    proxy = await get_proxy(session, proxy_id, field="proxyId")
    link = await session.get(ProfileProxy, (profile.id, proxy.id))
    if is_default is None:
        has_default = await session.scalar(
            select(ProfileProxy.proxy_id).where(
                ProfileProxy.profile_id == profile.id, ProfileProxy.is_default.is_(True)
            )
        )
        is_default = link.is_default if link is not None else has_default is None
    if is_default:
        await session.execute(
            update(ProfileProxy)
            .where(ProfileProxy.profile_id == profile.id, ProfileProxy.proxy_id != proxy.id)
            .values(is_default=False)
        )
    if link is None:
        link = ProfileProxy(profile_id=profile.id, proxy_id=proxy.id, is_default=is_default)
        session.add(link)
    else:
        link.is_default = is_default
    await session.flush()
    return link


async def detach_proxy(session: AsyncSession, profile_id: int, proxy_id: int) -> None:
    """Stop a profile from using a proxy."""
    await get_profile(session, profile_id, field="profileId")
    await get_proxy(session, proxy_id, field="proxyId")
    missing = UserError(
        ("proxyId",), "the proxy is not attached to this profile", ErrorCode.NOT_FOUND
    )
    await delete_link(session, ProfileProxy, profile_id, ProfileProxy.proxy_id, proxy_id, missing)


async def proxy_hops(session: AsyncSession, proxy: Proxy) -> list[Proxy]:
    """The proxy and the proxies it is dialed through (`via`), nearest first."""
    hops: list[Proxy] = []
    current: Proxy | None = proxy
    while current is not None and len(hops) < MAX_CHAIN_HOPS:
        hops.append(current)
        current = await session.get(Proxy, current.via_id) if current.via_id else None
    return hops


async def proxy_chain(session: AsyncSession, box: SecretBox, proxy: Proxy) -> list[Hop]:
    """The proxy and the hops it is dialed through (`via`), credentials decrypted."""
    return [hop_of(hop, read_credentials(hop, box)) for hop in await proxy_hops(session, proxy)]


async def import_proxies(
    session: AsyncSession,
    box: SecretBox,
    links: list[str],
    *,
    routing_rules: list[dict[str, Any]],
    binary: XrayBinary | None,
) -> tuple[list[Proxy], list[UserError]]:
    """Import share links; each bad link gets its own error, the good ones are created."""
    created: list[Proxy] = []
    errors: list[UserError] = []
    if len(links) > MAX_IMPORT_LINKS:
        message = f"at most {MAX_IMPORT_LINKS} links at once"
        return created, [UserError(("links",), message, ErrorCode.TOO_LONG)]
    for index, link in enumerate(links):
        where = ("links", str(index))
        try:
            parsed = parse_share_link(link)
        except ShareLinkError as exc:
            errors.append(UserError(where, f"link {index + 1}: {exc}", ErrorCode.INVALID))
            continue
        values: dict[str, Any] = {
            "name": parsed.name,
            "protocol": parsed.protocol,
            "host": parsed.host,
            "port": parsed.port,
            "settings": dict(parsed.settings),
            "username": parsed.username,
            "password": parsed.password,
        }
        try:
            async with session.begin_nested():
                proxy = await create_proxy(
                    session, box, values, routing_rules=routing_rules, binary=binary
                )
                created.append(proxy)
        except InvalidInput as exc:
            secrets = [s for s in (parsed.username, parsed.password) if s and len(s) >= 4]
            errors.extend(
                UserError(
                    where, f"link {index + 1}: {_without(secrets, error.message)}", error.code
                )
                for error in exc.errors
            )
    return created, errors


def _without(secrets: list[str], message: str) -> str:
    """A link's error never quotes its credentials (no rule quotes them today: a guard)."""
    for secret in secrets:
        message = message.replace(secret, "…")
    return message


async def record_health(
    session: AsyncSession, proxy: Proxy, result: HealthResult, trigger: str = CheckTrigger.MANUAL
) -> Proxy:
    """Store the outcome of a health check on the proxy and in its history. A passing check
    of a proxy that was failing wakes the runners once it commits: commands held for it
    (CORRAL_HOLD_ON_FLAGGED_PROXY) may start now, not at the claim loop's safety net."""
    if result.ok and (proxy.health_failures or 0) > 0:
        announce(session, QUEUE_TOPIC, None)
    proxy.health_ok = result.ok
    proxy.health_latency_ms = result.latency_ms
    proxy.health_error = result.error
    proxy.health_exit_ip = result.exit_ip
    proxy.health_checked_at = utcnow()
    await add_check(session, proxy, result, trigger, proxy.health_checked_at)
    await session.flush()
    return proxy


async def check_proxy(
    session: AsyncSession,
    sessions: async_sessionmaker[AsyncSession],
    settings: Settings,
    box: SecretBox,
    proxy_id: int,
    trigger: str = CheckTrigger.MANUAL,
) -> Proxy:
    """Fetch the check URL through the proxy's chain now (an Xray sidecar); store its health.

    The chain is read through a session of its own and the check runs before `session` is
    first used: a check takes seconds, and the unit of work must not hold SQLite's write
    lock (or a PostgreSQL transaction) that long.
    """
    async with sessions() as reading:
        await reading.connection(execution_options=READ_ONLY)
        chain = await proxy_chain(reading, box, await get_proxy(reading, proxy_id))
    try:
        binary = find_binary(settings.xray_bin)
    except XrayBinaryError as exc:
        raise InvalidInput([UserError((), str(exc), ErrorCode.INVALID)]) from exc
    result = await check_chain(
        binary,
        chain,
        settings.proxy_check_url,
        start_timeout=settings.sidecar_start_timeout,
        probe_timeout=settings.proxy_probe_timeout,
    )
    return await record_health(session, await get_proxy(session, proxy_id), result, trigger)
