"""Routing rules of a sidecar: which destinations go through which outbound.

Rules are ordered and the first match wins (Xray's own semantics); traffic no rule matches
goes to the first outbound, the proxy's own chain, so a run stays fail-closed unless an
admin writes a `DIRECT` rule. Matchers use Xray's forms:

- domains: `full:host`, `domain:suffix`, `keyword:part`, `regexp:RE2`, `geosite:list`,
  or a bare word (Xray: a substring match, like `keyword:`)
- ips: an address, a CIDR, or `geoip:cc` (`geoip:`/`geosite:` need geoip.dat/geosite.dat
  in the assets folder)
- ports: `443`, `1000-2000`, or a comma list of both; network: `tcp`, `udp` or `tcp,udp`

Domain rules match the name a client asks the SOCKS inbound for (Chromium and curl's
`socks5h` send names); IP rules match destinations given as addresses
(`domainStrategy: AsIs`: the sidecar resolves nothing itself, so no DNS leaves unproxied).
"""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any

from xray.config import (
    BACKGROUND_DOMAINS,
    BLOCK_TAG,
    PROXY_TAG,
    build_config,
    chain_outbounds,
    features_used,
)
from xray.hops import Hop

ACTIONS = ("PROXY", "VIA", "DIRECT", "BLOCK")
DOMAIN_PREFIXES = ("full", "domain", "keyword", "regexp", "geosite")
NETWORKS = ("tcp", "udp", "tcp,udp")
MAX_RULES = 200
MAX_MATCHERS = 1000
MATCHER_MAX = 512
PORT_LIST_RE = re.compile(r"^\d{1,5}(-\d{1,5})?(,\d{1,5}(-\d{1,5})?)*$")
GEO_FILES = {"geoip": "geoip.dat", "geosite": "geosite.dat"}
DIRECT_TAG = "direct"
ASSET_ENV = ("XRAY_LOCATION_ASSET", "V2RAY_LOCATION_ASSET")


@dataclass(frozen=True)
class Rule:
    """One routing rule; `via` names the extra chain (a key of `Routing.via_chains`)."""

    domains: tuple[str, ...] = ()
    ips: tuple[str, ...] = ()
    ports: str | None = None
    network: str | None = None
    action: str = "PROXY"
    via: str | None = None


@dataclass(frozen=True)
class Routing:
    """A sidecar's rules and the chains its `VIA` rules send traffic through."""

    rules: tuple[Rule, ...] = ()
    via_chains: Mapping[str, Sequence[Hop]] = field(default_factory=dict)


@dataclass(frozen=True)
class RuleProblem:
    """What is wrong with a rule: `path` inside the rule (e.g. ("domains", "2")) and why."""

    path: tuple[str, ...]
    message: str


DEFAULT_RULES: tuple[dict[str, Any], ...] = (
    {"domains": list(BACKGROUND_DOMAINS), "action": "BLOCK"},
)


def via_tag(key: str, index: int = 0) -> str:
    """The outbound tag of hop `index` of the VIA chain named `key`."""
    return f"via-{key}" if index == 0 else f"via-{key}-hop-{index}"


def rule_problems(rule: Rule, assets_dir: Path | None) -> list[RuleProblem]:
    """Why the rule cannot run (empty when it can); checked before the binary sees it."""
    problems: list[RuleProblem] = []
    if rule.action not in ACTIONS:
        problems.append(RuleProblem(("action",), f"action must be one of {', '.join(ACTIONS)}"))
    if rule.action == "VIA" and rule.via is None:
        problems.append(RuleProblem(("viaProxyId",), "a VIA rule needs viaProxyId"))
    if rule.action != "VIA" and rule.via is not None:
        problems.append(RuleProblem(("viaProxyId",), "only a VIA rule takes viaProxyId"))
    if not (rule.domains or rule.ips or rule.ports or rule.network):
        problems.append(RuleProblem((), "a rule needs domains, ips, ports or network to match"))
    for index, domain in enumerate(rule.domains):
        problem = _domain_problem(domain, assets_dir)
        if problem:
            problems.append(RuleProblem(("domains", str(index)), problem))
    for index, address in enumerate(rule.ips):
        problem = _ip_problem(address, assets_dir)
        if problem:
            problems.append(RuleProblem(("ips", str(index)), problem))
    if rule.ports is not None and _ports_problem(rule.ports):
        problems.append(RuleProblem(("ports",), _ports_problem(rule.ports)))
    if rule.network is not None and rule.network not in NETWORKS:
        problems.append(RuleProblem(("network",), "network must be tcp, udp or tcp,udp"))
    return problems


def _domain_problem(domain: str, assets_dir: Path | None) -> str:
    if not domain or domain != domain.strip() or len(domain) > MATCHER_MAX:
        return f"{domain!r} is not a domain matcher"
    prefix, colon, value = domain.partition(":")
    if not colon:
        return ""  # Xray's plain form: a substring of the name
    if prefix not in DOMAIN_PREFIXES:
        return f"unknown matcher {prefix + ':'!r} in {domain!r}; use " + ", ".join(
            p + ":" for p in DOMAIN_PREFIXES
        )
    if not value:
        return f"{domain!r} has nothing after {prefix}:"
    if prefix == "regexp":
        try:
            re.compile(value)
        except re.error as exc:
            return f"{domain!r} is not a valid regular expression: {exc}"
    return _geo_problem(prefix, assets_dir)


def _ip_problem(address: str, assets_dir: Path | None) -> str:
    if address.startswith("geoip:"):
        return "" if address[6:] else f"{address!r} names no country or list"
    if address.partition(":")[0] in ("geosite", "ext", "full", "domain"):
        return f"{address!r} is a domain matcher: put it in domains"
    try:
        ipaddress.ip_network(address, strict=False)
    except ValueError:
        return f"{address!r} is not an IP address, a CIDR or geoip:..."
    return ""


