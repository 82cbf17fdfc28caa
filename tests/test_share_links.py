"""Share links: every format parses into Proxy fields; bad links say what is wrong."""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import random
import uuid
from collections.abc import Callable
from typing import Any

import pytest

from server.models import ProxyProtocol
from server.proxies import parse_host
from xray.binary import XrayBinary, find_binary, validate
from xray.config import build_config, features_used
from xray.hops import SHADOWSOCKS_METHODS, Hop, ParsedProxy
from xray.links import ShareLinkError, parse_share_link

UUID = "b831381d-6324-4d53-ad4f-8cda48b30811"
PUBLIC_KEY = "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh8"


@pytest.fixture(scope="module")
def binary() -> XrayBinary:
    return find_binary(os.environ.get("CORRAL_XRAY_BIN"))


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def b64url_unpadded(text: str) -> str:
    return base64.urlsafe_b64encode(text.encode()).decode().rstrip("=")


def vmess_link(encode: Callable[[str], str] = b64, **fields: Any) -> str:
    data = {
        "v": "2",
        "ps": "VMess 🇩🇪 Frankfurt",
        "add": "vm.example.com",
        "port": "443",
        "id": UUID,
        "aid": "0",
        "scy": "auto",
        "net": "ws",
        "type": "none",
        "host": "cdn.example.com",
        "path": "/ray",
        "tls": "tls",
        "sni": "sni.example.com",
        "alpn": "h2,http/1.1",
        "fp": "chrome",
    }
    data.update(fields)
    return "vmess://" + encode(json.dumps({k: v for k, v in data.items() if v is not None}))


