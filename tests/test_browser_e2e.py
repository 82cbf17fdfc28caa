"""End to end: Chromium through the Playwright host, behind v2ray, behind an upstream proxy
that demands auth, driven through `runCommand` and observed through the stored logs."""

from __future__ import annotations

import asyncio
import os
import socket
import time
from datetime import datetime
from pathlib import Path

import pytest
from sqlalchemy import update
from starlette.applications import Starlette

from runner.markers import SIDECAR_MARKER
from server.models import Profile
from server.settings import Settings
from tests.conftest import GraphQLClient
from tests.fixtures.commands import logs_of, run, texts, wait_final, wait_status
from tests.fixtures.netfakes import LocalSite, UpstreamHttpProxy
from tests.fixtures.processes import free_port
from tests.test_supervisor import pk, run_processes

SCRIPTS = Path(__file__).resolve().parent / "fixtures" / "scripts"
USER, PASSWORD = "browser-user", "br0wser-Pa55-secret"
TEMPLATE = (
    "corral-playwright --profile {{ profile.dir }} --proxy {{ proxy.url }} -- "
    "visit.mjs {{ params.url }} {{ params.mode }}"
)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"scripts_dir": SCRIPTS, "kill_grace_seconds": 3.0})


async def gql_id(gql: GraphQLClient, query: str, path: str, **variables: object) -> str:
    data = await gql(query, **variables)
    payload = data[path]
    assert payload["userErrors"] == [], payload["userErrors"]
    key = next(k for k in payload if k != "userErrors")
    return str(payload[key]["id"])


async def world(gql: GraphQLClient, proxy_port: int, profiles: list[str]) -> dict[str, str]:
    ids = {
        "template": await gql_id(
            gql,
            """mutation($t: String!) { createCommandTemplate(input: {name: "visit", template: $t,
            parameters: [{name: "url"}, {name: "mode", default: "once"}], timeoutSeconds: 60}) {
            commandTemplate { id } userErrors { message } } }""",
            "createCommandTemplate",
            t=TEMPLATE,
        ),
        "proxy": await gql_id(
            gql,
            """mutation($port: Int!, $u: String!, $p: String!) { createProxy(input: {name: "up",
            protocol: "http", host: "127.0.0.1", port: $port, username: $u, password: $p}) {
            proxy { id } userErrors { message } } }""",
            "createProxy",
            port=proxy_port,
            u=USER,
            p=PASSWORD,
        ),
    }
    for name in profiles:
        ids[name] = await gql_id(
            gql,
            "mutation($n: String!) { createProfile(input: {name: $n}) { profile { id } userErrors "
            "{ message } } }",
            "createProfile",
            n=name,
        )
        await gql(
            "mutation($p: ID!, $x: ID!) { attachProxy(input: {profileId: $p, proxyId: $x}) "
            "{ userErrors { message } } }",
            p=ids[name],
            x=ids["proxy"],
        )
    return ids


async def visit(gql: GraphQLClient, ids: dict[str, str], profile: str, url: str) -> list[str]:
    command_id = await run(
        gql, templateId=ids["template"], profileId=ids[profile], params={"url": url}
    )
    final = await wait_final(gql, command_id, timeout=60)
    lines = await logs_of(gql, command_id)
    assert final["status"] == "SUCCEEDED", lines
    return texts(lines)


async def test_profiles_keep_their_own_cookies_behind_the_proxy(
    gql: GraphQLClient, site: LocalSite, upstream: UpstreamHttpProxy
) -> None:
    ids = await world(gql, upstream.port, ["P", "Q"])
    await visit(gql, ids, "P", f"{site.url}/set-cookie")
    assert "body=corral_test=persisted" in await visit(gql, ids, "P", f"{site.url}/cookies")
    assert "body=" in await visit(gql, ids, "Q", f"{site.url}/cookies")
    # Every request of the site came through the upstream proxy, with the right credentials.
    assert upstream.connects
    assert all(c == f"127.0.0.1:{site.port}" for c in upstream.connects)
    assert upstream.refused == 0
    assert len(site.requests) >= 3


async def test_credentials_appear_in_no_argv_and_no_log(
    gql: GraphQLClient, site: LocalSite, upstream: UpstreamHttpProxy
) -> None:
    ids = await world(gql, upstream.port, ["P"])
    command_id = await run(
        gql, templateId=ids["template"], profileId=ids["P"], params={"url": f"{site.url}/"}
    )
    final = await wait_final(gql, command_id, timeout=60)
    lines = await logs_of(gql, command_id)
    assert final["status"] == "SUCCEEDED", lines
    text = " ".join(final["argv"]) + "\n".join(line["text"] for line in lines)
    assert PASSWORD not in text
    assert USER not in text
    assert "--proxy socks5://127.0.0.1:" in " ".join(final["argv"])