def _geo_problem(prefix: str, assets_dir: Path | None) -> str:
    name = GEO_FILES.get(prefix)
    if name is None:
        return ""
    if assets_dir is None:
        return f"{prefix}: needs {name}: set CORRAL_XRAY_ASSETS_DIR to the folder holding it"
    if not (assets_dir / name).is_file():
        return f"{prefix}: needs {name}, which is not in {assets_dir}"
    return ""


def _ports_problem(ports: str) -> str:
    if not PORT_LIST_RE.match(ports):
        return "ports must look like 443, 1000-2000 or 80,443,8000-8100"
    for part in ports.split(","):
        low, _, high = part.partition("-")
        first, last = int(low), int(high or low)
        if not 1 <= first <= last <= 65535:
            return f"{part} is not a port or a port range within 1-65535"
    return ""


def all_problems(routing: Routing, assets_dir: Path | None) -> list[tuple[int, RuleProblem]]:
    """Every rule's problems with its index, geo matchers checked against `assets_dir`."""
    problems = [
        (i, p) for i, rule in enumerate(routing.rules) for p in rule_problems(rule, assets_dir)
    ]
    if len(routing.rules) > MAX_RULES:
        problems.append((0, RuleProblem((), f"at most {MAX_RULES} rules")))
    matchers = sum(len(rule.domains) + len(rule.ips) for rule in routing.rules)
    if matchers > MAX_MATCHERS:
        problems.append((0, RuleProblem((), f"at most {MAX_MATCHERS} domains and ips in all")))
    for index, rule in enumerate(routing.rules):
        if rule.via is not None and rule.via not in routing.via_chains:
            problems.append((index, RuleProblem(("viaProxyId",), "no such proxy")))
    return problems


def features_of(routing: Routing) -> frozenset[str]:
    """What the VIA chains need from the binary (see `xray.config.features_used`)."""
    found: set[str] = set()
    for chain in routing.via_chains.values():
        found |= features_used(chain)
    return frozenset(found)


def uses_geo_files(routing: Routing) -> bool:
    """Whether any rule needs geoip.dat or geosite.dat."""
    return any(
        matcher.startswith(("geoip:", "geosite:"))
        for rule in routing.rules
        for matcher in (*rule.domains, *rule.ips)
    )


def build_routed_config(
    chain: Sequence[Hop], socks_port: int, routing: Routing, *, log_level: str = "warning"
) -> dict[str, Any]:
    """`build_config` with these rules instead of the fixed block list, and an outbound
    chain per VIA proxy (plus a freedom outbound only when a DIRECT rule asks for one)."""
    config = build_config(chain, socks_port, log_level=log_level, block_domains=())
    used = {rule.via for rule in routing.rules if rule.via is not None}
    for key in sorted(used & set(routing.via_chains)):
        config["outbounds"] += chain_outbounds(routing.via_chains[key], partial(via_tag, key))
    if uses_direct(routing):
        config["outbounds"].append({"tag": DIRECT_TAG, "protocol": "freedom", "settings": {}})
    config["routing"]["rules"] = xray_rules(routing, PROXY_TAG, BLOCK_TAG)
    return config


def xray_rules(routing: Routing, main_tag: str, block_tag: str) -> list[dict[str, Any]]:
    """The routing section's rules, in order, each pointing at its outbound's tag."""
    compiled = []
    for rule in routing.rules:
        entry: dict[str, Any] = {"type": "field"}
        if rule.domains:
            entry["domain"] = list(rule.domains)
        if rule.ips:
            entry["ip"] = list(rule.ips)
        if rule.ports:
            entry["port"] = rule.ports
        if rule.network:
            entry["network"] = rule.network
        entry["outboundTag"] = _outbound_tag(rule, main_tag, block_tag)
        compiled.append(entry)
    return compiled


def _outbound_tag(rule: Rule, main_tag: str, block_tag: str) -> str:
    if rule.action == "VIA" and rule.via is not None:
        return via_tag(rule.via)
    return {"DIRECT": DIRECT_TAG, "BLOCK": block_tag}.get(rule.action, main_tag)


def uses_direct(routing: Routing) -> bool:
    """Whether a freedom outbound is needed: only for an explicit DIRECT rule."""
    return any(rule.action == "DIRECT" for rule in routing.rules)


def describe_table(routing: Routing, main_name: str, via_names: Mapping[str, str]) -> list[str]:
    """The effective routing table in words, one line a rule, then the catch-all."""
    lines = []
    for index, rule in enumerate(routing.rules, start=1):
        matchers = [*rule.domains, *rule.ips]
        if rule.ports:
            matchers.append(f"port {rule.ports}")
        if rule.network:
            matchers.append(f"network {rule.network}")
        lines.append(f"{index}. {', '.join(matchers)} → {_target(rule, main_name, via_names)}")
    lines.append(f"everything else → proxy {main_name!r}")
    return lines


def _target(rule: Rule, main_name: str, via_names: Mapping[str, str]) -> str:
    if rule.action == "VIA" and rule.via is not None:
        return f"via proxy {via_names.get(rule.via, rule.via)!r}"
    if rule.action == "PROXY":
        return f"proxy {main_name!r}"
    return rule.action.lower() if rule.action == "DIRECT" else "blocked"


def asset_env(assets_dir: Path | None) -> dict[str, str]:
    """Environment that points Xray and V2Ray at the geoip/geosite folder."""
    if assets_dir is None:
        return {}
    return {name: str(assets_dir) for name in ASSET_ENV}