LINKS: list[tuple[str, str, ParsedProxy]] = [
    (
        "vless-ws-tls",
        f"vless://{UUID}@vl.example.com:443?encryption=none&type=ws&security=tls"
        "&sni=sni.example.com&path=%2Fws%3Fed%3D2048&host=cdn.example.com&fp=chrome"
        "&alpn=h2%2Chttp%2F1.1#My%20VLESS%20%F0%9F%9A%80",
        ParsedProxy(
            "My VLESS 🚀",
            "vless",
            "vl.example.com",
            443,
            None,
            UUID,
            {
                "network": "ws",
                "security": "tls",
                "sni": "sni.example.com",
                "fingerprint": "chrome",
                "path": "/ws?ed=2048",
                "host": "cdn.example.com",
                "alpn": ["h2", "http/1.1"],
            },
        ),
    ),
    (
        "vless-reality-vision",
        f"vless://{UUID.upper()}@198.51.100.9:443?security=reality&sni=www.microsoft.com"
        f"&fp=firefox&pbk={PUBLIC_KEY}&sid=0123abcd&spx=%2F&flow=xtls-rprx-vision&type=tcp"
        "&headerType=none#reality",
        ParsedProxy(
            "reality",
            "vless",
            "198.51.100.9",
            443,
            None,
            UUID,
            {
                "network": "tcp",
                "security": "reality",
                "sni": "www.microsoft.com",
                "fingerprint": "firefox",
                "publicKey": PUBLIC_KEY,
                "shortId": "0123abcd",
                "spiderX": "/",
                "flow": "xtls-rprx-vision",
            },
        ),
    ),
    (
        "vless-grpc-ipv6",
        f"vless://{UUID}@[2001:DB8::1]:8443?type=grpc&serviceName=tunnel&mode=multi&security=tls",
        ParsedProxy(
            "[2001:db8::1]:8443",
            "vless",
            "2001:db8::1",
            8443,
            None,
            UUID,
            {"network": "grpc", "security": "tls", "serviceName": "tunnel", "mode": "multi"},
        ),
    ),
    (
        "vmess-standard-base64",
        vmess_link(),
        ParsedProxy(
            "VMess 🇩🇪 Frankfurt",
            "vmess",
            "vm.example.com",
            443,
            None,
            UUID,
            {
                "network": "ws",
                "security": "tls",
                "alterId": 0,
                "cipher": "auto",
                "path": "/ray",
                "host": "cdn.example.com",
                "sni": "sni.example.com",
                "fingerprint": "chrome",
                "alpn": ["h2", "http/1.1"],
            },
        ),
    ),
    (
        "vmess-urlsafe-unpadded-int-port-grpc",
        vmess_link(
            b64url_unpadded,
            ps="",
            port=2053,
            aid=0,
            net="grpc",
            type="multi",
            path="svc",
            host=None,
            tls="",
            sni=None,
            alpn=None,
            fp=None,
            scy="aes-128-gcm",
        ),
        ParsedProxy(
            "vm.example.com:2053",
            "vmess",
            "vm.example.com",
            2053,
            None,
            UUID,
            {
                "network": "grpc",
                "security": "none",
                "alterId": 0,
                "cipher": "aes-128-gcm",
                "serviceName": "svc",
                "mode": "multi",
            },
        ),
    ),
    (
        "vmess-tcp-http-header",
        vmess_link(
            net="tcp", type="http", tls="none", sni=None, alpn=None, fp=None, aid="64", path="/"
        ),
        ParsedProxy(
            "VMess 🇩🇪 Frankfurt",
            "vmess",
            "vm.example.com",
            443,
            None,
            UUID,
            {
                "network": "tcp",
                "security": "none",
                "alterId": 64,
                "cipher": "auto",
                "path": "/",
                "headerType": "http",
                "host": "cdn.example.com",
            },
        ),
    ),
    (
        "trojan",
        "trojan://p%40ss%23word@tj.example.com:443?sni=sni.example.com&allowInsecure=1#Trojan%20One",
        ParsedProxy(
            "Trojan One",
            "trojan",
            "tj.example.com",
            443,
            None,
            "p@ss#word",
            {"network": "tcp", "security": "tls", "sni": "sni.example.com", "allowInsecure": True},
        ),
    ),
    (
        "trojan-ws-peer",
        "trojan://secret@tj.example.com:8443?type=ws&path=%2Ftj&host=cdn.example.com&peer=p.example.com",
        ParsedProxy(
            "tj.example.com:8443",
            "trojan",
            "tj.example.com",
            8443,
            None,
            "secret",
            {
                "network": "ws",
                "security": "tls",
                "sni": "p.example.com",
                "path": "/tj",
                "host": "cdn.example.com",
            },
        ),
    ),
    (
        "ss-sip002-base64url",
        f"ss://{b64url_unpadded('aes-256-gcm:pa:ss/wd')}@ss.example.com:8388#SS%20%231",
        ParsedProxy(
            "SS #1",
            "shadowsocks",
            "ss.example.com",
            8388,
            None,
            "pa:ss/wd",
            {"method": "aes-256-gcm"},
        ),
    ),
    (
        "ss-sip002-standard-base64-with-slash",
        # "?>?" encodes to "Pz4/": standard base64 may carry a "/" in the user info.
        f"ss://{b64('chacha20-ietf-poly1305:?>?')}@1.2.3.4:8388/?#",
        ParsedProxy(
            "1.2.3.4:8388",
            "shadowsocks",
            "1.2.3.4",
            8388,
            None,
            "?>?",
            {"method": "chacha20-ietf-poly1305"},
        ),
    ),
    (
        "ss-sip002-plain-2022",
        "ss://2022-blake3-aes-128-gcm:YctPZ6U7xPPcU%2Bgp3u%2B0tx%2FtR%3D@[::1]:8388/#plain",
        ParsedProxy(
            "plain",
            "shadowsocks",
            "::1",
            8388,
            None,
            "YctPZ6U7xPPcU+gp3u+0tx/tR=",
            {"method": "2022-blake3-aes-128-gcm"},
        ),
    ),
    (
        "ss-legacy",
        f"ss://{b64('AES-128-GCM:p@ss@ss.example.com:443')}#legacy",
        ParsedProxy(
            "legacy",
            "shadowsocks",
            "ss.example.com",
            443,
            None,
            "p@ss",
            {"method": "aes-128-gcm"},
        ),
    ),
    (
        "socks5",
        "socks5://us%40er:p%3Ass%20w@socks.example.com:1080#S%C3%B6cks",
        ParsedProxy("Söcks", "socks5", "socks.example.com", 1080, "us@er", "p:ss w", {}),
    ),
    (
        "socks-v2rayn-base64-userinfo",
        f"socks://{b64('user:pass')}@10.0.0.2:1080",
        ParsedProxy("10.0.0.2:1080", "socks5", "10.0.0.2", 1080, "user", "pass", {}),
    ),
    (
        "socks5-ipv6-no-credentials",
        "socks5://[fe80::1]:1080",
        ParsedProxy("[fe80::1]:1080", "socks5", "fe80::1", 1080, None, None, {}),
    ),
    (
        "http",
        "http://proxy.example.com:3128",
        ParsedProxy("proxy.example.com:3128", "http", "proxy.example.com", 3128, None, None, {}),
    ),
    (
        "https-credentials",
        "HTTPS://alice:s3cr%3At@secure.example.com:443/#Office",
        ParsedProxy("Office", "https", "secure.example.com", 443, "alice", "s3cr:t", {}),
    ),
]


