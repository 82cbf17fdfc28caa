"""Routing rules of a proxy: validation at save, the default set, and what a run's sidecar gets.

Stored in `Proxy.routing_rules` as `[{"domains", "ips", "ports", "network", "action",
"via_proxy_id"}]`, ordered, first match wins; the compiled form is `xray.routing.Routing`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from server.errors import ErrorCode, InvalidInput, UserError
from server.models import Proxy
from server.proxies import get_proxy, proxy_chain
from server.secretbox import SecretBox
from server.settings import Settings
from xray.binary import XrayBinaryError, find_binary, validate
from xray.config import ConfigError
from xray.hops import Hop
from xray.routing import (
    ACTIONS,
    DEFAULT_RULES,
    Routing,
    Rule,
    all_problems,
    asset_env,
    build_routed_config,
    describe_table,
    features_of,
)

FIELD = "rules"


def initial_rules(settings: Settings) -> list[dict[str, Any]]:
    """The rules a new proxy starts with: CORRAL_DEFAULT_ROUTING_RULES, else the block list."""
    raw = settings.default_routing_rules
    rules = clean_rules(list(DEFAULT_RULES) if raw is None else raw, field="defaultRoutingRules")
    if any(rule["via_proxy_id"] is not None for rule in rules):
        raise InvalidInput.one(
            "defaultRoutingRules", "default routing rules cannot use VIA", ErrorCode.INVALID
        )
    return rules


def clean_rules(raw: Sequence[Any], *, field: str = FIELD) -> list[dict[str, Any]]:
    """The stored form of rules given as dicts (types checked; matchers checked later)."""
    return [_clean_rule(rule, (field, str(index))) for index, rule in enumerate(raw)]


def _clean_rule(raw: Any, where: tuple[str, ...]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise InvalidInput.one(where, "a rule must be an object", ErrorCode.INVALID)
    action = str(raw.get("action") or "PROXY").strip().upper()
    if action not in ACTIONS:
        message = f"action must be one of {', '.join(ACTIONS)}"
        raise InvalidInput.one((*where, "action"), message, ErrorCode.INVALID)
    via = raw.get("via_proxy_id", raw.get("viaProxyId"))
    if via is not None and (isinstance(via, bool) or not isinstance(via, int)):
        raise InvalidInput.one((*where, "viaProxyId"), "no such proxy", ErrorCode.NOT_FOUND)
    return {
        "domains": _strings(raw.get("domains"), (*where, "domains")),
        "ips": _strings(raw.get("ips"), (*where, "ips")),
        "ports": _optional_text(raw.get("ports"), (*where, "ports")),
        "network": _optional_text(raw.get("network"), (*where, "network"), lower=True),
        "action": action,
        "via_proxy_id": via,
    }


def _strings(value: Any, where: tuple[str, ...]) -> list[str]:
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
        raise InvalidInput.one(where, "must be a list of strings", ErrorCode.INVALID)
    return [item.strip() for item in value if item.strip()]


def _optional_text(value: Any, where: tuple[str, ...], *, lower: bool = False) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str | int) or isinstance(value, bool):
        raise InvalidInput.one(where, "must be a string", ErrorCode.INVALID)
    text = str(value).replace(" ", "").strip()
    return (text.lower() if lower else text) or None


def rules_of(stored: Sequence[dict[str, Any]]) -> tuple[Rule, ...]:
    """The compiled rules of a proxy's stored ones (VIA rules name their proxy id)."""
    return tuple(
        Rule(
            domains=tuple(rule.get("domains") or ()),
            ips=tuple(rule.get("ips") or ()),
            ports=rule.get("ports"),
            network=rule.get("network"),
            action=rule.get("action", "PROXY"),
            via=None if rule.get("via_proxy_id") is None else str(rule["via_proxy_id"]),
        )
        for rule in stored
    )


async def _via_proxies(session: AsyncSession, stored: Sequence[dict[str, Any]]) -> dict[str, Proxy]:
    ids = sorted({rule["via_proxy_id"] for rule in stored if rule.get("via_proxy_id")})
    found = {str(pk): await session.get(Proxy, pk) for pk in ids}
    return {key: proxy for key, proxy in found.items() if proxy is not None}


async def run_routing(
    session: AsyncSession, box: SecretBox, stored: Sequence[dict[str, Any]]
) -> Routing:
    """Stored rules with each VIA proxy's chain (credentials decrypted) for a sidecar."""
    via = await _via_proxies(session, stored)
    chains = {key: await proxy_chain(session, box, row) for key, row in via.items()}
    return Routing(rules=rules_of(stored), via_chains=chains)


async def routing_table(session: AsyncSession, proxy: Proxy) -> list[str]:
    """The effective routing table of a run through `proxy`, in words (no secrets)."""
    via = await _via_proxies(session, proxy.routing_rules)
    routing = Routing(rules=rules_of(proxy.routing_rules))
    return describe_table(routing, proxy.name, {key: row.name for key, row in via.items()})


async def set_routing_rules(
    session: AsyncSession,
    settings: Settings,
    box: SecretBox,
    proxy_id: int,
    raw_rules: Sequence[Any],
) -> Proxy:
    """Replace a proxy's rules; refused whole (nothing saved) when one cannot run."""
    proxy = await get_proxy(session, proxy_id, field="proxyId")
    stored = clean_rules(raw_rules)
    routing = await run_routing(session, box, stored)
    errors = [
        UserError((FIELD, str(index), *problem.path), problem.message, ErrorCode.INVALID)
        for index, problem in all_problems(routing, settings.xray_assets_dir)
    ]
    errors += [
        UserError((FIELD, str(index), "viaProxyId"), "VIA needs another proxy", ErrorCode.INVALID)
        for index, rule in enumerate(stored)
        if rule["via_proxy_id"] == proxy.id
    ]
    if errors:
        raise InvalidInput(errors)
    await _check_with_binary(settings, await proxy_chain(session, box, proxy), routing)
    proxy.routing_rules = stored
    await session.flush()
    return proxy


async def _check_with_binary(settings: Settings, chain: list[Hop], routing: Routing) -> None:
    """Let the installed binary test the whole sidecar config (skipped when none is found)."""
    hops = [*chain, *(hop for via in routing.via_chains.values() for hop in via)]
    secrets = [secret for hop in hops for secret in (hop.username, hop.password) if secret]
    try:
        config = build_routed_config(chain, 1080, routing)
        binary = find_binary(settings.xray_bin)
    except ConfigError as exc:
        raise InvalidInput.one(FIELD, _masked(exc.message, secrets), ErrorCode.INVALID) from None
    except XrayBinaryError:
        return  # an API host without the binary: the runner refuses it when it starts
    missing = binary.unsupported(features_of(routing))
    if missing:
        message = f"{binary.describe()} cannot run {', '.join(missing)} (a VIA proxy's chain)"
        raise InvalidInput.one(FIELD, message, ErrorCode.INVALID)
    refusal = await validate(binary, config, env=asset_env(settings.xray_assets_dir))
    if refusal is not None:
        message = f"{binary.flavor} refuses these rules: {_masked(refusal, secrets)}"
        raise InvalidInput.one(FIELD, message, ErrorCode.INVALID)


def _masked(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "…")
    return text
