"""Routing rules end to end (issue 18): one Chromium run through the Playwright host behind the
real v2ray sidecar sends each local site its own way; dropping the default block list lets a
blocked domain through; rules read back through GraphQL exactly as written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from server.settings import Settings
from tests.conftest import GraphQLClient
from tests.fixtures.commands import logs_of, run, texts, wait_final
from tests.fixtures.netfakes import LocalSite, UpstreamHttpProxy
from tests.test_browser_e2e import gql_id
from tests.test_routing import FETCH, READ, create, set_rules, upstreams  # noqa: F401
from xray.config import BACKGROUND_DOMAINS

SCRIPTS = Path(__file__).resolve().parent / "fixtures" / "scripts"
TEMPLATE = (
    "corral-playwright --profile {{ profile.dir }} --proxy {{ proxy.url }} -- "
    "visit_each.mjs {{ params.urls }}"
)
DEFAULT_RULE = {"domains": list(BACKGROUND_DOMAINS), "action": "BLOCK"}
BLOCKED_NAME = "update.googleapis.com"  # in the default block list


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"scripts_dir": SCRIPTS, "kill_grace_seconds": 3.0})


async def browser_run(gql: GraphQLClient, proxy_id: str, urls: list[str]) -> list[str]:
    """One Chromium run visiting `urls` through the proxy; its `ok`/`failed` lines."""
    template = await gql_id(
        gql,
        """mutation($t: String!) { createCommandTemplate(input: {name: "visit each",
        template: $t, parameters: [{name: "urls"}], timeoutSeconds: 90}) {
        commandTemplate { id } userErrors { message } } }""",
        "createCommandTemplate",
        t=TEMPLATE,
    )
    profile = await gql_id(
        gql,
        'mutation { createProfile(input: {name: "P"}) { profile { id } userErrors { message } } }',
        "createProfile",
    )
    attached = await gql(
        "mutation($p: ID!, $x: ID!) { attachProxy(input: {profileId: $p, proxyId: $x}) "
        "{ userErrors { message } } }",
        p=profile,
        x=proxy_id,
    )
    assert attached["attachProxy"]["userErrors"] == []
    command_id = await run(
        gql, templateId=template, profileId=profile, params={"urls": " ".join(urls)}
    )
    final = await wait_final(gql, command_id, timeout=90)
    lines = await logs_of(gql, command_id)
    assert final["status"] == "SUCCEEDED", "\n".join(line["text"] for line in lines)
    return [text for text in texts(lines) if text.startswith(("ok ", "failed "))]


async def test_chromium_goes_each_way_its_rules_say(
    gql: GraphQLClient,
    upstreams: tuple[UpstreamHttpProxy, UpstreamHttpProxy],  # noqa: F811
) -> None:
    """Site A (127.0.0.2) through upstream A, site B (127.0.0.3) VIA upstream B, site C
    (127.0.0.4) blocked, site D (127.0.0.5) DIRECT, a default-blocked name blocked."""
    up_a, up_b = upstreams
    sites = [LocalSite(host=f"127.0.0.{n}").start() for n in (2, 3, 4, 5)]
    up_a.hosts[BLOCKED_NAME] = "127.0.0.2"  # were it let through, site A would answer
    try:
        a = await create(gql, "a", up_a.port, "secret-of-a")
        b = await create(gql, "b", up_b.port, "secret-of-b")
        rules = [
            {"ips": ["127.0.0.3/32"], "action": "VIA", "viaProxyId": b},
            {"ips": ["127.0.0.4"], "action": "BLOCK"},
            {"ips": ["127.0.0.5"], "network": "tcp", "action": "DIRECT"},
            DEFAULT_RULE,
        ]
        assert (await set_rules(gql, a, rules))["userErrors"] == []
        port_a = sites[0].port
        urls = [f"{site.url}/ip" for site in sites] + [f"http://{BLOCKED_NAME}:{port_a}/ip"]
        out = await browser_run(gql, a, urls)
        assert [line.split(" ", 2)[:2] for line in out] == [
            ["ok", urls[0]],
            ["ok", urls[1]],
            ["failed", urls[2]],
            ["ok", urls[3]],
            ["failed", urls[4]],
        ], out
        # Each upstream saw only its own site; the blocked site and name reached nobody.
        assert set(up_a.connects) == {f"127.0.0.2:{port_a}"}
        assert set(up_b.connects) == {f"127.0.0.3:{sites[1].port}"}
        assert "/ip" in [r.path for r in sites[0].requests]
        assert sites[1].requests
        assert sites[3].requests
        assert sites[2].requests == []
        assert up_a.refused == up_b.refused == 0
    finally:
        for site in sites:
            site.stop()


async def test_dropping_the_default_block_list_lets_a_blocked_domain_through(
    gql: GraphQLClient,
    upstreams: tuple[UpstreamHttpProxy, UpstreamHttpProxy],  # noqa: F811
) -> None:
    up_a, _ = upstreams
    stand_in = LocalSite(host="127.0.0.6").start()
    up_a.hosts[BLOCKED_NAME] = stand_in.host
    try:
        proxy_id = await create(gql, "a", up_a.port, "secret-of-a")  # the default rules
        url = f"http://{BLOCKED_NAME}:{stand_in.port}/ip"
        params = {"a": url, "b": "", "c": "", "d": ""}

        async def fetched() -> str:
            command_id = await run(gql, commandString=FETCH, proxyId=proxy_id, params=params)
            final = await wait_final(gql, command_id)
            assert final["status"] == "SUCCEEDED", await logs_of(gql, command_id)
            return texts(await logs_of(gql, command_id))[0]

        assert await fetched() == f"failed {url}"
        assert up_a.connects == []
        assert stand_in.requests == []
        keep = {"domains": ["keyword:ads"], "action": "BLOCK"}
        assert (await set_rules(gql, proxy_id, [keep]))["userErrors"] == []
        assert await fetched() == '{"ip": "127.0.0.1"}'
        assert up_a.connects == [f"{BLOCKED_NAME}:{stand_in.port}"]
        assert [r.headers["host"] for r in stand_in.requests] == [f"{BLOCKED_NAME}:{stand_in.port}"]
    finally:
        stand_in.stop()


LIST = (
    "query { proxies(first: 10) { edges { node { name routingRules { domains ips ports "
    "network action viaProxy { name } } } } } }"
)


async def test_rules_read_back_through_graphql_exactly_as_written(gql: GraphQLClient) -> None:
    hop = await create(gql, "hop", 3128)
    proxy_id = await create(gql, "main", 3129)
    written: list[dict[str, Any]] = [
        {
            "domains": ["regexp:^(www\\.)?shop[0-9]{1,3}\\.example$", "full:A.test"],
            "action": "VIA",
            "viaProxyId": hop,
        },
        {
            "domains": ["plainword", "keyword:tracker", "domain:example.org"],
            "ips": [],
            "ports": "80,443,8000-8100",
            "network": "tcp,udp",
            "action": "DIRECT",
        },
        {"ips": ["2001:db8::/32", "10.1.2.3", "192.168.0.0/16"], "action": "BLOCK"},
        {"ports": "53", "network": "udp", "action": "PROXY"},
        DEFAULT_RULE,
    ]
    assert (await set_rules(gql, proxy_id, written))["userErrors"] == []
    expected = [
        {"domains": [], "ips": [], "ports": None, "network": None, "viaProxy": None}
        | {key: value for key, value in rule.items() if key != "viaProxyId"}
        | ({"viaProxy": {"name": "hop"}} if "viaProxyId" in rule else {})
        for rule in written
    ]
    node = await gql(READ.replace("viaProxy { id name }", "viaProxy { name }"), id=proxy_id)
    assert node["node"]["routingRules"] == expected
    listed = {
        edge["node"]["name"]: edge["node"]["routingRules"]
        for edge in (await gql(LIST))["proxies"]["edges"]
    }
    assert listed["main"] == expected
    # What was read back, written again, reads back the same (a round trip changes nothing).
    again = [
        {key: value for key, value in rule.items() if key != "viaProxy"}
        | ({"viaProxyId": hop} if rule["viaProxy"] else {})
        for rule in expected
    ]
    assert (await set_rules(gql, proxy_id, again))["userErrors"] == []
    reread = await gql(READ.replace("viaProxy { id name }", "viaProxy { name }"), id=proxy_id)
    assert reread["node"]["routingRules"] == expected