async def test_two_hop_chain_carries_the_browser(gql: GraphQLClient, site: LocalSite) -> None:
    inner = UpstreamHttpProxy(USER, PASSWORD).start()
    outer = UpstreamHttpProxy("outer-user", "outer-Pa55-secret").start()
    try:
        ids = await world(gql, inner.port, ["P"])
        outer_id = await gql_id(
            gql,
            """mutation($port: Int!) { createProxy(input: {name: "outer", protocol: "http",
            host: "127.0.0.1", port: $port, username: "outer-user",
            password: "outer-Pa55-secret"}) { proxy { id } userErrors { message } } }""",
            "createProxy",
            port=outer.port,
        )
        await gql(
            "mutation($id: ID!, $via: ID!) { updateProxy(input: {id: $id, viaId: $via}) "
            "{ userErrors { message } } }",
            id=ids["proxy"],
            via=outer_id,
        )
        out = await visit(gql, ids, "P", f"{site.url}/")
        assert "title=home" in out
        assert outer.connects
        assert set(outer.connects) == {f"127.0.0.1:{inner.port}"}
        assert inner.connects
        assert set(inner.connects) == {f"127.0.0.1:{site.port}"}
    finally:
        inner.stop()
        outer.stop()


async def test_proxy_down_fails_closed_and_the_site_sees_nothing(
    gql: GraphQLClient, site: LocalSite
) -> None:
    ids = await world(gql, free_port(), ["P"])
    command_id = await run(
        gql, templateId=ids["template"], profileId=ids["P"], params={"url": f"{site.url}/"}
    )
    final = await wait_final(gql, command_id, timeout=60)
    assert final["status"] == "FAILED"
    assert "upstream proxy 'up'" in final["error"]
    assert site.requests == []


async def test_two_runs_on_one_profile_run_one_after_the_other(
    gql: GraphQLClient, site: LocalSite, upstream: UpstreamHttpProxy
) -> None:
    ids = await world(gql, upstream.port, ["P"])
    commands = [
        await run(
            gql, templateId=ids["template"], profileId=ids["P"], params={"url": f"{site.url}/"}
        )
        for _ in range(2)
    ]
    finals = [await wait_final(gql, c, timeout=90) for c in commands]
    if [f["status"] for f in finals] != ["SUCCEEDED", "SUCCEEDED"]:
        logs = [
            f"{line['stream']} {line['text'][:300]}"
            for c in commands
            for line in await logs_of(gql, c)
        ]
        pytest.fail(f"not both SUCCEEDED: {finals}\n" + "\n".join(logs))
    first_end = datetime.fromisoformat(finals[0]["finishedAt"])
    second_start = datetime.fromisoformat(finals[1]["startedAt"])
    assert second_start >= first_end


def browser_processes(marker: str) -> list[int]:
    """PIDs whose command line mentions `marker` (the profile dir or the sidecar config)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            except OSError:
                continue
            if marker in cmdline:
                found.append(int(entry.name))
    return found


async def test_cancelling_a_browser_run_leaves_nothing_behind(
    gql: GraphQLClient, site: LocalSite, upstream: UpstreamHttpProxy, settings: Settings
) -> None:
    ids = await world(gql, upstream.port, ["P"])
    command_id = await run(
        gql,
        templateId=ids["template"],
        profileId=ids["P"],
        params={"url": f"{site.url}/", "mode": "wait"},
    )
    await wait_status(gql, command_id, {"RUNNING"}, timeout=30)
    deadline = time.monotonic() + 30
    while "waiting" not in texts(await logs_of(gql, command_id)):
        assert time.monotonic() < deadline, await logs_of(gql, command_id)
        await asyncio.sleep(0.1)
    profile_dir = str(settings.profiles_dir)
    prefix = f"{socket.gethostname()}:{os.getpid()}:"
    assert browser_processes(profile_dir), "chromium runs on the profile dir"
    assert run_processes(pk(command_id), prefix, SIDECAR_MARKER), "the sidecar runs"
    assert run_processes(pk(command_id), prefix), "node and chromium run"
    await gql("mutation($id: ID!) { cancelCommand(id: $id) { command { id } } }", id=command_id)
    final = await wait_final(gql, command_id, timeout=30)
    assert final["status"] == "CANCELLED"
    assert browser_processes(profile_dir) == []
    assert run_processes(pk(command_id), prefix, SIDECAR_MARKER) == []
    assert run_processes(pk(command_id), prefix) == []


async def test_invalid_timezone_names_itself_in_the_stored_log(
    app: Starlette, gql: GraphQLClient
) -> None:
    """Issue 12, item 1: on this host (no system D-Bus) the run said "chromium not found"."""
    profile_id = await gql_id(
        gql,
        'mutation { createProfile(input: {name: "mars"}) { profile { id } userErrors { message } } }',
        "createProfile",
    )
    # Save-time checks refuse this timezone; a row from before them may still hold one.
    async with app.state.services.sessionmaker() as session:
        await session.execute(
            update(Profile).where(Profile.id == pk(profile_id)).values(timezone="Mars/Olympus")
        )
        await session.commit()
    command_id = await run(
        gql,
        commandString="corral-playwright --profile {{ profile.dir }} -- visit.mjs about:blank",
        profileId=profile_id,
    )

    final = await wait_final(gql, command_id, timeout=60)
    assert final["status"] == "FAILED"
    assert final["exitCode"] == 3
    # The command's own error names the cause, not only the exit status (issue 12).
    assert final["error"].startswith(
        'exited with status 3: cannot launch Chromium: invalid timezone "Mars/Olympus" '
        '(browser setting "timezone"'
    ), final["error"]
    stderr = texts(await logs_of(gql, command_id), "STDERR")
    assert stderr[0].startswith(
        'corral-playwright: cannot launch Chromium: invalid timezone "Mars/Olympus"'
    )
    assert not any("not found" in line for line in stderr), stderr
