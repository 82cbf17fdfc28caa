"""Proxy routing rules (issue 18): saved through GraphQL, checked by the real v2ray binary,
and obeyed by the real sidecar in front of local upstream proxies."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.conftest import GraphQLClient
from tests.fixtures.commands import logs_of, run, texts, wait_final
from tests.fixtures.netfakes import LocalSite, UpstreamHttpProxy
from tests.fixtures.processes import free_port
from xray.config import BACKGROUND_DOMAINS
from xray.hops import Hop
from xray.routing import Routing, Rule, build_routed_config

CREATE = """mutation($input: CreateProxyInput!) { createProxy(input: $input) {
  proxy { id routingRules { domains action } } userErrors { field message } } }"""
RULES = "routingRules { domains ips ports network action viaProxy { id name } }"
SET = (
    "mutation($input: SetRoutingRulesInput!) { setRoutingRules(input: $input) { proxy { id "
    + RULES
    + " } userErrors { field message code } } }"
)
READ = "query($id: ID!) { node(id: $id) { ... on Proxy { " + RULES + " } } }"
COMPOSE = """query($input: RunCommandInput!) { composeCommand(input: $input) {
  routingTable errors { message } } }"""
# curl with socks5h hands the host name to the sidecar, as Chromium does.
FETCH = (
    'sh -c \'P=$(echo "$CORRAL_PROXY_URL" | sed s/socks5:/socks5h:/); for u in "$@"; do '
    'curl -sS --max-time 5 -x "$P" "$u" || echo "failed $u"; echo; done\' - '
    "{{ params.a }} {{ params.b }} {{ params.c }} {{ params.d }}"
)


@pytest.fixture
def upstreams() -> Iterator[tuple[UpstreamHttpProxy, UpstreamHttpProxy]]:
    first = UpstreamHttpProxy("a", "secret-of-a").start()
    second = UpstreamHttpProxy("b", "secret-of-b").start()
    yield first, second
    first.stop()
    second.stop()


async def create(gql: GraphQLClient, name: str, port: int, password: str | None = None) -> str:
    fields: dict[str, Any] = {"name": name, "protocol": "http", "host": "127.0.0.1", "port": port}
    if password:
        fields |= {"username": name, "password": password}
    data = (await gql(CREATE, input=fields))["createProxy"]
    assert data["userErrors"] == []
    # A new proxy starts with the default rule set: the old fixed block list.
    assert data["proxy"]["routingRules"] == [
        {"domains": list(BACKGROUND_DOMAINS), "action": "BLOCK"}
    ]
    return str(data["proxy"]["id"])


async def set_rules(gql: GraphQLClient, proxy_id: str, rules: list[dict[str, Any]]) -> Any:
    return (await gql(SET, input={"proxyId": proxy_id, "rules": rules}))["setRoutingRules"]


async def test_rules_send_each_destination_its_own_way(
    gql: GraphQLClient,
    site: LocalSite,
    upstreams: tuple[UpstreamHttpProxy, UpstreamHttpProxy],
) -> None:
    up_a, up_b = upstreams
    direct_site = LocalSite().start()
    try:
        a = await create(gql, "a", up_a.port, "secret-of-a")
        b = await create(gql, "b", up_b.port, "secret-of-b")
        rules: list[dict[str, Any]] = [
            {"domains": ["full:localhost"], "action": "VIA", "viaProxyId": b},
            {"domains": ["keyword:blocked", "regexp:^ads[0-9]+\\."], "action": "BLOCK"},
            {"ports": str(direct_site.port), "network": "tcp", "action": "DIRECT"},
            {"ips": ["10.0.0.0/8", "192.0.2.1"], "ports": "80,8000-8100", "action": "PROXY"},
        ]
        saved = await set_rules(gql, a, rules)
        assert saved["userErrors"] == []
        expected = [
            {"ips": [], "ports": None, "network": None, "viaProxy": None, **rule}
            | {"domains": rule.get("domains", [])}
            for rule in rules
        ]
        expected[0] |= {"viaProxy": {"id": b, "name": "b"}}
        for rule in expected:
            rule.pop("viaProxyId", None)
        assert saved["proxy"]["routingRules"] == expected
        assert (await gql(READ, id=a))["node"]["routingRules"] == expected  # survives a re-read

        port, direct_port = site.port, direct_site.port
        params = {
            "a": f"http://127.0.0.1:{port}/ip",
            "b": f"http://localhost:{port}/ip",
            "c": f"http://blocked.localhost:{port}/ip",
            "d": f"http://127.0.0.1:{direct_port}/ip",
        }
        table = await gql(COMPOSE, input={"commandString": FETCH, "proxyId": a, "params": params})
        assert table["composeCommand"]["routingTable"] == [
            "1. full:localhost → via proxy 'b'",
            "2. keyword:blocked, regexp:^ads[0-9]+\\. → blocked",
            f"3. port {direct_port}, network tcp → direct",
            "4. 10.0.0.0/8, 192.0.2.1, port 80,8000-8100 → proxy 'a'",
            "everything else → proxy 'a'",
        ]
        command_id = await run(gql, commandString=FETCH, proxyId=a, params=params)
        final = await wait_final(gql, command_id)
        lines = await logs_of(gql, command_id)
        assert final["status"] == "SUCCEEDED", lines
        out = [text for text in texts(lines) if text]
        assert out[:2] == ['{"ip": "127.0.0.1"}', '{"ip": "127.0.0.1"}'], out
        assert out[2] == f"failed {params['c']}", out
        assert out[3] == '{"ip": "127.0.0.1"}', out
        # Each upstream saw only its own destination; the DIRECT one none; the blocked nothing.
        assert up_a.connects == [f"127.0.0.1:{port}"]
        assert up_b.connects == [f"localhost:{port}"]
        assert len(site.requests) == 2
        assert [r.path for r in direct_site.requests] == ["/ip"]
        everything = " ".join(final["argv"]) + " ".join(line["text"] for line in lines)
        assert "secret-of-a" not in everything
        assert "secret-of-b" not in everything

        refused = await gql(
            "mutation($id: ID!) { deleteProxy(id: $id) { userErrors { code } } }", id=b
        )
        assert refused["deleteProxy"]["userErrors"] == [{"code": "IN_USE"}]
    finally:
        direct_site.stop()


BAD_RULES: list[tuple[dict[str, Any], list[str], str]] = [
    ({"domains": ["foo:bar"]}, ["rules", "0", "domains", "0"], "unknown matcher 'foo:'"),
    ({"domains": ["regexp:a(b"]}, ["rules", "0", "domains", "0"], "not a valid regular expression"),
    # Python's re takes lookaheads, Go's RE2 does not: the real binary refuses it.
    ({"domains": ["regexp:(?=x)y"]}, ["rules"], "v2ray refuses these rules"),
    ({"domains": ["geosite:cn"]}, ["rules", "0", "domains", "0"], "CORRAL_XRAY_ASSETS_DIR"),
    ({"ips": ["geosite:cn"]}, ["rules", "0", "ips", "0"], "put it in domains"),
    ({"ips": ["300.1.1.1"]}, ["rules", "0", "ips", "0"], "not an IP address"),
    ({"ports": "70000"}, ["rules", "0", "ports"], "not a port"),
    ({"ports": "http"}, ["rules", "0", "ports"], "ports must look like"),
    ({"network": "icmp"}, ["rules", "0", "network"], "tcp, udp"),
    ({"ports": "443", "action": "VIA"}, ["rules", "0", "viaProxyId"], "needs viaProxyId"),
    ({"action": "DIRECT"}, ["rules", "0"], "needs domains, ips, ports or network"),
]


async def test_bad_rules_are_refused_whole_at_save(gql: GraphQLClient) -> None:
    proxy_id = await create(gql, "p", free_port())
    before = (await gql(READ, id=proxy_id))["node"]["routingRules"]
    good = {"domains": ["domain:example.com"], "action": "DIRECT"}
    for bad, field, message in BAD_RULES:
        payload = await set_rules(gql, proxy_id, [{**bad}, good])
        errors = payload["userErrors"]
        assert payload["proxy"] is None, bad
        assert [e["field"] for e in errors] == [field], (bad, errors)
        assert message in errors[0]["message"], (bad, errors)
    self_via = await set_rules(
        gql, proxy_id, [{"ports": "1", "action": "VIA", "viaProxyId": proxy_id}]
    )
    assert self_via["userErrors"][0]["message"] == "VIA needs another proxy"
    assert (await gql(READ, id=proxy_id))["node"]["routingRules"] == before
    # Dropping every rule is allowed: then everything goes through the chain.
    assert (await set_rules(gql, proxy_id, []))["proxy"]["routingRules"] == []


async def test_no_rule_and_a_dead_upstream_still_fails_closed(
    gql: GraphQLClient, site: LocalSite
) -> None:
    proxy_id = await create(gql, "down", free_port())
    assert (await set_rules(gql, proxy_id, []))["userErrors"] == []
    params = {"a": site.url, "b": site.url, "c": site.url, "d": site.url}
    command_id = await run(gql, commandString=FETCH, proxyId=proxy_id, params=params)
    final = await wait_final(gql, command_id)
    assert final["status"] == "FAILED"
    assert "unreachable" in final["error"]
    assert site.requests == []


def test_direct_outbound_exists_only_for_a_direct_rule() -> None:
    chain = [Hop(name="a", protocol="socks5", host="127.0.0.1", port=1080)]
    via = {"7": [Hop(name="b", protocol="http", host="127.0.0.2", port=3128)]}
    blocked = build_routed_config(
        chain, 1081, Routing((Rule(domains=("gvt1.com",), action="BLOCK"),))
    )
    assert [o["tag"] for o in blocked["outbounds"]] == ["proxy", "block"]
    assert blocked["routing"]["rules"] == [
        {"type": "field", "domain": ["gvt1.com"], "outboundTag": "block"}
    ]
    rules = (
        Rule(ports="53", network="udp", action="DIRECT"),
        Rule(ips=("10.0.0.0/8",), action="VIA", via="7"),
    )
    config = build_routed_config(chain, 1081, Routing(rules, via))
    assert [o["tag"] for o in config["outbounds"]] == ["proxy", "block", "via-7", "direct"]
    assert [r["outboundTag"] for r in config["routing"]["rules"]] == ["direct", "via-7"]
