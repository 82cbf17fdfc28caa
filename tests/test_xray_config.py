"""Sidecar configs: the exact JSON per protocol, chains, fail-closed routing, real binary checks.

The binary is the one `find_binary` picks (CORRAL_XRAY_BIN, else xray, else v2ray; CI
installs Debian's v2ray 4.34). Without one these tests fail: they never skip.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import os
import socket
import struct
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

from xray.binary import (
    XrayBinary,
    XrayBinaryError,
    ensure_supported,
    find_binary,
    inspect_binary,
    validate,
)
from xray.config import BACKGROUND_DOMAINS, ConfigError, build_config, features_used, write_config
from xray.hops import MAX_CHAIN_HOPS, PROTOCOLS, Hop, credential_problems

UUID = "b831381d-6324-4d53-ad4f-8cda48b30811"
PUBLIC_KEY = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"  # 32 bytes, base64url


@pytest.fixture(scope="module")
def binary() -> XrayBinary:
    return find_binary(os.environ.get("CORRAL_XRAY_BIN"))


def proxy_outbound(config: dict[str, Any]) -> dict[str, Any]:
    outbound: dict[str, Any] = config["outbounds"][0]
    return outbound


@dataclass(frozen=True)
class Case:
    """One proxy and the exact `proxy` outbound it must become."""

    id: str
    hop: Hop
    expected: dict[str, Any]
    xray_only: bool = False  # uses REALITY, XTLS flow, xhttp...: V2Ray cannot run it


def _servers(address: str, port: int, **extra: Any) -> dict[str, Any]:
    return {"servers": [{"address": address, "port": port, **extra}]}


def _vnext(address: str, port: int, user: dict[str, Any]) -> dict[str, Any]:
    return {"vnext": [{"address": address, "port": port, "users": [user]}]}


VLESS_USER = {"id": UUID, "encryption": "none"}
VMESS_USER = {"id": UUID, "alterId": 0, "security": "auto"}

CASES = [
    Case(
        "http",
        Hop("h", "http", "proxy.example.com", 3128),
        {"tag": "proxy", "protocol": "http", "settings": _servers("proxy.example.com", 3128)},
    ),
    Case(
        "http-credentials",
        Hop("h", "http", "proxy.example.com", 3128, "alice", "s3cret:@/"),
        {
            "tag": "proxy",
            "protocol": "http",
            "settings": _servers(
                "proxy.example.com", 3128, users=[{"user": "alice", "pass": "s3cret:@/"}]
            ),
        },
    ),
    Case(
        "https",
        Hop("h", "https", "secure.example.com", 443),
        {
            "tag": "proxy",
            "protocol": "http",
            "settings": _servers("secure.example.com", 443),
            "streamSettings": {
                "network": "tcp",
                "security": "tls",
                "tlsSettings": {"serverName": "secure.example.com"},
            },
        },
    ),
    Case(
        "https-credentials-sni-alpn",
        Hop(
            "h",
            "https",
            "203.0.113.7",
            8443,
            "bob",
            "pw",
            {"sni": "front.example.com", "alpn": "h2, http/1.1", "fingerprint": "Chrome"},
        ),
        {
            "tag": "proxy",
            "protocol": "http",
            "settings": _servers("203.0.113.7", 8443, users=[{"user": "bob", "pass": "pw"}]),
            "streamSettings": {
                "network": "tcp",
                "security": "tls",
                "tlsSettings": {
                    "serverName": "front.example.com",
                    "alpn": ["h2", "http/1.1"],
                    "fingerprint": "chrome",
                },
            },
        },
    ),
    Case(
        "socks5",
        Hop("s", "socks5", "10.1.2.3", 1080),
        {"tag": "proxy", "protocol": "socks", "settings": _servers("10.1.2.3", 1080)},
    ),
    Case(
        "socks5-credentials-ipv6",
        Hop("s", "socks5", "[2001:db8::5]", 1080, "carol", "pw"),
        {
            "tag": "proxy",
            "protocol": "socks",
            "settings": _servers("2001:db8::5", 1080, users=[{"user": "carol", "pass": "pw"}]),
        },
    ),
    Case(
        "shadowsocks",
        Hop("ss", "shadowsocks", "ss.example.com", 8388, None, "pw", {"method": "AES-256-GCM"}),
        {
            "tag": "proxy",
            "protocol": "shadowsocks",
            "settings": _servers("ss.example.com", 8388, method="aes-256-gcm", password="pw"),
        },
    ),
    Case(
        "shadowsocks-2022",
        Hop(
            "ss",
            "shadowsocks",
            "ss.example.com",
            8388,
            None,
            "AAECAwQFBgcICQoLDA0ODw==",
            {"method": "2022-blake3-aes-128-gcm"},
        ),
        {
            "tag": "proxy",
            "protocol": "shadowsocks",
            "settings": _servers(
                "ss.example.com",
                8388,
                method="2022-blake3-aes-128-gcm",
                password="AAECAwQFBgcICQoLDA0ODw==",
            ),
        },
        xray_only=True,
    ),
    Case(
        "vmess",
        Hop("vm", "vmess", "vm.example.com", 10086, None, UUID.upper()),
        {
            "tag": "proxy",
            "protocol": "vmess",
            "settings": _vnext("vm.example.com", 10086, VMESS_USER),
        },
    ),
    Case(
        "vmess-ws-tls",
        Hop(
            "vm",
            "vmess",
            "104.16.0.1",
            443,
            None,
            UUID,
            {
                "network": "ws",
                "security": "tls",
                "path": "/ray",
                "host": "cdn.example.com",
                "alterId": "4",
                "cipher": "aes-128-gcm",
                "allowInsecure": True,
            },
        ),
        {
            "tag": "proxy",
            "protocol": "vmess",
            "settings": _vnext(
                "104.16.0.1", 443, {"id": UUID, "alterId": 4, "security": "aes-128-gcm"}
            ),
            "streamSettings": {
                "network": "ws",
                "security": "tls",
                "wsSettings": {"path": "/ray", "headers": {"Host": "cdn.example.com"}},
                # No sni: the Host header names the server (CDN fronting), as v2rayN does.
                "tlsSettings": {"serverName": "cdn.example.com", "allowInsecure": True},
            },
        },
    ),
    Case(
        "vmess-tcp-http-header",
        Hop(
            "vm",
            "vmess",
            "vm.example.com",
            80,
            None,
            UUID,
            {"headerType": "http", "host": "a.example.com,b.example.com", "path": "/x"},
        ),
        {
            "tag": "proxy",
            "protocol": "vmess",
            "settings": _vnext("vm.example.com", 80, VMESS_USER),
            "streamSettings": {
                "network": "tcp",
                "security": "none",
                "tcpSettings": {
                    "header": {
                        "type": "http",
                        "request": {
                            "path": ["/x"],
                            "headers": {"Host": ["a.example.com", "b.example.com"]},
                        },
                    }
                },
            },
        },
    ),
    Case(
        "vmess-h2",
        Hop(
            "vm",
            "vmess",
            "vm.example.com",
            443,
            None,
            UUID,
            {"network": "http", "security": "tls", "host": "h2.example.com", "path": "/h2"},
        ),
        {
            "tag": "proxy",
            "protocol": "vmess",
            "settings": _vnext("vm.example.com", 443, VMESS_USER),
            "streamSettings": {
                "network": "h2",
                "security": "tls",
                "httpSettings": {"path": "/h2", "host": ["h2.example.com"]},
                "tlsSettings": {"serverName": "h2.example.com"},
            },
        },
    ),
    Case(
        "vless",
        Hop("vl", "vless", "vl.example.com", 443, None, UUID),
        {
            "tag": "proxy",
            "protocol": "vless",
            "settings": _vnext("vl.example.com", 443, VLESS_USER),
        },
    ),
    Case(
        "vless-ws-tls",
        Hop(
            "vl",
            "vless",
            "vl.example.com",
            443,
            None,
            UUID,
            {"network": "ws", "security": "tls", "sni": "sni.example.com", "path": "/ws?ed=2048"},
        ),
        {
            "tag": "proxy",
            "protocol": "vless",
            "settings": _vnext("vl.example.com", 443, VLESS_USER),
            "streamSettings": {
                "network": "ws",
                "security": "tls",
                "wsSettings": {"path": "/ws?ed=2048"},
                "tlsSettings": {"serverName": "sni.example.com"},
            },
        },
    ),
    Case(
        "vless-grpc-tls",
        Hop(
            "vl",
            "vless",
            "vl.example.com",
            443,
            None,
            UUID,
            {"network": "grpc", "security": "tls", "serviceName": "tun", "mode": "multi"},
        ),
        {
            "tag": "proxy",
            "protocol": "vless",
            "settings": _vnext("vl.example.com", 443, VLESS_USER),
            "streamSettings": {
                "network": "grpc",
                "security": "tls",
                "grpcSettings": {"serviceName": "tun", "multiMode": True},
                "tlsSettings": {"serverName": "vl.example.com"},
            },
        },
        xray_only=True,  # V2Ray has gRPC from 4.36 only
    ),
    Case(
        "vless-reality-vision",
        Hop(
            "vl",
            "vless",
            "198.51.100.9",
            443,
            None,
            UUID,
            {
                "security": "reality",
                "sni": "www.microsoft.com",
                "publicKey": PUBLIC_KEY,
                "shortId": "0123ABCD",
                "flow": "xtls-rprx-vision",
            },
        ),
        {
            "tag": "proxy",
            "protocol": "vless",
            "settings": _vnext("198.51.100.9", 443, {**VLESS_USER, "flow": "xtls-rprx-vision"}),
            "streamSettings": {
                "network": "tcp",
                "security": "reality",
                "realitySettings": {
                    "serverName": "www.microsoft.com",
                    "fingerprint": "chrome",
                    "publicKey": PUBLIC_KEY,
                    "shortId": "0123abcd",
                    "spiderX": "/",
                },
            },
        },
        xray_only=True,
    ),
    Case(
        "vless-reality-grpc",
        Hop(
            "vl",
            "vless",
            "vl.example.com",
            443,
            None,
            UUID,
            {
                "network": "grpc",
                "serviceName": "g",
                "security": "reality",
                "publicKey": PUBLIC_KEY,
                "fingerprint": "firefox",
                "spiderX": "/path?x=1",
            },
        ),
        {
            "tag": "proxy",
            "protocol": "vless",
            "settings": _vnext("vl.example.com", 443, VLESS_USER),
            "streamSettings": {
                "network": "grpc",
                "security": "reality",
                "grpcSettings": {"serviceName": "g"},
                "realitySettings": {
                    "serverName": "vl.example.com",
                    "fingerprint": "firefox",
                    "publicKey": PUBLIC_KEY,
                    "shortId": "",
                    "spiderX": "/path?x=1",
                },
            },
        },
        xray_only=True,
    ),
    Case(
        "vless-xhttp",
        Hop(
            "vl",
            "vless",
            "vl.example.com",
            443,
            None,
            UUID,
            {"network": "xhttp", "security": "tls", "path": "/x", "mode": "stream-one"},
        ),
        {
            "tag": "proxy",
            "protocol": "vless",
            "settings": _vnext("vl.example.com", 443, VLESS_USER),
            "streamSettings": {
                "network": "xhttp",
                "security": "tls",
                "xhttpSettings": {"path": "/x", "mode": "stream-one"},
                "tlsSettings": {"serverName": "vl.example.com"},
            },
        },
        xray_only=True,
    ),
    Case(
        "trojan",
        Hop("tj", "trojan", "tj.example.com", 443, None, "pa:ss"),
        {
            "tag": "proxy",
            "protocol": "trojan",
            "settings": _servers("tj.example.com", 443, password="pa:ss"),
            "streamSettings": {
                "network": "tcp",
                "security": "tls",
                "tlsSettings": {"serverName": "tj.example.com"},
            },
        },
    ),
    Case(
        "trojan-ws",
        Hop(
            "tj",
            "trojan",
            "tj.example.com",
            443,
            None,
            "pw",
            {"network": "ws", "path": "/t", "sni": "t.example.com", "alpn": ["http/1.1"]},
        ),
        {
            "tag": "proxy",
            "protocol": "trojan",
            "settings": _servers("tj.example.com", 443, password="pw"),
            "streamSettings": {
                "network": "ws",
                "security": "tls",
                "wsSettings": {"path": "/t"},
                "tlsSettings": {"serverName": "t.example.com", "alpn": ["http/1.1"]},
            },
        },
    ),
    Case(
        "trojan-no-tls-when-asked",
        Hop("tj", "trojan", "tj.example.com", 80, None, "pw", {"security": "none"}),
        {
            "tag": "proxy",
            "protocol": "trojan",
            "settings": _servers("tj.example.com", 80, password="pw"),
        },
    ),
]
PORTABLE = [case for case in CASES if not case.xray_only]
XRAY_ONLY = [case for case in CASES if case.xray_only]


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.id)
def test_each_protocol_becomes_the_exact_outbound(case: Case) -> None:
    config = build_config([case.hop], 10808)
    assert config["outbounds"] == [
        case.expected,
        {"tag": "block", "protocol": "blackhole", "settings": {}},
    ]


def test_the_whole_config_for_one_proxy() -> None:
    config = build_config(
        [Hop("h", "http", "proxy.example.com", 3128)],
        20001,
        log_level="error",
        block_domains=["domain:example.org", "full:ads.example.net"],
    )
    assert config == {
        "log": {"loglevel": "error"},
        "inbounds": [
            {
                "tag": "socks-in",
                "protocol": "socks",
                "listen": "127.0.0.1",
                "port": 20001,
                "settings": {"auth": "noauth", "udp": False},
            }
        ],
        "outbounds": [
            {"tag": "proxy", "protocol": "http", "settings": _servers("proxy.example.com", 3128)},
            {"tag": "block", "protocol": "blackhole", "settings": {}},
        ],
        "routing": {
            "domainStrategy": "AsIs",
            "rules": [
                {
                    "type": "field",
                    "domain": ["domain:example.org", "full:ads.example.net"],
                    "outboundTag": "block",
                }
            ],
        },
    }
    json.dumps(config)  # plain JSON types only


def test_background_domains_go_to_the_blackhole_by_default() -> None:
    config = build_config([Hop("h", "http", "proxy.example.com", 3128)], 20001)
    assert config["routing"]["rules"] == [
        {"type": "field", "domain": list(BACKGROUND_DOMAINS), "outboundTag": "block"}
    ]
    for expected in (
        "domain:accounts.google.com",
        "domain:update.googleapis.com",
        "domain:clients2.google.com",
        "domain:gvt1.com",
        "domain:gstatic.com",
        "domain:safebrowsing.googleapis.com",
        "domain:optimizationguide-pa.googleapis.com",
        "domain:content-autofill.googleapis.com",
    ):
        assert expected in BACKGROUND_DOMAINS
    assert all(domain.startswith("domain:") for domain in BACKGROUND_DOMAINS)


def test_no_block_rule_when_nothing_is_blocked() -> None:
    config = build_config([Hop("h", "http", "proxy.example.com", 3128)], 20001, block_domains=[])
    assert config["routing"] == {"domainStrategy": "AsIs", "rules": []}
    assert config["outbounds"][-1]["tag"] == "block"


HTTP_HOP = Hop("first", "http", "first.example.com", 3128, "u1", "p1")
SOCKS_HOP = Hop("second", "socks5", "second.example.com", 1080, "u2", "p2")
TROJAN_HOP = Hop("third", "trojan", "third.example.com", 443, None, "p3")


def test_two_hop_chain_dials_the_proxy_through_the_next_hop() -> None:
    config = build_config([HTTP_HOP, SOCKS_HOP], 20001)
    first, second, block = config["outbounds"]
    assert first["tag"] == "proxy"
    assert first["proxySettings"] == {"tag": "hop-1", "transportLayer": True}
    assert second == {
        "tag": "hop-1",
        "protocol": "socks",
        "settings": _servers("second.example.com", 1080, users=[{"user": "u2", "pass": "p2"}]),
    }
    assert block == {"tag": "block", "protocol": "blackhole", "settings": {}}


def test_three_hop_chain_links_each_hop_to_the_next() -> None:
    config = build_config([HTTP_HOP, SOCKS_HOP, TROJAN_HOP], 20001)
    tags = [(o["tag"], o.get("proxySettings", {}).get("tag")) for o in config["outbounds"]]
    assert tags == [("proxy", "hop-1"), ("hop-1", "hop-2"), ("hop-2", None), ("block", None)]
    last = config["outbounds"][2]
    assert last["protocol"] == "trojan"
    assert last["streamSettings"]["tlsSettings"] == {"serverName": "third.example.com"}


@pytest.mark.parametrize("protocol", PROTOCOLS)
def test_the_config_refuses_exactly_what_saving_refuses(protocol: str) -> None:
    # One rule set (xray.hops) for server.proxies on save and for the generator on build:
    # every credential shape is refused by both, with the same words, or by neither.
    settings = {"method": "aes-256-gcm"} if protocol == "shadowsocks" else {}
    shapes = [(None, None), ("user", None), (None, "pw"), ("user", "pw"), (None, UUID)]
    for username, password in [*shapes, ("user", UUID)]:
        hop = Hop("x", protocol, "h.example.com", 1, username, password, settings)
        problems = credential_problems(protocol, username, password)
        if not problems:
            build_config([hop], 1080)
            continue
        with pytest.raises(ConfigError) as refused:
            build_config([hop], 1080)
        assert refused.value.message == f"proxy 'x': {problems[0].message}", (username, password)


@pytest.mark.parametrize("length", [1, 2, 3, MAX_CHAIN_HOPS])
def test_never_a_direct_outbound(length: int) -> None:
    chain = [HTTP_HOP, SOCKS_HOP, TROJAN_HOP, *[HTTP_HOP] * MAX_CHAIN_HOPS][:length]
    config = build_config(chain, 20001)
    protocols = {outbound["protocol"] for outbound in config["outbounds"]}
    assert protocols.isdisjoint({"freedom", "direct", "dns", "loopback"})
    assert config["outbounds"][0]["tag"] == "proxy"  # the default route is the chain
    assert len(config["outbounds"]) == length + 1
    for case in CASES:
        outbounds = build_config([case.hop], 1)["outbounds"]
        assert {o["protocol"] for o in outbounds}.isdisjoint({"freedom", "direct"})


def test_features_used_names_what_the_binary_must_support() -> None:
    assert features_used([HTTP_HOP]) == {"http", "tcp"}
    assert features_used([CASES[3].hop]) == {"https", "tcp", "tls"}
    reality = next(case.hop for case in CASES if case.id == "vless-reality-vision")
    assert features_used([reality]) == {"vless", "tcp", "reality", "xtls-flow"}
    ss2022 = next(case.hop for case in CASES if case.id == "shadowsocks-2022")
    assert "shadowsocks-2022" in features_used([ss2022])
    ws = next(case.hop for case in CASES if case.id == "trojan-ws")
    assert "chained-transport" in features_used([ws, HTTP_HOP])  # ws dialed through a hop
    assert "chained-transport" not in features_used([HTTP_HOP, ws])  # the last hop: directly
    assert "chained-transport" in features_used([HTTP_HOP, ws, SOCKS_HOP])
    assert "chained-transport" not in features_used([TROJAN_HOP, SOCKS_HOP])  # tcp + tls is fine


@pytest.mark.parametrize(
    ("chain", "message"),
    [
        ([], "the proxy chain is empty"),
        ([HTTP_HOP] * (MAX_CHAIN_HOPS + 1), "at most 8 hops"),
        ([Hop("x", "wireguard", "h.example.com", 1)], "unknown protocol 'wireguard'"),
        ([Hop("x", "vmess", "h.example.com", 1)], "vmess needs a UUID in password"),
        ([Hop("x", "vless", "h.example.com", 1, None, "not-a-uuid")], "vless needs a UUID"),
        ([Hop("x", "vless", "h.example.com", 1, "user", UUID)], "vless proxies take no username"),
        ([Hop("x", "trojan", "h.example.com", 1)], "trojan needs a password in password"),
        (
            [Hop("x", "shadowsocks", "h.example.com", 1, None, "pw")],
            "shadowsocks needs settings.method",
        ),
        (
            [Hop("x", "shadowsocks", "h.example.com", 1, None, None, {"method": "aes-256-gcm"})],
            "shadowsocks needs a password",
        ),
        ([Hop("x", "socks5", "h.example.com", 1, None, "pw")], "need a username"),
        ([Hop("x", "http", "h.example.com", 0)], "port must be a number from 1 to 65535"),
        ([Hop("x", "http", "h.example.com", 70000)], "port must be a number from 1 to 65535"),
        ([Hop("x", "http", "bad host", 80)], "'bad host' is not a host name"),
        ([Hop("x", "http", "h.example.com", 1, settings={"network": "kcp"})], "network 'kcp'"),
        (
            [Hop("x", "vmess", "h.example.com", 1, None, UUID, {"security": "aes-128-gcm"})],
            "the VMess cipher goes in settings.cipher",
        ),
        (
            [Hop("x", "vmess", "h.example.com", 1, None, UUID, {"cipher": "rc4"})],
            "settings.cipher must be one of",
        ),
        (
            [Hop("x", "https", "h.example.com", 1, settings={"security": "none"})],
            "an https proxy always uses tls",
        ),
        (
            [Hop("x", "vless", "h.example.com", 1, None, UUID, {"security": "reality"})],
            "reality needs settings.publicKey",
        ),
        (
            [
                Hop(
                    "x",
                    "vless",
                    "h.example.com",
                    1,
                    None,
                    UUID,
                    {"security": "reality", "publicKey": PUBLIC_KEY, "shortId": "abc"},
                )
            ],
            "shortId must be 0 to 16 hex digits",
        ),
        (
            [
                Hop(
                    "x",
                    "vless",
                    "h.example.com",
                    1,
                    None,
                    UUID,
                    {"security": "reality", "publicKey": PUBLIC_KEY, "network": "ws"},
                )
            ],
            "reality works over tcp, grpc, h2, xhttp, not ws",
        ),
        (
            [
                Hop(
                    "x",
                    "vless",
                    "h.example.com",
                    1,
                    None,
                    UUID,
                    {"flow": "xtls-rprx-vision", "network": "ws", "security": "tls"},
                )
            ],
            "needs network tcp with tls or reality",
        ),
        (
            [Hop("x", "vless", "h.example.com", 1, None, UUID, {"flow": "xtls-rprx-direct"})],
            "settings.flow must be one of",
        ),
        (
            [Hop("x", "trojan", "h.example.com", 1, None, "p", {"allowInsecure": "yes"})],
            "allowInsecure must be true or false",
        ),
        ([Hop("x", "trojan", "h.example.com", 1, None, "p", {"alpn": 5})], "settings.alpn"),
        ([Hop("x", "trojan", "h.example.com", 1, None, "p", {"path": 5})], "settings.path must be"),
        (
            [HTTP_HOP, Hop("bad-hop", "vmess", "h.example.com", 1)],
            "proxy 'bad-hop': vmess needs a UUID",
        ),
        (
            [Hop("x", "vmess", "h.example.com", 1, None, UUID, {"alterId": "\u00b2"})],
            "settings.alterId must be a number from 0 to 65535",
        ),
    ],
)
def test_unusable_input_is_a_config_error(chain: list[Hop], message: str) -> None:
    with pytest.raises(ConfigError) as caught:
        build_config(chain, 10808)
    assert message in caught.value.message
    assert str(caught.value) == caught.value.message


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"log_level": "verbose"}, "log_level must be one of"),
        ({"block_domains": "domain:example.org"}, "block_domains must be a list"),
        ({"block_domains": ["domain:ok.example", ""]}, "invalid entry ''"),
    ],
)
def test_bad_options_are_config_errors(kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        build_config([HTTP_HOP], 10808, **kwargs)


@pytest.mark.parametrize("port", [0, 65536, True])
def test_bad_socks_port_is_a_config_error(port: int) -> None:
    with pytest.raises(ConfigError, match="socks_port must be a number"):
        build_config([HTTP_HOP], port)


def test_write_config_creates_a_new_owner_only_file(tmp_path: Path) -> None:
    config = build_config([HTTP_HOP], 10808)
    first = write_config(config, tmp_path)
    second = write_config(config, tmp_path)
    assert first != second
    assert first.parent == tmp_path
    for path in (first, second):
        assert path.stat().st_mode & 0o777 == 0o600
        assert json.loads(path.read_text()) == config


def test_write_config_keeps_0600_under_a_permissive_umask(tmp_path: Path) -> None:
    previous = os.umask(0)
    try:
        path = write_config({"log": {}}, tmp_path)
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o600


# --- The real binary -------------------------------------------------------------------


def test_the_binary_is_found_and_identified(binary: XrayBinary) -> None:
    assert binary.flavor in ("xray", "v2ray")
    assert binary.version, binary
    assert Path(binary.path).is_absolute()


@pytest.mark.parametrize("case", PORTABLE, ids=lambda case: case.id)
async def test_the_binary_accepts_each_portable_config(binary: XrayBinary, case: Case) -> None:
    features = features_used([case.hop])
    missing = binary.unsupported(features)
    if missing:  # only on a binary newer than CI's, e.g. Xray without the h2 transport
        pytest.skip(f"{binary.describe()} lacks {missing}")
    assert await validate(binary, build_config([case.hop], 10808)) is None


@pytest.mark.parametrize("case", XRAY_ONLY, ids=lambda case: case.id)
async def test_xray_only_configs_run_on_xray_or_are_declared_unsupported(
    binary: XrayBinary, case: Case
) -> None:
    config = build_config([case.hop], 10808)
    if binary.flavor == "xray":
        assert await validate(binary, config) is None
    else:
        assert binary.unsupported(features_used([case.hop])), case.id


@pytest.mark.parametrize(
    "chain",
    [
        [HTTP_HOP, SOCKS_HOP],
        [HTTP_HOP, SOCKS_HOP, TROJAN_HOP],
        [CASES[3].hop, CASES[6].hop, CASES[8].hop, TROJAN_HOP],
        [HTTP_HOP] * MAX_CHAIN_HOPS,
    ],
    ids=["2-hops", "3-hops", "4-hops-mixed", "8-hops"],
)
async def test_the_binary_accepts_chains(binary: XrayBinary, chain: list[Hop]) -> None:
    assert binary.unsupported(features_used(chain)) == []
    assert await validate(binary, build_config(chain, 10808)) is None


async def test_the_binary_accepts_an_empty_block_list(binary: XrayBinary) -> None:
    assert await validate(binary, build_config([HTTP_HOP], 10808, block_domains=[])) is None


async def test_validate_returns_the_binary_complaint(binary: XrayBinary) -> None:
    config = build_config([HTTP_HOP], 10808)
    config["outbounds"][0]["settings"]["servers"][0]["port"] = "not-a-port"
    error = await validate(binary, config)
    assert error is not None
    assert "port" in error
    assert "exit status" in error


def test_v2ray_4_declares_what_it_lacks() -> None:
    v2ray = XrayBinary("/usr/bin/v2ray", "v2ray", (4, 34, 0))
    for feature in (
        "reality",
        "xtls-flow",
        "grpc",
        "xhttp",
        "shadowsocks-2022",
        "chained-transport",
    ):
        assert not v2ray.supports(feature), feature
    for feature in ("http", "https", "socks5", "shadowsocks", "vmess", "vless", "trojan"):
        assert v2ray.supports(feature), feature
    for feature in ("tcp", "tls", "ws", "h2"):
        assert v2ray.supports(feature), feature
    assert v2ray.unsupported(["tls", "reality", "grpc"]) == ["grpc", "reality"]
    assert v2ray.run_args(Path("/c.json")) == ["/usr/bin/v2ray", "-config", "/c.json"]
    assert v2ray.test_args("/c.json") == ["/usr/bin/v2ray", "-test", "-config", "/c.json"]


def test_ensure_supported_refuses_what_v2ray_4_would_run_unsafely() -> None:
    # V2Ray 4.34 accepts `security: reality` and then sends VLESS (UUID included) in
    # plaintext; it also drops a chained hop's ws transport. Neither may reach it.
    v2ray = XrayBinary("/usr/bin/v2ray", "v2ray", (4, 34, 0))
    reality = next(case.hop for case in CASES if case.id == "vless-reality-vision")
    with pytest.raises(ConfigError, match=r"v2ray 4\.34\.0 \(/usr/bin/v2ray\) cannot run reality"):
        ensure_supported(v2ray, [reality])
    ws = next(case.hop for case in CASES if case.id == "trojan-ws")
    with pytest.raises(ConfigError, match="cannot run chained-transport"):
        ensure_supported(v2ray, [ws, HTTP_HOP])
    ensure_supported(v2ray, [HTTP_HOP, ws])
    ensure_supported(XrayBinary("/opt/xray", "xray", (25, 10, 15)), [reality, ws, HTTP_HOP])


def test_xray_and_v2ray_5_command_lines() -> None:
    xray = XrayBinary("/opt/xray", "xray", (25, 10, 15))
    assert xray.run_args("/c.json") == ["/opt/xray", "run", "-c", "/c.json"]
    assert xray.test_args("/c.json") == ["/opt/xray", "run", "-test", "-c", "/c.json"]
    assert xray.supports("reality")
    assert xray.supports("chained-transport")
    assert not xray.supports("h2")  # removed in Xray-core 24.12
    assert XrayBinary("/opt/xray", "xray", (1, 8, 24)).supports("h2")
    v5 = XrayBinary("/opt/v2ray", "v2ray", (5, 16, 1))
    assert v5.run_args("/c.json") == ["/opt/v2ray", "run", "-c", "/c.json"]
    assert v5.test_args("/c.json") == ["/opt/v2ray", "test", "-c", "/c.json"]


def test_find_binary_honours_the_setting_and_explains_failures(
    binary: XrayBinary, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert find_binary(binary.path) == binary
    with pytest.raises(XrayBinaryError, match="CORRAL_XRAY_BIN='/nonexistent/xray'"):
        find_binary("/nonexistent/xray")
    impostor = tmp_path / "xray"
    impostor.write_text("#!/bin/sh\necho hello\n")
    impostor.chmod(0o755)
    with pytest.raises(XrayBinaryError, match="does not report an Xray or V2Ray version"):
        inspect_binary(str(impostor))
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    with pytest.raises(XrayBinaryError) as caught:
        find_binary(None)
    assert str(caught.value) == (
        "no Xray-compatible binary: install xray or v2ray, or set CORRAL_XRAY_BIN"
    )


# --- Traffic through the real binary ---------------------------------------------------


@dataclass
class FakeUpstream:
    """A local HTTP CONNECT or SOCKS5 proxy that checks credentials and records what it sees."""

    kind: str  # "http" or "socks5"
    username: str | None = None
    password: str | None = None
    targets: list[str] = field(default_factory=list)
    auth: list[str | None] = field(default_factory=list)
    first_bytes: list[bytes] = field(default_factory=list)
    tunnel: bool = True  # False: accept, then record what the client sends first
    port: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            target = await (
                self._http(reader, writer) if self.kind == "http" else self._socks(reader, writer)
            )
            if target is None:
                return
            self.targets.append(target)
            if not self.tunnel:
                self.first_bytes.append(await asyncio.wait_for(reader.read(64), 5))
                return
            host, _, port = target.rpartition(":")
            up_reader, up_writer = await asyncio.open_connection(host.strip("[]"), int(port))
            await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        except (OSError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            writer.close()

    async def _http(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str | None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1").split("\r\n")
        headers = dict(line.split(": ", 1) for line in head[1:] if ": " in line)
        auth = {k.lower(): v for k, v in headers.items()}.get("proxy-authorization")
        self.auth.append(auth)
        if self.username is not None:
            expected = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
            if auth != f"Basic {expected}":
                writer.write(b"HTTP/1.1 407 Proxy Authentication Required\r\n\r\n")
                return None
        writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
        return head[0].split(" ")[1]

    async def _socks(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> str | None:
        _version, count = await reader.readexactly(2)
        methods = await reader.readexactly(count)
        if self.username is not None:
            if 2 not in methods:
                writer.write(b"\x05\xff")
                return None
            writer.write(b"\x05\x02")
            _, user_length = await reader.readexactly(2)
            user = (await reader.readexactly(user_length)).decode()
            password = (await reader.readexactly((await reader.readexactly(1))[0])).decode()
            self.auth.append(f"{user}:{password}")
            if (user, password) != (self.username, self.password):
                writer.write(b"\x01\x01")
                return None
            writer.write(b"\x01\x00")
        else:
            writer.write(b"\x05\x00")
        _, _command, _, address_type = await reader.readexactly(4)
        if address_type == 1:
            host = socket.inet_ntoa(await reader.readexactly(4))
        elif address_type == 3:
            host = (await reader.readexactly((await reader.readexactly(1))[0])).decode()
        else:
            host = "[" + socket.inet_ntop(socket.AF_INET6, await reader.readexactly(16)) + "]"
        (port,) = struct.unpack(">H", await reader.readexactly(2))
        writer.write(b"\x05\x00\x00\x01\x7f\x00\x00\x01\x00\x00")
        return f"{host}:{port}"


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(OSError):
        writer.close()


@contextlib.asynccontextmanager
async def serving(handler: Any) -> AsyncIterator[int]:
    server = await asyncio.start_server(handler, "127.0.0.1", 0)
    try:
        yield server.sockets[0].getsockname()[1]
    finally:
        server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 2)


@contextlib.asynccontextmanager
async def upstream(fake: FakeUpstream) -> AsyncIterator[FakeUpstream]:
    async with serving(fake.handle) as port:
        fake.port = port
        yield fake


@dataclass
class EchoServer:
    peers: int = 0

    async def handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.peers += 1
        await _pipe(reader, writer)


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@contextlib.asynccontextmanager
async def sidecar(binary: XrayBinary, chain: Sequence[Hop], tmp_path: Path) -> AsyncIterator[int]:
    """Run the binary on build_config(chain); yield its SOCKS port once it listens."""
    port = _free_port()
    path = write_config(build_config(chain, port), tmp_path)
    process = await asyncio.create_subprocess_exec(
        *binary.run_args(path),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        for _ in range(1000):
            assert process.returncode is None, "the sidecar exited before listening"
            try:
                _, writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                await asyncio.sleep(0.005)
                continue
            writer.close()
            break
        yield port
    finally:
        if process.returncode is None:
            process.terminate()
        await process.wait()


async def socks_connect(
    port: int, host: str, target_port: int
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """What Chromium does: an unauthenticated SOCKS5 CONNECT by host name."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"\x05\x01\x00")
    assert await reader.readexactly(2) == b"\x05\x00"
    name = host.encode()
    writer.write(b"\x05\x01\x00\x03" + bytes([len(name)]) + name + struct.pack(">H", target_port))
    reply = await reader.readexactly(10)
    assert reply[:2] == b"\x05\x00", reply
    return reader, writer


