"""Usage events from a child's stdout: recorded as EVENT observations of the token the run
used (the profile's own when its link has one, else the service's shared token); a
`status` of 429 means none left."""

from __future__ import annotations

import json
from typing import Any

from sqlalchemy import select
from starlette.applications import Starlette

from server.app_services import AppServices
from server.models import ServiceUsage
from tests.conftest import GraphQLClient
from tests.fixtures.commands import run, wait_final
from tests.test_probes import LINKS, linked_profile, links_by_profile, service

SHARED = "ghp_sharedSHAREDshared0001"
OWN = "ghp_ownOWNown0000000000002"
PRINT = "sh -c 'echo \"$1\"' - {{ params.e }}"


async def run_event(gql: GraphQLClient, profile_id: str, service_id: str, **event: Any) -> None:
    line = "::corral::" + json.dumps({"type": "usage", "service": "github", **event})
    command_id = await run(
        gql, commandString=PRINT, profileId=profile_id, serviceIds=[service_id], params={"e": line}
    )
    assert (await wait_final(gql, command_id))["status"] == "SUCCEEDED"


async def test_usage_events_update_the_token_the_run_used(
    app: Starlette, gql: GraphQLClient
) -> None:
    service_id = await service(gql, "github", "http://127.0.0.1:9", token=SHARED)
    own = await linked_profile(gql, "own", service_id, OWN)
    shared = await linked_profile(gql, "shared", service_id, None)
    await run_event(gql, own, service_id, units=1, remaining=10, limit=5000)
    await run_event(gql, shared, service_id, units=1, remaining=4321, limit=5000)
    reset = "2030-01-01T00:00:00Z"
    await run_event(gql, own, service_id, status=429, resetAt=reset)

    services: AppServices = app.state.services
    async with services.sessionmaker() as session:
        rows = list(await session.scalars(select(ServiceUsage).order_by(ServiceUsage.id)))
    assert [(r.profile_id is None, r.remaining, r.source, r.detail) for r in rows] == [
        (False, 10, "event", None),
        (True, 4321, "event", None),  # the link has no token: the shared token's budget
        (False, 0, "event", "HTTP 429"),  # a 429: none left until the reset; the gate's
    ]  # cool-down reads the status off the detail
    links = links_by_profile(await gql(LINKS))
    assert links["own"]["usage"]["remaining"] == 0
    assert links["own"]["usage"]["resetAt"].startswith("2030-01-01T00:00:00")
    assert (links["own"]["usage"]["source"], links["own"]["usage"]["sharedToken"]) == (
        "EVENT",
        False,
    )
    assert links["shared"]["usage"]["remaining"] == 4321
    assert links["shared"]["usage"]["sharedToken"] is True
    usage = await gql("{ services { nodes { usage { remaining source } } } }")
    assert usage["services"]["nodes"][0]["usage"] == {"remaining": 4321, "source": "EVENT"}


async def test_a_bad_status_in_a_usage_event_is_refused_in_the_log(
    app: Starlette, gql: GraphQLClient
) -> None:
    service_id = await service(gql, "github", "http://127.0.0.1:9", token=SHARED)
    own = await linked_profile(gql, "own", service_id, OWN)
    await run_event(gql, own, service_id, status="429")
    services: AppServices = app.state.services
    async with services.sessionmaker() as session:
        assert list(await session.scalars(select(ServiceUsage))) == []
