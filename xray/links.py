"""Share links (`vless://`, `vmess://`, `trojan://`, `ss://`, `socks5://`, `http(s)://`).

Each parses into the fields of a Proxy row: VMess/VLESS UUIDs go in `password`, the
Shadowsocks method in `settings["method"]`, transport and TLS options in `settings` under
the keys `xray.config` reads.
"""

from __future__ import annotations

import base64
import binascii
import ipaddress
import json
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, unquote

from xray.config import NETWORK_ALIASES
from xray.hops import ParsedProxy

HOSTNAME_RE = re.compile(r"^[A-Za-z0-9_]([A-Za-z0-9_.-]*[A-Za-z0-9_])?\.?$")
LINK_MAX = 8192
SECURITIES = {"": "none", "none": "none", "tls": "tls", "reality": "reality"}
# Query parameters of vless:// and trojan:// links -> settings keys (beyond type/security).
QUERY_SETTINGS = {
    "sni": "sni",
    "peer": "sni",
    "fp": "fingerprint",
    "pbk": "publicKey",
    "sid": "shortId",
    "spx": "spiderX",
    "path": "path",
    "host": "host",
    "serviceName": "serviceName",
    "mode": "mode",
    "headerType": "headerType",
    "flow": "flow",
}


class ShareLinkError(ValueError):
    """A share link that cannot be imported; `message` says why, for the person pasting it.

    A message never quotes the link or any part of it: a link carries credentials, and a
    part that looks like a host or a port may be a password where the link is malformed.
    """

    def __init__(self, message: str) -> None:
        super().__init__(message)
        self.message = message


def parse_share_link(link: str) -> ParsedProxy:
    """Parse one share link; ShareLinkError says what is wrong with a bad one."""
    if not isinstance(link, str) or not link.strip():
        raise ShareLinkError("the link is empty")
    text = link.strip()
    if len(text) > LINK_MAX:
        raise ShareLinkError(f"the link is longer than {LINK_MAX} characters")
    scheme, separator, rest = text.partition("://")
    if not separator or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]*", scheme):
        raise ShareLinkError("not a share link: expected something like vless://... or ss://...")
    parser = PARSERS.get(scheme.lower())
    if parser is None:
        raise ShareLinkError(
            "unsupported link type; use vless://, vmess://, trojan://, ss://, socks5://, "
            "http:// or https://"
        )
    return parser(rest)


@dataclass(frozen=True)
class _Parts:
    """`userinfo@host:port?query#fragment`, split but not yet decoded."""

    userinfo: str | None
    hostport: str
    path: str
    query: dict[str, str]
    name: str


def _split(rest: str) -> _Parts:
    rest, _, fragment = rest.partition("#")
    rest, _, query = rest.partition("?")
    # The user info may hold `/` (standard base64 in ss:// links): split at `@` first.
    userinfo, at, tail = rest.rpartition("@")
    hostport, slash, path = tail.partition("/")
    try:
        values = parse_qs(query, keep_blank_values=True, strict_parsing=False)
    except ValueError:
        raise ShareLinkError("the link's query string is malformed") from None
    return _Parts(
        userinfo=userinfo if at else None,
        hostport=hostport,
        path=slash + path,
        query={key: value[0] for key, value in values.items()},
        name=unquote(fragment).strip(),
    )


def _host_port(text: str) -> tuple[str, int]:
    """`host:port` or `[ipv6]:port`, checked; the host comes back without brackets."""
    if not text:
        raise ShareLinkError("the link has no host")
    if text.startswith("["):
        host, bracket, port_text = text[1:].partition("]")
        if not bracket:
            raise ShareLinkError("an IPv6 host needs a closing ]")
        try:
            host = str(ipaddress.IPv6Address(host))
        except ValueError:
            raise ShareLinkError("the host in [...] is not an IPv6 address") from None
        if not port_text.startswith(":"):
            raise ShareLinkError("the link has no port (expected host:port)")
        return host, _port(port_text[1:])
    host, colon, port_text = text.rpartition(":")
    if not colon:
        raise ShareLinkError("the link has no port (expected host:port)")
    if ":" in host:
        raise ShareLinkError("an IPv6 host must be in brackets, like [2001:db8::1]:443")
    return _hostname(host), _port(port_text)