async def exchange(port: int, host: str, target_port: int, payload: bytes) -> bytes:
    reader, writer = await socks_connect(port, host, target_port)
    try:
        writer.write(payload)
        await writer.drain()
        return await asyncio.wait_for(reader.read(len(payload)), 5)
    except (ConnectionError, TimeoutError):
        return b""
    finally:
        writer.close()


@pytest.mark.parametrize("kind", ["http", "socks5"])
async def test_traffic_reaches_the_site_through_an_authenticated_upstream(
    binary: XrayBinary, tmp_path: Path, kind: str
) -> None:
    echo = EchoServer()
    fake = FakeUpstream(kind, "alice", "p@ss:w/rd")
    async with serving(echo.handle) as echo_port, upstream(fake):
        hop = Hop("up", kind, "127.0.0.1", fake.port, "alice", "p@ss:w/rd")
        async with sidecar(binary, [hop], tmp_path) as port:
            assert await exchange(port, "127.0.0.1", echo_port, b"ping") == b"ping"
    assert fake.targets == [f"127.0.0.1:{echo_port}"]
    assert echo.peers == 1


async def test_a_two_hop_chain_carries_traffic(binary: XrayBinary, tmp_path: Path) -> None:
    echo = EchoServer()
    entry = FakeUpstream("socks5", "u2", "p2")  # chain[1]: dialed first
    exit_ = FakeUpstream("http", "u1", "p1")  # chain[0]: the proxy the command uses
    async with serving(echo.handle) as echo_port, upstream(entry), upstream(exit_):
        chain = [
            Hop("exit", "http", "127.0.0.1", exit_.port, "u1", "p1"),
            Hop("entry", "socks5", "127.0.0.1", entry.port, "u2", "p2"),
        ]
        async with sidecar(binary, chain, tmp_path) as port:
            assert await exchange(port, "127.0.0.1", echo_port, b"hello") == b"hello"
    assert entry.targets == [f"127.0.0.1:{exit_.port}"]
    assert exit_.targets == [f"127.0.0.1:{echo_port}"]