@pytest.mark.parametrize(("link", "expected"), [c[1:] for c in LINKS], ids=[c[0] for c in LINKS])
def test_each_format_parses(link: str, expected: ParsedProxy) -> None:
    assert parse_share_link(link) == expected
    assert parse_share_link(f"  {link}\n") == expected


@pytest.mark.parametrize(("link", "parsed"), [c[1:] for c in LINKS], ids=[c[0] for c in LINKS])
def test_fields_land_where_the_proxy_service_expects_them(link: str, parsed: ParsedProxy) -> None:
    assert parsed.protocol in ProxyProtocol._value2member_map_
    assert parse_host(parsed.host) == parsed.host.lower()
    assert 1 <= parsed.port <= 65535
    json.dumps(parsed.settings)  # a JSON object column
    if parsed.protocol in ("vmess", "vless"):
        assert uuid.UUID(parsed.password or "")
        assert parsed.username is None
    if parsed.protocol == "shadowsocks":
        assert parsed.settings["method"] in SHADOWSOCKS_METHODS
        assert parsed.password
    if parsed.protocol == "trojan":
        assert parsed.password
        assert parsed.username is None


def test_the_name_defaults_to_host_and_port() -> None:
    assert parse_share_link(f"vless://{UUID}@vl.example.com:443").name == "vl.example.com:443"
    assert parse_share_link(f"vless://{UUID}@vl.example.com:443#").name == "vl.example.com:443"
    assert parse_share_link("http://[2001:db8::2]:8080").name == "[2001:db8::2]:8080"


def test_vless_defaults_to_tcp_without_tls() -> None:
    parsed = parse_share_link(f"vless://{UUID}@vl.example.com:443")
    assert parsed.settings == {"network": "tcp", "security": "none"}


def test_trojan_defaults_to_tls_but_honours_security_none() -> None:
    assert parse_share_link("trojan://pw@t.example.com:443").settings["security"] == "tls"
    plain = parse_share_link("trojan://pw@t.example.com:80?security=none")
    assert plain.settings["security"] == "none"