def _hostname(host: str) -> str:
    host = unquote(host).strip()
    if not host:
        raise ShareLinkError("the link has no host")
    if not HOSTNAME_RE.match(host) or len(host) > 253:
        raise ShareLinkError("the host is not a host name or IP address")
    return host


def _port(text: Any) -> int:
    text = str(text).strip()
    if not text:
        raise ShareLinkError("the link has no port (expected host:port)")
    if not text.isascii() or not text.isdigit():
        raise ShareLinkError("the port is not a number")
    port = int(text)
    if not 1 <= port <= 65535:
        raise ShareLinkError("the port is out of range (1-65535)")
    return port


def _name(name: str, host: str, port: int) -> str:
    if name:
        return name
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _uuid(value: str, scheme: str) -> str:
    value = unquote(value).strip()
    if not value:
        raise ShareLinkError(f"the {scheme} link has no UUID (expected {scheme}://UUID@host:port)")
    try:
        return str(uuid.UUID(value))
    except ValueError:
        raise ShareLinkError(
            f"the {scheme} link's id is not a UUID (which {scheme} needs)"
        ) from None


def _b64decode(text: str, what: str) -> str:
    """Standard or URL-safe base64, padded or not, to UTF-8 text."""
    compact = re.sub(r"\s+", "", unquote(text)).replace("-", "+").replace("_", "/").rstrip("=")
    try:
        raw = base64.b64decode(compact + "=" * (-len(compact) % 4), validate=True)
    except (binascii.Error, ValueError):
        raise ShareLinkError(f"{what} is not valid base64") from None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ShareLinkError(f"{what} is base64 of binary data, not text") from None


def _stream_settings(query: dict[str, str], default_security: str) -> dict[str, Any]:
    """Settings from the transport/TLS query parameters shared by vless:// and trojan://."""
    network_raw = query.get("type", "").strip().lower() or "tcp"
    network = NETWORK_ALIASES.get(network_raw)
    if network is None:
        raise ShareLinkError(
            "the transport (type=) is not supported; use tcp, ws, grpc, h2, httpupgrade or xhttp"
        )
    security_raw = query.get("security", default_security).strip().lower()
    security = SECURITIES.get(security_raw)
    if security is None:
        raise ShareLinkError("the security= value is not supported; use none, tls or reality")
    settings: dict[str, Any] = {"network": network, "security": security}
    for parameter, key in QUERY_SETTINGS.items():
        value = query.get(parameter, "").strip()
        if value and key not in settings:
            settings[key] = value
    if settings.get("headerType") == "none":
        del settings["headerType"]
    alpn = [part.strip() for part in query.get("alpn", "").split(",") if part.strip()]
    if alpn:
        settings["alpn"] = alpn
    if query.get("allowInsecure", query.get("insecure", "")).strip().lower() in ("1", "true"):
        settings["allowInsecure"] = True
    if security == "reality" and not settings.get("publicKey"):
        raise ShareLinkError("a reality link needs pbk (the server's public key)")
    return settings


def _parse_vless(rest: str) -> ParsedProxy:
    parts = _split(rest)
    host, port = _host_port(parts.hostport)
    user_id = _uuid(parts.userinfo or "", "vless")
    encryption = parts.query.get("encryption", "none").strip().lower() or "none"
    if encryption != "none":
        raise ShareLinkError("VLESS encryption= other than none is not supported")
    settings = _stream_settings(parts.query, "none")
    return ParsedProxy(
        _name(parts.name, host, port), "vless", host, port, password=user_id, settings=settings
    )