async def test_a_tls_proxy_keeps_its_tls_when_dialed_through_a_hop(
    binary: XrayBinary, tmp_path: Path
) -> None:
    hop = FakeUpstream("http", tunnel=False)
    async with upstream(hop):
        chain = [
            Hop("tls-exit", "https", "127.0.0.1", 9, settings={"sni": "exit.example.com"}),
            Hop("hop", "http", "127.0.0.1", hop.port),
        ]
        async with sidecar(binary, chain, tmp_path) as port:
            await exchange(port, "example.com", 80, b"GET / HTTP/1.1\r\n\r\n")
            for _ in range(200):
                if hop.first_bytes:
                    break
                await asyncio.sleep(0.01)
    assert set(hop.targets) == {"127.0.0.1:9"}  # the binary may retry the dial
    assert hop.first_bytes
    assert all(data[:2] == b"\x16\x03" for data in hop.first_bytes)  # TLS ClientHellos


async def test_blocked_domains_never_reach_the_upstream(binary: XrayBinary, tmp_path: Path) -> None:
    fake = FakeUpstream("http", tunnel=False)
    async with (
        upstream(fake),
        sidecar(binary, [Hop("up", "http", "127.0.0.1", fake.port)], tmp_path) as port,
    ):
        await exchange(port, "update.googleapis.com", 443, b"\x16\x03\x01")
        await exchange(port, "www.gstatic.com", 443, b"\x16\x03\x01")
        await exchange(port, "www.example.com", 443, b"\x16\x03\x01")  # not blocked
    assert set(fake.targets) == {"www.example.com:443"}


async def test_fail_closed_when_the_upstream_is_down(binary: XrayBinary, tmp_path: Path) -> None:
    echo = EchoServer()
    dead_port = _free_port()
    async with serving(echo.handle) as echo_port:
        chain = [Hop("down", "socks5", "127.0.0.1", dead_port)]
        async with sidecar(binary, chain, tmp_path) as port:
            assert await exchange(port, "127.0.0.1", echo_port, b"ping") == b""
    assert echo.peers == 0  # nothing went out directly
