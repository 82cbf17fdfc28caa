"""Client configs for a proxy sidecar: a local SOCKS inbound in front of a chain of proxies.

The JSON is the v4 format that both Xray-core and V2Ray 4.x read. There is no freedom
("direct") outbound at all: traffic leaves through the chain or not at all, and the
routing sends Chromium's background Google endpoints to a blackhole.

`Hop.settings` (the Proxy row's `settings`) uses these keys:

- `network`: `tcp` (default), `ws`, `grpc`, `h2` (alias `http`), `httpupgrade`, `xhttp`
- `security`: `none`, `tls`, `reality` (default `tls` for https and trojan, else `none`)
- `sni` (alias `serverName`), `alpn` (list or comma-separated), `fingerprint` (alias `fp`),
  `allowInsecure` (bool)
- `path`, `host`: ws/h2/httpupgrade/xhttp path and Host (h2: comma-separated hosts);
  with `headerType: "http"` on tcp, the HTTP header obfuscation's path and Host
- `serviceName` (grpc), `mode` (grpc `multi`; xhttp `auto`/`packet-up`/...)
- `publicKey`, `shortId`, `spiderX` (REALITY), `flow` (VLESS, e.g. `xtls-rprx-vision`)
- `alterId`, `cipher` (VMess; `security` is the TLS layer, not the VMess cipher)
- `method` (Shadowsocks)
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import os
import re
import secrets
import uuid
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from xray.hops import (
    MAX_CHAIN_HOPS,
    PROTOCOLS,
    Hop,
    credential_problems,
    shadowsocks_method,
    shadowsocks_method_problem,
)

PROXY_TAG = "proxy"
BLOCK_TAG = "block"
INBOUND_TAG = "socks-in"
LOG_LEVELS = ("debug", "info", "warning", "error", "none")

# Chromium's own background traffic (updates, Safe Browsing, field trials, sign-in, model
# downloads): it would spend proxy bandwidth and mix Google's traffic into every profile.
# Matching is per hostname; `domain:gstatic.com` also blocks reCAPTCHA and Google Fonts
# assets and `domain:accounts.google.com` blocks Google sign-in: pass your own list to keep them.
BACKGROUND_DOMAINS: tuple[str, ...] = (
    "domain:accounts.google.com",
    "domain:update.googleapis.com",
    "domain:clients1.google.com",
    "domain:clients2.google.com",
    "domain:clients4.google.com",
    "domain:clients2.googleusercontent.com",
    "domain:gvt1.com",
    "domain:gvt2.com",
    "domain:gstatic.com",
    "domain:safebrowsing.googleapis.com",
    "domain:safebrowsingohttpgateway.googleapis.com",
    "domain:optimizationguide-pa.googleapis.com",
    "domain:content-autofill.googleapis.com",
    "domain:clientservices.googleapis.com",
    "domain:passwordsleakcheck-pa.googleapis.com",
    "domain:chromewebstore.googleapis.com",
    "domain:android.clients.google.com",
)

NETWORK_ALIASES = {
    "tcp": "tcp",
    "raw": "tcp",
    "ws": "ws",
    "websocket": "ws",
    "grpc": "grpc",
    "gun": "grpc",
    "h2": "h2",
    "http": "h2",
    "httpupgrade": "httpupgrade",
    "xhttp": "xhttp",
    "splithttp": "xhttp",
}
SECURITIES = ("none", "tls", "reality")
VMESS_CIPHERS = ("auto", "aes-128-gcm", "chacha20-poly1305", "none", "zero")
VLESS_FLOWS = ("xtls-rprx-vision", "xtls-rprx-vision-udp443")
XHTTP_MODES = ("auto", "packet-up", "stream-up", "stream-one")
REALITY_NETWORKS = ("tcp", "grpc", "h2", "xhttp")
REALITY_KEY_RE = re.compile(r"^[A-Za-z0-9_-]{43}=?$")
SHORT_ID_RE = re.compile(r"^(?:[0-9a-fA-F]{2}){0,8}$")


class ConfigError(ValueError):
    """A proxy (or chain) that cannot be turned into a working config; `message` says why."""

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def hop_tag(index: int) -> str:
    """The outbound tag of `chain[index]`: `proxy`, then `hop-1`, `hop-2`, ..."""
    return PROXY_TAG if index == 0 else f"hop-{index}"


def build_config(
    chain: Sequence[Hop],
    socks_port: int,
    *,
    log_level: str = "warning",
    block_domains: Sequence[str] = BACKGROUND_DOMAINS,
) -> dict[str, Any]:
    """The config for a SOCKS inbound on 127.0.0.1:socks_port whose traffic goes out via chain.

    `chain[0]` is the proxy the command uses; each hop is dialed through the next one.
    """
    _check_chain(chain)
    _check_port(socks_port, "socks_port")
    if log_level not in LOG_LEVELS:
        raise ConfigError(f"log_level must be one of {', '.join(LOG_LEVELS)}")
    outbounds = chain_outbounds(chain, hop_tag)
    outbounds.append({"tag": BLOCK_TAG, "protocol": "blackhole", "settings": {}})
    return {
        "log": {"loglevel": log_level},
        "inbounds": [
            {
                "tag": INBOUND_TAG,
                "protocol": "socks",
                "listen": "127.0.0.1",
                "port": socks_port,
                "settings": {"auth": "noauth", "udp": False},
            }
        ],
        "outbounds": outbounds,
        "routing": {"domainStrategy": "AsIs", "rules": _block_rules(block_domains)},
    }


def chain_outbounds(chain: Sequence[Hop], tag_of: Callable[[int], str]) -> list[dict[str, Any]]:
    """The outbounds of a chain, hop `i` tagged `tag_of(i)` and dialed through hop `i + 1`."""
    _check_chain(chain)
    return [
        _outbound(hop, tag_of(index), tag_of(index + 1) if index + 1 < len(chain) else None)
        for index, hop in enumerate(chain)
    ]


def features_used(chain: Sequence[Hop]) -> frozenset[str]:
    """What a chain needs from the binary (see `XrayBinary.supports`).

    Protocol names, networks (`tcp`, `ws`, `grpc`, `h2`, `httpupgrade`, `xhttp`), `tls`,
    `reality`, `xtls-flow`, `shadowsocks-2022`, `xchacha20`, and `chained-transport` (a hop
    dialed through another hop with a transport other than plain tcp).
    """
    _check_chain(chain)
    features: set[str] = set()
    for index, hop in enumerate(chain):
        try:
            features |= _hop_features(hop, dialed_through_hop=index + 1 < len(chain))
        except ConfigError as error:
            raise ConfigError(f"proxy {hop.name!r}: {error.message}") from None
    return frozenset(features)


def _hop_features(hop: Hop, *, dialed_through_hop: bool) -> set[str]:
    network = _network(hop.settings)
    security = _security(hop)
    features = {hop.protocol, network}
    if security != "none":
        features.add(security)
    if hop.protocol == "vless" and _text(hop.settings, "flow"):
        features.add("xtls-flow")
    method = _text(hop.settings, "method").lower() if hop.protocol == "shadowsocks" else ""
    if method.startswith("2022-"):
        features.add("shadowsocks-2022")
    if method.startswith("xchacha20"):
        features.add("xchacha20")
    header = _text(hop.settings, "headerType").lower()
    if dialed_through_hop and (network != "tcp" or header not in ("", "none")):
        features.add("chained-transport")
    return features


def write_config(config: Mapping[str, Any], directory: Path) -> Path:
    """Write `config` as JSON to a new file in `directory` readable by its owner only (0600)."""
    path = directory / f"xray-{secrets.token_hex(8)}.json"
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    with os.fdopen(descriptor, "w", encoding="utf-8") as handle:
        json.dump(config, handle, indent=2)
    return path


def _check_chain(chain: Sequence[Hop]) -> None:
    if not chain:
        raise ConfigError("the proxy chain is empty")
    if len(chain) > MAX_CHAIN_HOPS:
        raise ConfigError(f"a proxy chain has at most {MAX_CHAIN_HOPS} hops, not {len(chain)}")


def _check_port(port: Any, label: str) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 1 <= port <= 65535:
        raise ConfigError(f"{label} must be a number from 1 to 65535, not {port!r}")
    return port


def _block_rules(block_domains: Sequence[str]) -> list[dict[str, Any]]:
    if isinstance(block_domains, str):
        raise ConfigError("block_domains must be a list of domain rules, not one string")
    domains = list(block_domains)
    for domain in domains:
        if not isinstance(domain, str) or not domain.strip() or domain != domain.strip():
            raise ConfigError(f"block_domains has an invalid entry {domain!r}")
    if not domains:
        return []
    return [{"type": "field", "domain": domains, "outboundTag": BLOCK_TAG}]


def _outbound(hop: Hop, tag: str, via: str | None) -> dict[str, Any]:
    try:
        outbound: dict[str, Any] = {"tag": tag, **_protocol_part(hop)}
        stream = _stream_settings(hop)
    except ConfigError as error:
        raise ConfigError(f"proxy {hop.name!r}: {error.message}") from None
    if stream is not None:
        outbound["streamSettings"] = stream
    if via is not None:
        # `transportLayer` keeps this hop's own transport (TLS, ws, REALITY...) when it is
        # dialed through `via`: Xray turns it into `sockopt.dialerProxy`. V2Ray 4.x ignores
        # the key and keeps TLS only (hence the `chained-transport` feature).
        outbound["proxySettings"] = {"tag": via, "transportLayer": True}
    return outbound


def _protocol_part(hop: Hop) -> dict[str, Any]:
    if hop.protocol not in PROTOCOLS:
        raise ConfigError(f"unknown protocol {hop.protocol!r}; use one of {', '.join(PROTOCOLS)}")
    address = _address(hop.host)
    port = _check_port(hop.port, "port")
    _check_credentials(hop)
    if hop.protocol in ("http", "https"):
        return {"protocol": "http", "settings": {"servers": [_server(hop, address, port)]}}
    if hop.protocol == "socks5":
        return {"protocol": "socks", "settings": {"servers": [_server(hop, address, port)]}}
    if hop.protocol == "shadowsocks":
        return {"protocol": "shadowsocks", "settings": _shadowsocks(hop, address, port)}
    if hop.protocol == "vmess":
        return {"protocol": "vmess", "settings": _vmess(hop, address, port)}
    if hop.protocol == "vless":
        return {"protocol": "vless", "settings": _vless(hop, address, port)}
    server = {"address": address, "port": port, "password": _secret(hop)}  # trojan
    return {"protocol": "trojan", "settings": {"servers": [server]}}


def _address(host: str) -> str:
    address = host.strip()
    if address.startswith("[") and address.endswith("]"):
        address = address[1:-1]
    if not address or any(character.isspace() or character in "/@#?" for character in address):
        raise ConfigError(f"{host!r} is not a host name or IP address")
    if ":" in address:
        try:
            ipaddress.IPv6Address(address)
        except ValueError:
            raise ConfigError(f"{host!r} is not a host name or IP address") from None
    return address


def _check_credentials(hop: Hop) -> None:
    """The credential rules `server.proxies` checks on save (`xray.hops`), checked again."""
    problems = credential_problems(hop.protocol, hop.username, hop.password)
    if problems:
        raise ConfigError(problems[0].message)


def _server(hop: Hop, address: str, port: int) -> dict[str, Any]:
    """An http/socks server entry, with its user when the proxy has credentials."""
    server: dict[str, Any] = {"address": address, "port": port}
    if hop.username:
        server["users"] = [{"user": hop.username, "pass": hop.password or ""}]
    return server


def _secret(hop: Hop) -> str:
    """The one secret of a shadowsocks/vmess/vless/trojan hop (`_check_credentials` saw it)."""
    if not hop.password:
        raise ConfigError(f"{hop.protocol} needs a password")
    return hop.password


def _uuid(hop: Hop) -> str:
    return str(uuid.UUID(_secret(hop)))


def _shadowsocks(hop: Hop, address: str, port: int) -> dict[str, Any]:
    method = shadowsocks_method(hop.settings.get("method"))
    if method is None:
        raise ConfigError(shadowsocks_method_problem())
    server = {"address": address, "port": port, "method": method}
    return {"servers": [{**server, "password": _secret(hop)}]}


def _vmess(hop: Hop, address: str, port: int) -> dict[str, Any]:
    user_id = _uuid(hop)
    alter_id = hop.settings.get("alterId", 0) or 0
    digits = alter_id.strip() if isinstance(alter_id, str) else ""
    if digits.isascii() and digits.isdigit() and len(digits) <= 5:  # int("²") would raise
        alter_id = int(digits)
    if isinstance(alter_id, bool) or not isinstance(alter_id, int) or not 0 <= alter_id <= 65535:
        raise ConfigError(f"settings.alterId must be a number from 0 to 65535, not {alter_id!r}")
    cipher = _text(hop.settings, "cipher") or "auto"
    if cipher not in VMESS_CIPHERS:
        raise ConfigError(f"settings.cipher must be one of {', '.join(VMESS_CIPHERS)}")
    user = {"id": user_id, "alterId": alter_id, "security": cipher}
    return {"vnext": [{"address": address, "port": port, "users": [user]}]}


def _vless(hop: Hop, address: str, port: int) -> dict[str, Any]:
    user: dict[str, Any] = {"id": _uuid(hop), "encryption": "none"}
    flow = _text(hop.settings, "flow")
    if flow:
        if flow not in VLESS_FLOWS:
            raise ConfigError(f"settings.flow must be one of {', '.join(VLESS_FLOWS)}")
        if _network(hop.settings) != "tcp" or _security(hop) == "none":
            raise ConfigError(f"flow {flow} needs network tcp with tls or reality")
        user["flow"] = flow
    return {"vnext": [{"address": address, "port": port, "users": [user]}]}


def _text(settings: Mapping[str, Any], *keys: str) -> str:
    """The first of `keys` set in settings, stripped ('' when none is)."""
    for key in keys:
        value = settings.get(key)
        if value is None or value == "":
            continue
        if not isinstance(value, str):
            raise ConfigError(f"settings.{key} must be a string, not {value!r}")
        return value.strip()
    return ""


def _network(settings: Mapping[str, Any]) -> str:
    raw = _text(settings, "network") or "tcp"
    network = NETWORK_ALIASES.get(raw.lower())
    if network is None:
        raise ConfigError(
            f"settings.network {raw!r} is not supported; use tcp, ws, grpc, h2, "
            "httpupgrade or xhttp"
        )
    return network


def _security(hop: Hop) -> str:
    default = "tls" if hop.protocol in ("https", "trojan") else "none"
    security = (_text(hop.settings, "security") or default).lower()
    if security not in SECURITIES:
        hint = "; the VMess cipher goes in settings.cipher" if hop.protocol == "vmess" else ""
        raise ConfigError(f"settings.security must be none, tls or reality, not {security!r}{hint}")
    if hop.protocol == "https" and security != "tls":
        raise ConfigError("an https proxy always uses tls; use protocol http for plain HTTP")
    return security


def _stream_settings(hop: Hop) -> dict[str, Any] | None:
    network = _network(hop.settings)
    security = _security(hop)
    stream: dict[str, Any] = {"network": network, "security": security}
    transport = _transport(network, hop.settings)
    if transport is not None:
        stream[f"{_settings_key(network)}Settings"] = transport
    if security == "tls":
        stream["tlsSettings"] = _tls_settings(hop)
    elif security == "reality":
        if network not in REALITY_NETWORKS:
            raise ConfigError(f"reality works over {', '.join(REALITY_NETWORKS)}, not {network}")
        stream["realitySettings"] = _reality_settings(hop)
    if stream == {"network": "tcp", "security": "none"}:
        return None
    return stream


def _settings_key(network: str) -> str:
    return {"h2": "http"}.get(network, network)


def _transport(network: str, settings: Mapping[str, Any]) -> dict[str, Any] | None:
    path = _text(settings, "path") or "/"
    host = _text(settings, "host")
    if network == "tcp":
        return _tcp_header(settings, path, host)
    if network == "ws":
        return {"path": path, **({"headers": {"Host": host}} if host else {})}
    if network == "grpc":
        grpc: dict[str, Any] = {"serviceName": _text(settings, "serviceName")}
        if _text(settings, "mode").lower() == "multi":
            grpc["multiMode"] = True
        return grpc
    if network == "h2":
        hosts = _split_list(host)
        return {"path": path, **({"host": hosts} if hosts else {})}
    if network == "httpupgrade":
        return {"path": path, **({"host": host} if host else {})}
    mode = _text(settings, "mode") or "auto"
    if mode not in XHTTP_MODES:
        raise ConfigError(f"settings.mode for xhttp must be one of {', '.join(XHTTP_MODES)}")
    return {"path": path, **({"host": host} if host else {}), "mode": mode}


def _tcp_header(settings: Mapping[str, Any], path: str, host: str) -> dict[str, Any] | None:
    header_type = (_text(settings, "headerType") or "none").lower()
    if header_type == "none":
        return None
    if header_type != "http":
        raise ConfigError(f"settings.headerType must be none or http, not {header_type!r}")
    request: dict[str, Any] = {"path": [path]}
    if host:
        request["headers"] = {"Host": _split_list(host)}
    return {"header": {"type": "http", "request": request}}


def _split_list(value: Any) -> list[str]:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    if isinstance(value, list | tuple) and all(isinstance(part, str) for part in value):
        return [part.strip() for part in value if part.strip()]
    raise ConfigError(f"expected a list of strings or a comma-separated string, not {value!r}")


def server_name(hop: Hop) -> str:
    """SNI: settings.sni, else the first Host header (CDN fronting), else the address."""
    sni = _text(hop.settings, "sni", "serverName")
    if sni:
        return sni
    hosts = _split_list(_text(hop.settings, "host"))
    return hosts[0] if hosts else _address(hop.host)


def _tls_settings(hop: Hop) -> dict[str, Any]:
    tls: dict[str, Any] = {"serverName": server_name(hop)}
    alpn = hop.settings.get("alpn")
    if alpn:
        try:
            tls["alpn"] = _split_list(alpn)
        except ConfigError as error:
            raise ConfigError(f"settings.alpn: {error.message}") from None
    fingerprint = _text(hop.settings, "fingerprint", "fp").lower()
    if fingerprint:
        tls["fingerprint"] = fingerprint
    insecure = hop.settings.get("allowInsecure", False)
    if not isinstance(insecure, bool):
        raise ConfigError(f"settings.allowInsecure must be true or false, not {insecure!r}")
    if insecure:
        tls["allowInsecure"] = True
    return tls


def _reality_settings(hop: Hop) -> dict[str, Any]:
    public_key = _text(hop.settings, "publicKey", "pbk")
    if not REALITY_KEY_RE.match(public_key) or len(_b64url(public_key)) != 32:
        raise ConfigError("reality needs settings.publicKey: the server's x25519 key (base64url)")
    short_id = _text(hop.settings, "shortId", "sid")
    if not SHORT_ID_RE.match(short_id):
        raise ConfigError("settings.shortId must be 0 to 16 hex digits, an even number of them")
    spider_x = _text(hop.settings, "spiderX", "spx") or "/"
    if not spider_x.startswith("/"):
        raise ConfigError("settings.spiderX must start with /")
    return {
        "serverName": server_name(hop),
        # Older Xray refuses REALITY without a uTLS fingerprint; chrome is its usual default.
        "fingerprint": _text(hop.settings, "fingerprint", "fp").lower() or "chrome",
        "publicKey": public_key.rstrip("="),
        "shortId": short_id.lower(),
        "spiderX": spider_x,
    }


def _b64url(value: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(value.rstrip("=") + "=")
    except (binascii.Error, ValueError):
        return b""