def _parse_trojan(rest: str) -> ParsedProxy:
    parts = _split(rest)
    host, port = _host_port(parts.hostport)
    password = unquote(parts.userinfo or "")
    if not password:
        raise ShareLinkError(
            "the trojan link has no password (expected trojan://password@host:port)"
        )
    settings = _stream_settings(parts.query, "tls")
    return ParsedProxy(
        _name(parts.name, host, port), "trojan", host, port, password=password, settings=settings
    )


def _parse_vmess(rest: str) -> ParsedProxy:
    body, _, fragment = rest.partition("#")
    text = _b64decode(body, "the vmess link")
    try:
        data = json.loads(text)
    except ValueError:
        raise ShareLinkError("the vmess link does not hold JSON (v2rayN format)") from None
    if not isinstance(data, dict):
        raise ShareLinkError("the vmess link's JSON is not an object (v2rayN format)")
    field_text = _vmess_fields(data)
    host = _hostname_or_ip(field_text("add"))
    port = _port(field_text("port"))
    user_id = _uuid(field_text("id"), "vmess")
    settings = _vmess_settings(field_text)
    name = field_text("ps") or unquote(fragment).strip()
    return ParsedProxy(
        _name(name, host, port), "vmess", host, port, password=user_id, settings=settings
    )


def _vmess_fields(data: dict[str, Any]) -> Callable[[str], str]:
    def field_text(key: str) -> str:
        value = data.get(key)
        if value is None:
            return ""
        if isinstance(value, bool) or not isinstance(value, str | int):
            raise ShareLinkError(f"the vmess field {key!r} must be a string or a number")
        return str(value).strip()

    return field_text


def _hostname_or_ip(host: str) -> str:
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return str(ipaddress.ip_address(bare))
    except ValueError:
        return _hostname(host)


def _vmess_settings(field_text: Callable[[str], str]) -> dict[str, Any]:
    """v2rayN's fields: net/type/host/path/tls/sni/alpn/fp, aid and scy."""
    network_raw = field_text("net").lower() or "tcp"
    network = NETWORK_ALIASES.get(network_raw)
    if network is None:
        raise ShareLinkError(
            "the vmess transport (net) is not supported; use tcp, ws, grpc, h2, httpupgrade "
            "or xhttp"
        )
    security = SECURITIES.get(field_text("tls").lower())
    if security is None:
        raise ShareLinkError("the vmess tls value is not supported; use tls or none")
    settings: dict[str, Any] = {"network": network, "security": security}
    alter_id = field_text("aid") or "0"
    if not (alter_id.isascii() and alter_id.isdigit() and len(alter_id) <= 5):  # not "²"
        raise ShareLinkError("the vmess aid is not a number")
    settings["alterId"] = int(alter_id)
    settings["cipher"] = field_text("scy").lower() or "auto"
    header_type = field_text("type").lower()
    if network == "grpc":
        _put(settings, "serviceName", field_text("path"))
        if header_type == "multi":
            settings["mode"] = "multi"
    else:
        _put(settings, "path", field_text("path"))
        if network == "tcp" and header_type == "http":
            settings["headerType"] = "http"
    for source, key in (("host", "host"), ("sni", "sni"), ("fp", "fingerprint")):
        _put(settings, key, field_text(source))
    alpn = [part.strip() for part in field_text("alpn").split(",") if part.strip()]
    if alpn:
        settings["alpn"] = alpn
    return settings


def _put(settings: dict[str, Any], key: str, value: str) -> None:
    if value:
        settings[key] = value


def _parse_shadowsocks(rest: str) -> ParsedProxy:
    body = rest.partition("#")[0].partition("?")[0].rstrip("/")
    if "@" not in body:
        return _parse_legacy_shadowsocks(rest)
    parts = _split(rest)
    if parts.query.get("plugin"):
        raise ShareLinkError("shadowsocks plugins (obfs, v2ray-plugin...) are not supported")
    host, port = _host_port(parts.hostport)
    userinfo = parts.userinfo or ""
    if ":" in unquote(userinfo):
        credentials = unquote(userinfo)  # SIP002 allows plain method:password, percent-encoded
    else:
        credentials = _b64decode(userinfo, "the ss link's user info")
    method, password = _method_password(credentials)
    return _shadowsocks(parts.name, host, port, method, password)