BAD_LINKS = [
    ("empty", "", "the link is empty"),
    ("blank", "   ", "the link is empty"),
    ("not-a-link", "hello world", "not a share link"),
    ("unknown-scheme", "wireguard://key@h.example.com:51820", "unsupported link type"),
    ("ftp", "ftp://h.example.com:21", "unsupported link type"),
    ("vmess-bad-base64", "vmess://@@@not*base64@@@", "the vmess link is not valid base64"),
    (
        "vmess-not-utf8",
        "vmess://" + base64.b64encode(b"\xff\xfe\xfd").decode(),
        "binary data, not text",
    ),
    ("vmess-bad-json", "vmess://" + b64("{not json"), "does not hold JSON"),
    ("vmess-json-not-object", "vmess://" + b64("[1, 2]"), "is not an object"),
    ("vmess-missing-uuid", vmess_link(id=""), "the vmess link has no UUID"),
    ("vmess-bad-uuid", vmess_link(id="1234"), "the vmess link's id is not a UUID"),
    ("vmess-missing-port", vmess_link(port=""), "the link has no port"),
    ("vmess-port-not-number", vmess_link(port="https"), "the port is not a number"),
    ("vmess-port-70000", vmess_link(port=70000), "the port is out of range (1-65535)"),
    ("vmess-missing-host", vmess_link(add=""), "the link has no host"),
    ("vmess-kcp", vmess_link(net="kcp"), "the vmess transport (net) is not supported"),
    ("vmess-aid-superscript", vmess_link(aid="\u00b2"), "the vmess aid is not a number"),
    ("vmess-field-type", vmess_link(port=[443]), "the vmess field 'port' must be a string"),
    ("vless-missing-port", f"vless://{UUID}@vl.example.com", "the link has no port"),
    ("vless-empty-port", f"vless://{UUID}@vl.example.com:", "the link has no port"),
    ("vless-port-0", f"vless://{UUID}@vl.example.com:0", "the port is out of range"),
    ("vless-port-70000", f"vless://{UUID}@vl.example.com:70000", "the port is out of range"),
    ("vless-missing-uuid", "vless://@vl.example.com:443", "the vless link has no UUID"),
    ("vless-no-userinfo", "vless://vl.example.com:443", "the vless link has no UUID"),
    (
        "vless-bad-uuid",
        "vless://not-a-uuid@vl.example.com:443",
        "the vless link's id is not a UUID",
    ),
    ("vless-no-host", f"vless://{UUID}@:443", "the link has no host"),
    (
        "vless-bad-host",
        f"vless://{UUID}@bad host!:443",
        "the host is not a host name or IP address",
    ),
    ("vless-bare-ipv6", f"vless://{UUID}@2001:db8::1:443", "IPv6 host must be in brackets"),
    ("vless-unclosed-ipv6", f"vless://{UUID}@[2001:db8::1:443", "needs a closing ]"),
    (
        "vless-bad-ipv6",
        f"vless://{UUID}@[2001:zz::1]:443",
        "the host in [...] is not an IPv6 address",
    ),
    (
        "vless-kcp",
        f"vless://{UUID}@h.example.com:443?type=kcp",
        "the transport (type=) is not supported",
    ),
    (
        "vless-xtls",
        f"vless://{UUID}@h.example.com:443?security=xtls",
        "the security= value is not supported",
    ),
    ("vless-reality-no-key", f"vless://{UUID}@h.example.com:443?security=reality", "needs pbk"),
    (
        "vless-encryption",
        f"vless://{UUID}@h.example.com:443?encryption=mlkem768x25519plus.native.0rtt.x",
        "VLESS encryption= other than none",
    ),
    ("trojan-missing-password", "trojan://@t.example.com:443", "the trojan link has no password"),
    ("trojan-missing-port", "trojan://pw@t.example.com", "the link has no port"),
    ("ss-bad-base64", "ss://%%%***@ss.example.com:8388", "the ss link's user info is not valid"),
    ("ss-no-password", f"ss://{b64url_unpadded('aes-256-gcm')}@s.example.com:1", "method:password"),
    ("ss-empty-password", f"ss://{b64url_unpadded('aes-256-gcm:')}@s.example.com:1", "no password"),
    ("ss-plugin", f"ss://{b64('aes-256-gcm:pw')}@s.example.com:1/?plugin=obfs-local", "plugins"),
    ("ss-legacy-bad-base64", "ss://!!!!#x", "the ss link is not valid base64"),
    ("ss-legacy-no-host", f"ss://{b64('aes-256-gcm:pw')}", "the ss link has no host"),
    (
        "ss-legacy-port-0",
        f"ss://{b64('aes-256-gcm:pw@h.example.com:0')}",
        "the port is out of range",
    ),
    ("socks-missing-port", "socks5://u:p@h.example.com", "the link has no port"),
    ("socks-password-only", "socks5://:pw@h.example.com:1080", "a password but no user name"),
    ("http-with-path", "http://h.example.com:8080/pac.js", "has no path"),
    ("http-port-garbage", "http://h.example.com:80a", "the port is not a number"),
    ("too-long", "vless://" + "a" * 9000, "longer than 8192"),
]


