"""Proxies for real: v2ray sidecars in front of a local upstream proxy that demands auth."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest

from server.settings import Settings
from tests.conftest import GraphQLClient
from tests.fixtures.commands import logs_of, run, texts, wait_final
from tests.fixtures.netfakes import LocalSite, UpstreamHttpProxy
from tests.fixtures.processes import free_port

# Unique to this test process: the leftover-config check globs /tmp, which another pytest
# worker's sidecars share.
USER, PASSWORD = "alice", f"pr0xy-Pa55word-{uuid.uuid4().hex[:12]}"
CREATE_PROXY = """mutation($input: CreateProxyInput!) { createProxy(input: $input) {
  proxy { id name } userErrors { field message code } } }"""
CHECK = """mutation($id: ID!) { checkProxy(id: $id) {
  proxy { health { ok latencyMs error exitIp checkedAt } } userErrors { message } } }"""
IMPORT = """mutation($links: [String!]!) { importProxies(links: $links) {
  proxies { name protocol host port hasCredentials settings } userErrors { field message code } } }"""


@pytest.fixture
def settings(settings: Settings, site: LocalSite) -> Settings:
    return settings.model_copy(
        update={"proxy_check_url": f"{site.url}/ip", "kill_grace_seconds": 0.5}
    )


async def create_proxy(gql: GraphQLClient, **fields: Any) -> str:
    data = await gql(CREATE_PROXY, input={"protocol": "http", "host": "127.0.0.1", **fields})
    assert data["createProxy"]["userErrors"] == []
    return str(data["createProxy"]["proxy"]["id"])


async def test_check_proxy_records_health_and_exit_ip(
    gql: GraphQLClient, upstream: UpstreamHttpProxy, site: LocalSite
) -> None:
    proxy_id = await create_proxy(
        gql, name="up", port=upstream.port, username=USER, password=PASSWORD
    )
    health = (await gql(CHECK, id=proxy_id))["checkProxy"]["proxy"]["health"]
    assert health["ok"] is True, health
    assert health["exitIp"] == "127.0.0.1"
    assert health["latencyMs"] > 0
    assert upstream.connects == [f"127.0.0.1:{site.port}"]
    assert [r.path for r in site.requests] == ["/ip"]


async def test_check_proxy_with_wrong_password_fails(
    gql: GraphQLClient, upstream: UpstreamHttpProxy, site: LocalSite
) -> None:
    proxy_id = await create_proxy(gql, name="up", port=upstream.port, username=USER, password="no")
    health = (await gql(CHECK, id=proxy_id))["checkProxy"]["proxy"]["health"]
    assert health["ok"] is False
    assert health["error"]
    assert upstream.refused >= 1
    assert site.requests == []


async def test_check_proxy_that_is_down_fails_clearly(gql: GraphQLClient, site: LocalSite) -> None:
    port = free_port()
    proxy_id = await create_proxy(gql, name="down", port=port)
    health = (await gql(CHECK, id=proxy_id))["checkProxy"]["proxy"]["health"]
    assert health["ok"] is False
    assert health["error"].startswith(f"upstream proxy 'down' (127.0.0.1:{port}) is unreachable")
    assert site.requests == []


FETCH = "curl -sS --max-time 10 --proxy {{ proxy.url }} {{ params.url }}"
FETCH_ENV = 'sh -c \'curl -sS --max-time 10 --proxy "$CORRAL_PROXY_URL" "$1"\' - {{ params.url }}'


async def test_command_goes_out_through_its_proxy_only(
    gql: GraphQLClient, upstream: UpstreamHttpProxy, site: LocalSite, settings: Settings
) -> None:
    proxy_id = await create_proxy(
        gql, name="up", port=upstream.port, username=USER, password=PASSWORD
    )
    command_id = await run(
        gql, commandString=FETCH, proxyId=proxy_id, params={"url": f"{site.url}/ip"}
    )
    final = await wait_final(gql, command_id)
    lines = await logs_of(gql, command_id)
    assert final["status"] == "SUCCEEDED", lines
    assert texts(lines) == ['{"ip": "127.0.0.1"}']
    assert upstream.auth_seen[-1] is not None
    assert upstream.connects == [f"127.0.0.1:{site.port}"]
    system = texts(lines, "SYSTEM")
    assert any("proxy sidecar for 'up' listening on socks5://127.0.0.1:" in t for t in system)
    argv = " ".join(final["argv"])
    assert "socks5://127.0.0.1:" in argv  # the template's proxy.url is the local sidecar
    everything = argv + " ".join(line["text"] for line in lines)
    assert PASSWORD not in everything
    assert USER not in everything
    leftovers = [p for p in Path("/tmp").glob("corral-sidecar-*/*") if PASSWORD in p.read_text()]
    assert leftovers == []  # the 0600 config, the only copy of the credentials, is gone


async def test_child_gets_the_proxy_url_in_its_environment(
    gql: GraphQLClient, upstream: UpstreamHttpProxy, site: LocalSite
) -> None:
    proxy_id = await create_proxy(
        gql, name="up", port=upstream.port, username=USER, password=PASSWORD
    )
    command_id = await run(
        gql, commandString=FETCH_ENV, proxyId=proxy_id, params={"url": f"{site.url}/ip"}
    )
    assert (await wait_final(gql, command_id))["status"] == "SUCCEEDED"
    assert upstream.connects == [f"127.0.0.1:{site.port}"]


async def test_proxy_down_fails_closed(gql: GraphQLClient, site: LocalSite) -> None:
    port = free_port()
    proxy_id = await create_proxy(gql, name="down", port=port)
    command_id = await run(
        gql, commandString=FETCH, proxyId=proxy_id, params={"url": f"{site.url}/ip"}
    )
    final = await wait_final(gql, command_id)
    assert final["status"] == "FAILED"
    assert "upstream proxy 'down'" in final["error"]
    assert "unreachable" in final["error"]
    assert site.requests == []  # nothing went out directly
    system = texts(await logs_of(gql, command_id), "SYSTEM")
    assert any(t.startswith("not started, nothing went out:") for t in system)


async def test_two_hop_chain(gql: GraphQLClient, site: LocalSite) -> None:
    first = UpstreamHttpProxy("hop1", "hop1-secret").start()
    second = UpstreamHttpProxy("hop2", "hop2-secret").start()
    try:
        outer = await create_proxy(
            gql, name="outer", port=second.port, username="hop2", password="hop2-secret"
        )
        inner = await create_proxy(
            gql, name="inner", port=first.port, username="hop1", password="hop1-secret", viaId=outer
        )
        command_id = await run(
            gql, commandString=FETCH, proxyId=inner, params={"url": f"{site.url}/ip"}
        )
        final = await wait_final(gql, command_id)
        assert final["status"] == "SUCCEEDED", await logs_of(gql, command_id)
        # Xray dials the outer hop, asks it for the inner hop, and asks that for the site.
        assert second.connects == [f"127.0.0.1:{first.port}"]
        assert first.connects == [f"127.0.0.1:{site.port}"]
    finally:
        first.stop()
        second.stop()


async def test_deleting_the_proxy_of_a_queued_command_fails_it_closed(
    gql: GraphQLClient, app: Any, upstream: UpstreamHttpProxy, site: LocalSite
) -> None:
    await app.state.supervisor.stop()  # keep the command queued while its proxy goes
    proxy_id = await create_proxy(
        gql, name="up", port=upstream.port, username=USER, password=PASSWORD
    )
    command_id = await run(
        gql, commandString=FETCH, proxyId=proxy_id, params={"url": f"{site.url}/ip"}
    )
    data = await gql(
        "mutation($id: ID!) { deleteProxy(id: $id) { userErrors { message } } }", id=proxy_id
    )
    assert data["deleteProxy"]["userErrors"] == []
    await app.state.supervisor.start()
    final = await wait_final(gql, command_id)
    assert final["status"] == "FAILED"
    assert "its proxy 'up' was deleted" in final["error"]
    assert site.requests == []


VMESS = (
    "vmess://eyJ2IjoiMiIsInBzIjoidm0iLCJhZGQiOiJleGFtcGxlLmNvbSIsInBvcnQiOiI0NDMiLCJpZCI6"
    "ImIzNWJjNzE3LTMwMmEtNGRlZC1hMmQ1LTQ3YjM3NmNmMjQ4YSIsImFpZCI6IjAiLCJuZXQiOiJ3cyIsInBh"
    "dGgiOiIvd3MiLCJ0bHMiOiJ0bHMifQ=="
)


async def test_import_share_links_keeps_the_good_and_reports_each_bad(
    gql: GraphQLClient,
) -> None:
    links = [
        "socks5://bob:secret@127.0.0.1:1080#local%20socks",
        "nonsense://what",
        "vless://b35bc717-302a-4ded-a2d5-47b376cf248a@vl.example.com:443?type=ws&security=tls"
        "&sni=vl.example.com&path=%2Fws#vl",
        "trojan://pw@tr.example.com:0#badport",
        VMESS,
        "ss://YWVzLTI1Ni1nY206c3NwYXNz@ss.example.com:8388#ss",
        "http://u:p@127.0.0.1:3128#local%20socks",  # same name as the first: TAKEN
    ]
    data = (await gql(IMPORT, links=links))["importProxies"]
    names = [p["name"] for p in data["proxies"]]
    assert names == ["local socks", "vl", "vm", "ss"]
    assert all(p["hasCredentials"] for p in data["proxies"])
    fields = [(e["field"], e["code"]) for e in data["userErrors"]]
    assert fields == [
        (["links", "1"], "INVALID"),
        (["links", "3"], "INVALID"),
        (["links", "6"], "TAKEN"),
    ]
    listed = await gql("{ proxies { totalCount } }")
    assert listed["proxies"]["totalCount"] == 4