def _parse_legacy_shadowsocks(rest: str) -> ParsedProxy:
    """ss://base64(method:password@host:port)#name."""
    body, _, fragment = rest.partition("#")
    decoded = _b64decode(body.partition("?")[0], "the ss link")
    credentials, at, hostport = decoded.rpartition("@")
    if not at:
        raise ShareLinkError("the ss link has no host (expected method:password@host:port)")
    host, port = _host_port(hostport)
    method, password = _method_password(credentials)
    return _shadowsocks(unquote(fragment).strip(), host, port, method, password)


def _method_password(credentials: str) -> tuple[str, str]:
    method, colon, password = credentials.partition(":")
    if not colon or not method.strip():
        raise ShareLinkError("the ss link needs method:password (e.g. aes-256-gcm:secret)")
    if not password:
        raise ShareLinkError("the ss link has no password")
    return method.strip().lower(), password


def _shadowsocks(name: str, host: str, port: int, method: str, password: str) -> ParsedProxy:
    return ParsedProxy(
        _name(name, host, port),
        "shadowsocks",
        host,
        port,
        password=password,
        settings={"method": method},
    )


def _user_pass(userinfo: str | None) -> tuple[str | None, str | None]:
    """`user:pass` (percent-encoded), or v2rayN's base64 of it."""
    if not userinfo:
        return None, None
    if ":" not in unquote(userinfo):
        try:
            decoded = _b64decode(userinfo, "user info")
        except ShareLinkError:
            decoded = ""
        if ":" in decoded:
            user, _, password = decoded.partition(":")
            return user or None, password or None
    user, _, password = userinfo.partition(":")
    return unquote(user) or None, unquote(password) or None


def _plain_proxy(protocol: str) -> Callable[[str], ParsedProxy]:
    def parse(rest: str) -> ParsedProxy:
        parts = _split(rest)
        if parts.path not in ("", "/"):
            raise ShareLinkError(f"a {protocol} proxy link has no path")
        host, port = _host_port(parts.hostport)
        username, password = _user_pass(parts.userinfo)
        if password and not username:
            raise ShareLinkError(f"the {protocol} link has a password but no user name")
        return ParsedProxy(
            _name(parts.name, host, port), protocol, host, port, username, password, {}
        )

    return parse


PARSERS: dict[str, Callable[[str], ParsedProxy]] = {
    "vless": _parse_vless,
    "vmess": _parse_vmess,
    "trojan": _parse_trojan,
    "ss": _parse_shadowsocks,
    "socks5": _plain_proxy("socks5"),
    "socks": _plain_proxy("socks5"),
    "http": _plain_proxy("http"),
    "https": _plain_proxy("https"),
}


def redact_share_link(link: str, limit: int = 160) -> str:
    """A share link as it may be shown back (next to its import error): scheme, host:port and
    name only. User info (passwords, UUIDs) and base64 bodies (vmess://, legacy ss://, which
    hold them) become `…`; anything not shaped like a link is hidden whole."""
    text = link.strip()
    scheme, separator, rest = text.partition("://")
    if not separator or not re.fullmatch(r"[A-Za-z][A-Za-z0-9+.-]{0,15}", scheme):
        return "…"
    rest, hashed, fragment = rest.partition("#")
    body, queried, _query = rest.partition("?")
    _userinfo, at, hostport = body.rpartition("@")
    if at:
        shown = f"{scheme}://…@{hostport}"
    elif scheme.lower() not in ("vmess", "ss") and re.fullmatch(
        r"(\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9._-]+):[0-9]{1,5}/?", body
    ):
        shown = f"{scheme}://{body}"
    else:
        shown = f"{scheme}://…"
    if queried:
        shown += "?…"
    if hashed:
        shown += "#" + unquote(fragment)
    return shown if len(shown) <= limit else shown[: limit - 1] + "…"
