"""Proxy failures name their cause (issue 12, items 3, 4, 10; issue 18's trace): through
GraphQL `checkProxy`, the run's stored error and system log, with the real v2ray binary
in front of local fakes."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from server.settings import Settings
from tests.conftest import GraphQLClient
from tests.fixtures.commands import logs_of, run, texts, wait_final
from tests.fixtures.netfakes import LocalSite, SelfSignedTls, UpstreamHttpProxy, black_hole
from tests.fixtures.processes import free_port
from xray.binary import installed_binary

USER, PASSWORD = "carol", "s3cret-Proxy-Pass"
CREATE = """mutation($input: CreateProxyInput!) { createProxy(input: $input) {
  proxy { id } userErrors { field message code } } }"""
CHECK = """mutation($id: ID!) { checkProxy(id: $id) {
  proxy { health { ok error binary } } userErrors { message } } }"""
IMPORT = """mutation($links: [String!]!) { importProxies(links: $links) {
  proxies { name } userErrors { field message code } } }"""
SET_RULES = """mutation($input: SetRoutingRulesInput!) { setRoutingRules(input: $input) {
  userErrors { message } } }"""
FETCH = (
    'sh -c \'P=$(echo "$CORRAL_PROXY_URL" | sed s/socks5:/socks5h:/); for u in "$@"; do '
    'curl -sS --max-time 5 -x "$P" "$u" || echo "failed $u"; done\' - '
    "{{ params.a }} {{ params.b }} {{ params.c }}"
)
V2RAY = installed_binary(None)
needs_v2ray = pytest.mark.skipif(
    V2RAY is None or V2RAY.flavor != "v2ray", reason="needs Debian's v2ray"
)


@pytest.fixture
def settings(settings: Settings, site: LocalSite) -> Settings:
    return settings.model_copy(
        update={
            "proxy_check_url": f"{site.url}/ip",
            "kill_grace_seconds": 0.5,
            "proxy_probe_timeout": 0.5,
        }
    )


@pytest.fixture
def upstream() -> Iterator[UpstreamHttpProxy]:
    server = UpstreamHttpProxy(USER, PASSWORD).start()
    yield server
    server.stop()


async def create_proxy(gql: GraphQLClient, **fields: Any) -> str:
    data = await gql(CREATE, input={"protocol": "http", "host": "127.0.0.1", **fields})
    assert data["createProxy"]["userErrors"] == []
    return str(data["createProxy"]["proxy"]["id"])


async def check(gql: GraphQLClient, proxy_id: str) -> dict[str, Any]:
    payload = (await gql(CHECK, id=proxy_id))["checkProxy"]
    assert payload["userErrors"] == []
    health: dict[str, Any] = payload["proxy"]["health"]
    assert health["ok"] is False, health
    return health


async def test_rejected_credentials_are_named_in_check_run_error_and_log(
    gql: GraphQLClient, upstream: UpstreamHttpProxy, site: LocalSite
) -> None:
    proxy_id = await create_proxy(
        gql, name="corp", port=upstream.port, username=USER, password="wrong-password"
    )
    expected = "upstream proxy 'corp' rejected the credentials (407 Proxy Authentication Required)"
    health = await check(gql, proxy_id)
    assert health["error"] == expected
    assert health["binary"] == (V2RAY.label if V2RAY else None)

    command_id = await run(
        gql, commandString=FETCH, proxyId=proxy_id, params={"a": site.url, "b": "", "c": ""}
    )
    final = await wait_final(gql, command_id)
    assert final["status"] == "FAILED"
    assert final["error"] == expected
    system = texts(await logs_of(gql, command_id), "SYSTEM")
    assert f"not started, nothing went out: {expected}" in system
    assert site.requests == []
    assert "wrong-password" not in str(system) + str(health)


@pytest.mark.parametrize(
    "case",
    ["refused", "dns", "timeout", "tls", "check-url"],
)
async def test_each_failure_kind_is_named_by_check_proxy(
    gql: GraphQLClient,
    settings: Settings,
    upstream: UpstreamHttpProxy,
    tmp_path: Path,
    case: str,
) -> None:
    server: Any = None
    fields: dict[str, Any] = {"name": case, "port": free_port()}
    if case == "dns":
        fields["host"] = "no-such-proxy.invalid"
    elif case == "timeout":
        server = black_hole()
        fields["port"] = server.port
    elif case == "tls":
        server = SelfSignedTls(tmp_path).start()
        fields |= {"protocol": "https", "port": server.port, "settings": {"sni": "localhost"}}
    elif case == "check-url":
        fields |= {"port": upstream.port, "username": USER, "password": PASSWORD}
    try:
        if case == "check-url":  # the upstream is fine; the URL is offline behind it
            offline = f"http://127.0.0.1:{free_port()}/ip"
            settings.proxy_check_url = offline
        proxy_id = await create_proxy(gql, **fields)
        error = (await check(gql, proxy_id))["error"]
    finally:
        if server is not None:
            server.stop()
    where = f"upstream proxy {case!r} ({fields.get('host', '127.0.0.1')}:{fields['port']})"
    expected = {
        "refused": f"{where} is unreachable: connection refused (nothing listens on that port)",
        "dns": f"{where} is unreachable: the name 'no-such-proxy.invalid' does not resolve (",
        "timeout": f"{where} did not answer in time (no answer within 0.5 s)",
        "tls": f"{where}: TLS failed (",
        "check-url": f"upstream proxy 'check-url' cannot reach the check URL {settings.proxy_check_url} (502 Bad Gateway)",
    }[case]
    assert error.startswith(expected), error
    if case == "tls":
        assert "certificate" in error


async def test_quiet_sidecar_log_says_what_failed_once(
    gql: GraphQLClient, upstream: UpstreamHttpProxy, site: LocalSite
) -> None:
    proxy_id = await create_proxy(
        gql, name="corp", port=upstream.port, username=USER, password=PASSWORD
    )
    offline = f"http://127.0.0.1:{free_port()}/x"
    command_id = await run(
        gql,
        commandString=FETCH,
        proxyId=proxy_id,
        params={"a": offline, "b": offline, "c": f"{site.url}/ip"},
    )
    final = await wait_final(gql, command_id)
    lines = await logs_of(gql, command_id)
    assert final["status"] == "SUCCEEDED", lines
    system = texts(lines, "SYSTEM")
    target = offline.removeprefix("http://").removesuffix("/x")
    cannot = f"upstream proxy 'corp' cannot reach {target} (502 Bad Gateway)"
    assert [line for line in system if "cannot reach" in line] == [cannot], system
    # Default level warning: no connection chatter, no normal-but-scary "rejected" line.
    assert not [line for line in system if "[Info]" in line or "insufficient header" in line]
    assert not [line for line in system if "accepted" in line]
    assert texts(lines)[-1] == '{"ip": "127.0.0.1"}'


@needs_v2ray
async def test_routing_trace_shows_each_destination_and_its_outbound(
    app: Any, gql: GraphQLClient, upstream: UpstreamHttpProxy, site: LocalSite
) -> None:
    app.state.supervisor.settings.routing_trace = True
    direct_site = LocalSite().start()
    try:
        proxy_id = await create_proxy(
            gql, name="corp", port=upstream.port, username=USER, password=PASSWORD
        )
        direct_port = direct_site.port
        rules = [
            {"ports": str(direct_port), "action": "DIRECT"},
            {"domains": ["full:localhost"], "action": "PROXY"},
        ]
        saved = await gql(SET_RULES, input={"proxyId": proxy_id, "rules": rules})
        assert saved["setRoutingRules"]["userErrors"] == []
        port = site.port
        params = {
            "a": f"http://127.0.0.1:{direct_port}/ip",
            "b": f"http://localhost:{port}/ip",
            "c": "",
        }
        command_id = await run(gql, commandString=FETCH, proxyId=proxy_id, params=params)
        final = await wait_final(gql, command_id)
        lines = await logs_of(gql, command_id)
    finally:
        direct_site.stop()
    assert final["status"] == "SUCCEEDED", lines
    routes = [line for line in texts(lines, "SYSTEM") if line.startswith("route ")]
    assert routes == [
        f"route tcp:127.0.0.1:{direct_port} → direct",
        f"route tcp:localhost:{port} → proxy 'corp'",
    ], texts(lines, "SYSTEM")
    assert upstream.connects == [f"localhost:{port}"]
    assert USER not in str(lines)
    assert PASSWORD not in str(lines)


REALITY = (
    "vless://b35bc717-302a-4ded-a2d5-47b376cf248a@r.example.com:443?type=tcp&security=reality"
    "&sni=www.example.com&pbk=Z84J2IelR9ch3k8VtlVhhs5ycBUlXA7wHBWcBrjqnAw&sid=6ba85179e30d4fc2"
    "&flow=xtls-rprx-vision&fp=chrome#reality"
)


@needs_v2ray
async def test_features_the_binary_lacks_are_refused_at_save_and_import(
    gql: GraphQLClient,
) -> None:
    assert V2RAY is not None
    data = (await gql(IMPORT, links=[REALITY]))["importProxies"]
    assert data["proxies"] == []
    messages = {e["message"] for e in data["userErrors"]}
    assert {e["code"] for e in data["userErrors"]} == {"UNSUPPORTED"}
    has = f"this machine has {V2RAY.label} ({V2RAY.path})"
    assert f"link 1: REALITY needs Xray-core ≥ 1.8; {has}" in "\n".join(messages), messages
    assert any("the XTLS Vision flow needs Xray-core ≥ 1.8" in m for m in messages), messages

    created = await gql(
        CREATE,
        input={
            "name": "ss22",
            "protocol": "shadowsocks",
            "host": "ss.example.com",
            "port": 8388,
            "password": "c2VjcmV0LWtleS0xNi1ieXRlcw==",
            "settings": {"method": "2022-blake3-aes-128-gcm"},
        },
    )
    assert created["createProxy"]["userErrors"] == [
        {
            "field": ["settings", "method"],
            "message": f"a Shadowsocks 2022 cipher needs Xray-core ≥ 1.8; {has}: install it and "
            "point CORRAL_XRAY_BIN at it",
            "code": "UNSUPPORTED",
        }
    ]


def test_sidecar_log_level_is_checked() -> None:
    assert Settings(sidecar_log_level="INFO").sidecar_log_level == "info"
    with pytest.raises(ValidationError, match="'loud' is not one of debug, info, warning"):
        Settings(sidecar_log_level="loud")