@pytest.mark.parametrize(
    ("link", "message"), [c[1:] for c in BAD_LINKS], ids=[c[0] for c in BAD_LINKS]
)
def test_bad_links_say_what_is_wrong(link: str, message: str) -> None:
    with pytest.raises(ShareLinkError) as caught:
        parse_share_link(link)
    assert message in caught.value.message
    assert str(caught.value) == caught.value.message


def _mutated(link: str, generator: random.Random) -> str:
    characters = list(link)
    for _ in range(generator.randint(1, 4)):
        position = generator.randrange(len(characters) + 1)
        roll = generator.random()
        if roll < 0.4 and characters:
            del characters[min(position, len(characters) - 1)]
        elif roll < 0.8:
            characters.insert(position, generator.choice("abc:/@?#[]%&=+-_.!1 \u00e9"))
        else:
            del characters[position:]
    return "".join(characters)


def _parse_or_error(link: str) -> ParsedProxy | ShareLinkError:
    try:
        return parse_share_link(link)
    except ShareLinkError as error:
        return error


def test_garbage_and_damaged_links_only_ever_raise_share_link_errors() -> None:
    generator = random.Random(20261129)
    alphabet = "abcXYZ019:/@?#[]%&=+-_.!~*'() \t\u00e9\U0001f680"
    schemes = ("vless", "vmess", "trojan", "ss", "socks5", "http")
    prefixes = ["", *[f"{scheme}://" for scheme in schemes]]
    links = [link for _, link, _ in LINKS]
    for _ in range(3000):
        body = "".join(generator.choice(alphabet) for _ in range(generator.randint(0, 40)))
        candidates = [
            generator.choice(prefixes) + body,
            _mutated(generator.choice(links), generator),
        ]
        for link in candidates:
            outcome = _parse_or_error(link)
            if isinstance(outcome, ShareLinkError):
                assert outcome.message
            else:
                assert 1 <= outcome.port <= 65535
                assert outcome.host


def hop(parsed: ParsedProxy) -> Hop:
    return Hop(**dataclasses.asdict(parsed))


@pytest.mark.parametrize(("link", "parsed"), [c[1:] for c in LINKS], ids=[c[0] for c in LINKS])
async def test_parsed_links_build_configs_the_binary_runs(
    binary: XrayBinary, link: str, parsed: ParsedProxy
) -> None:
    chain = [hop(parse_share_link(link))]
    config = build_config(chain, 10808)
    missing = binary.unsupported(features_used(chain))
    if missing:
        # REALITY, XTLS flow, gRPC on V2Ray 4.34: the sidecar must refuse, not run it half-way.
        assert binary.flavor == "v2ray", missing
        assert set(missing) <= {"reality", "xtls-flow", "grpc", "shadowsocks-2022", "xchacha20"}
        return
    assert await validate(binary, config) is None


def test_every_portable_format_is_validated_by_the_installed_binary(binary: XrayBinary) -> None:
    runnable = {
        name
        for name, link, _ in LINKS
        if not binary.unsupported(features_used([hop(parse_share_link(link))]))
    }
    expected = {
        "vless-ws-tls",
        "vmess-standard-base64",
        "vmess-tcp-http-header",
        "trojan",
        "trojan-ws-peer",
        "ss-sip002-base64url",
        "ss-sip002-standard-base64-with-slash",
        "ss-legacy",
        "socks5",
        "socks-v2rayn-base64-userinfo",
        "socks5-ipv6-no-credentials",
        "http",
        "https-credentials",
    }
    assert expected <= runnable
