"""The `serviceUsage` subscription (issue 13) over graphql-transport-ws: the latest
observation of each token first, then each token again as a probe, a run's usage event or
a run started with it (Corral's count) adds to what is known of it."""

from __future__ import annotations

import json
from typing import Any

import httpx

from server.settings import Settings
from tests.conftest import GraphQLClient
from tests.fixtures.commands import run, wait_final
from tests.fixtures.fake_providers import FakeAnswer, FakeProviders
from tests.fixtures.servers import running_server
from tests.test_probes import PROBE, linked_profile, service
from tests.test_streams import GraphQLSocket, wait_subscribers
from tests.test_usage_events import PRINT

SERVICE_USAGE = """subscription($id: ID) {
  serviceUsage(serviceId: $id) {
    service { name } profile { name } runsSinceObservation
    usage { remaining limit source sharedToken tokenValid }
  }
}"""


def token_of(update: dict[str, Any]) -> str:
    profile = update["profile"]
    return f"{update['service']['name']}/{'shared' if profile is None else profile['name']}"


async def next_updates(ws: GraphQLSocket, count: int) -> dict[str, list[dict[str, Any]]]:
    """The next `count` updates, by subscription id."""
    found: dict[str, list[dict[str, Any]]] = {}
    for _ in range(count):
        message = await ws.receive()
        assert message["type"] == "next", message
        found.setdefault(message["id"], []).append(message["payload"]["data"]["serviceUsage"])
    return found


def summary(updates: list[dict[str, Any]]) -> list[tuple[str, int | None, str, int]]:
    return [
        (token_of(u), u["usage"]["remaining"], u["usage"]["source"], u["runsSinceObservation"])
        for u in updates
    ]


async def test_service_usage_sends_the_latest_then_each_new_observation(
    settings: Settings, fake_providers: FakeProviders
) -> None:
    async with (
        running_server(settings) as live,
        httpx.AsyncClient(base_url=live.base_url, headers=live.headers, timeout=30) as http,
    ):
        gql = GraphQLClient(http)
        github = await service(gql, "github", fake_providers.github, token="ghp_shared_0001")
        own = await linked_profile(gql, "P", github, "ghp_own_0002")
        other = await service(gql, "openai", fake_providers.openai, token="sk-other-0003")
        for service_id in (github, other):
            assert (await gql(PROBE, id=service_id))["probeService"]["userErrors"] == []
        async with GraphQLSocket.open(live) as ws:
            await ws.subscribe("one", SERVICE_USAGE, id=github)
            await ws.subscribe("all", SERVICE_USAGE)
            await wait_subscribers(http, 2)
            first = await next_updates(ws, 5)
            assert summary(first["one"]) == [
                ("github/shared", 4999, "PROBE", 0),
                ("github/P", 4999, "PROBE", 0),
            ]
            assert sorted(map(token_of, first["all"])) == [
                "github/P",
                "github/shared",
                "openai/shared",
            ]

            # A probe: each token of the service again, to both; the other service's
            # subscriber hears nothing of it.
            fake_providers.default = FakeAnswer(remaining=120)
            await gql(PROBE, id=github)
            probed = await next_updates(ws, 4)
            for sub in ("one", "all"):
                assert sorted(summary(probed[sub])) == [
                    ("github/P", 120, "PROBE", 0),
                    ("github/shared", 120, "PROBE", 0),
                ]

            # Corral's count: a run started with the shared token.
            counted = await run(gql, commandString="true", serviceIds=[github])
            assert (await wait_final(gql, counted))["status"] == "SUCCEEDED"
            spent = await next_updates(ws, 2)
            for sub in ("one", "all"):
                assert summary(spent[sub]) == [("github/shared", 120, "PROBE", 1)]

            # A run's usage event on the profile's own token: the count moves on (one run
            # since the probe), then the event's figures (none since); or both at once.
            line = "::corral::" + json.dumps(
                {"type": "usage", "service": "github", "remaining": 77}
            )
            used = await run(
                gql, commandString=PRINT, profileId=own, serviceIds=[github], params={"e": line}
            )
            assert (await wait_final(gql, used))["status"] == "SUCCEEDED"
            seen: list[dict[str, Any]] = []
            while not seen or seen[-1]["usage"]["source"] != "EVENT":
                message = await ws.receive()
                if message["id"] == "one":
                    seen.append(message["payload"]["data"]["serviceUsage"])
            assert summary(seen)[-1] == ("github/P", 77, "EVENT", 0)
            assert all(token_of(update) == "github/P" for update in seen)

    # An unknown or malformed id is an error, not a silent stream.
    async with running_server(settings) as live, GraphQLSocket.open(live) as ws:
        for sub, bad in (("unknown", "U2VydmljZTo5OTk5OTk="), ("malformed", "not an id")):
            await ws.subscribe(sub, SERVICE_USAGE, id=bad)
            message = await ws.receive()
            while message["type"] == "complete":  # the one before's end
                message = await ws.receive()
            assert message["id"] == sub, message
            errors = (
                message["payload"]["errors"] if message["type"] == "next" else message["payload"]
            )
            assert errors[0]["message"].startswith("no such service"), message
