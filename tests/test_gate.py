"""The rate-limit gate at claim time (issue 13) and the slot reason (issue 12, item 8):
policies checked at save, commands that wait with a reason and start by themselves, caps,
cool-downs, invalid tokens failing fast, and two runners never overspending."""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from starlette.applications import Starlette

from graphql_schema.relay import decode_id
from runner.supervisor import Supervisor
from server.app_services import AppServices
from server.broker import STATUS_TOPIC, StatusChange
from server.models import Command, LogLine, ServiceUsage, utcnow
from server.settings import Settings
from tests.conftest import GraphQLClient
from tests.fixtures.commands import command, run, wait_final, wait_status

SERVICE = """mutation($input: CreateServiceInput!) {
  createService(input: $input) { service { id rateLimitPolicy } userErrors { field code message } }
}"""
LINK = """mutation($input: LinkServiceInput!) {
  linkService(input: $input) {
    profile { services { rateLimitPolicy service { name } } }
    userErrors { field code message }
  }
}"""
CANCEL = "mutation($id: ID!) { cancelCommand(id: $id) { userErrors { message } } }"
SPAN = "python3 -c 'import time; print(time.time()); time.sleep(0.6); print(time.time())'"


def pk(global_id: str) -> int:
    decoded = decode_id(global_id)
    assert decoded is not None
    return decoded[1]


async def service(gql: GraphQLClient, name: str, policy: dict[str, Any] | None = None) -> str:
    data = await gql(
        SERVICE,
        input={
            "name": name,
            "envVar": f"{name.upper()}_TOKEN",
            "token": f"shared-{name}-token",
            "rateLimitPolicy": policy or {},
        },
    )
    assert data["createService"]["userErrors"] == []
    return str(data["createService"]["service"]["id"])


async def observe(
    app: Starlette, service_id: str, profile_id: str | None = None, **values: Any
) -> None:
    """An observation of a token's budget, as a probe or a usage event records it."""
    services: AppServices = app.state.services
    async with services.sessionmaker() as session, session.begin():
        session.add(
            ServiceUsage(
                service_id=pk(service_id),
                profile_id=None if profile_id is None else pk(profile_id),
                **values,
            )
        )


async def spans(app: Starlette, command_ids: list[str]) -> list[tuple[float, float]]:
    """Each command's (start, end) as its child printed them."""
    services: AppServices = app.state.services
    async with services.sessionmaker() as session:
        result = []
        for command_id in command_ids:
            lines = await session.scalars(
                select(LogLine.text)
                .where(LogLine.command_id == pk(command_id), LogLine.stream == "stdout")
                .order_by(LogLine.seq)
            )
            start, end = (float(text) for text in lines)
            result.append((start, end))
    return result


# -- policies at save ---------------------------------------------------------------------


async def test_bad_policies_are_refused_with_their_path(gql: GraphQLClient) -> None:
    data = await gql(
        SERVICE,
        input={
            "name": "github",
            "envVar": "GITHUB_TOKEN",
            "rateLimitPolicy": {
                "budget": {"requests": 0},
                "concurrencyScope": "planet",
                "perMinute": 30,
                "reserve": -1,
            },
        },
    )
    payload = data["createService"]
    assert payload["service"] is None
    assert {(tuple(e["field"]), e["code"]) for e in payload["userErrors"]} == {
        (("rateLimitPolicy", "budget", "requests"), "OUT_OF_RANGE"),
        (("rateLimitPolicy", "budget", "windowSeconds"), "REQUIRED"),
        (("rateLimitPolicy", "concurrencyScope"), "INVALID"),
        (("rateLimitPolicy", "perMinute"), "INVALID"),
        (("rateLimitPolicy", "reserve"), "OUT_OF_RANGE"),
    }
    good = {"budget": {"requests": 5000, "windowSeconds": 3600}, "reserve": 100}
    service_id = await service(gql, "github", good)
    profile = await gql('mutation { createProfile(input: {name: "P"}) { profile { id } } }')
    profile_id = profile["createProfile"]["profile"]["id"]
    link = {"profileId": profile_id, "serviceId": service_id}
    bad = await gql(LINK, input={**link, "rateLimitPolicy": {"concurrency": "two"}})
    assert [(e["field"], e["code"]) for e in bad["linkService"]["userErrors"]] == [
        (["rateLimitPolicy", "concurrency"], "INVALID")
    ]
    linked = await gql(LINK, input={**link, "rateLimitPolicy": {"concurrency": 1}})
    assert linked["linkService"]["profile"]["services"] == [
        {"rateLimitPolicy": {"concurrency": 1}, "service": {"name": "github"}}
    ]
    cleared = await gql(LINK, input={**link, "rateLimitPolicy": None})
    assert cleared["linkService"]["profile"]["services"][0]["rateLimitPolicy"] == {}


# -- the gate -----------------------------------------------------------------------------


async def test_no_budget_waits_with_the_reason_and_starts_after_the_reset(
    app: Starlette, gql: GraphQLClient
) -> None:
    github = await service(gql, "github")
    reset = utcnow() + timedelta(seconds=2)
    await observe(app, github, remaining=0, limit=5000, reset_at=reset)
    broker = app.state.services.broker
    async with broker.subscribe(STATUS_TOPIC) as statuses:
        gated = await run(gql, commandString="true", serviceIds=[github])
        waiting = await wait_status(gql, gated, {"WAITING"})
        assert waiting["waitReason"].startswith("github token (shared): 0 of 5,000 left, resets ")
        assert waiting["waitReason"].endswith(reset.strftime("%H:%M UTC"))
        # Other commands are not blocked behind it.
        plain = await run(gql, commandString="true")
        assert (await wait_final(gql, plain))["status"] == "SUCCEEDED"
        assert (await command(gql, gated))["status"] == "WAITING"
        done = await wait_final(gql, gated, timeout=15)
        seen = []
        while "SUCCEEDED" not in seen:
            message = await asyncio.wait_for(statuses.get(), 5)
            if isinstance(message, StatusChange) and message.command_id == pk(gated):
                seen.append(message.status)
    assert done["status"] == "SUCCEEDED"
    assert datetime.fromisoformat(done["startedAt"]) >= reset
    assert seen == ["QUEUED", "WAITING", "RUNNING", "SUCCEEDED"]  # it waited, then resumed


async def test_a_concurrency_cap_of_one_runs_them_one_after_the_other(
    app: Starlette, gql: GraphQLClient
) -> None:
    github = await service(gql, "github", {"concurrency": 1})
    openai = await service(gql, "openai")
    # The other service's command is long enough to see both of github's start (with room
    # for a loaded machine: github's second start came 2.3 s after its first end once).
    other = await run(gql, commandString=SPAN.replace("0.6", "5"), serviceIds=[openai])
    # The first runs 2 s: long enough for the second's WAITING to be seen on a loaded machine.
    first = await run(gql, commandString=SPAN.replace("0.6", "2"), serviceIds=[github])
    second = await run(gql, commandString=SPAN, serviceIds=[github])
    waiting = await wait_status(gql, second, {"WAITING"})
    assert waiting["waitReason"] == "github: 1 of 1 running (concurrency cap)"
    for command_id in (first, second, other):
        assert (await wait_final(gql, command_id))["status"] == "SUCCEEDED"
    (_, a_end), (b_start, _), (o_start, o_end) = await spans(app, [first, second, other])
    assert b_start >= a_end  # one after the other
    assert o_start < a_end  # the other service's ran beside both
    assert o_end > b_start


async def test_a_rate_limit_answer_starts_the_cool_down(app: Starlette, gql: GraphQLClient) -> None:
    github = await service(gql, "github", {"coolDownSeconds": 2})
    answered = utcnow()
    await observe(
        app, github, remaining=0, reset_at=None, observed_at=answered, detail="HTTP 429: slow down"
    )
    gated = await run(gql, commandString="true", serviceIds=[github])
    waiting = await wait_status(gql, gated, {"WAITING"})
    until = (answered + timedelta(seconds=2)).strftime("%H:%M:%S UTC")
    assert waiting["waitReason"] == (
        f"github token (shared): cooling down after a rate-limit answer until {until}"
    )
    done = await wait_final(gql, gated, timeout=15)
    assert done["status"] == "SUCCEEDED"
    assert datetime.fromisoformat(done["startedAt"]) >= answered + timedelta(seconds=2)


async def test_a_plain_zero_does_not_start_the_cool_down(
    app: Starlette, gql: GraphQLClient
) -> None:
    """A budget seen at zero without a rate-limit answer (a 200 that left none, a 403 that
    is not about the rate limit) starts no cool-down: with no reset known, nothing holds."""
    github = await service(gql, "github", {"coolDownSeconds": 600})
    await observe(app, github, remaining=0, reset_at=None, observed_at=utcnow())
    plain = await run(gql, commandString="true", serviceIds=[github])
    assert (await wait_final(gql, plain))["status"] == "SUCCEEDED"
    await observe(app, github, remaining=0, reset_at=None, observed_at=utcnow(), detail="HTTP 403")
    # A 403 that left none is GitHub's rate-limit answer: this one waits.
    gated = await run(gql, commandString="true", serviceIds=[github])
    waiting = await wait_status(gql, gated, {"WAITING"})
    assert "cooling down after a rate-limit answer" in waiting["waitReason"]
    await gql(CANCEL, id=gated)


async def test_an_invalid_token_fails_fast_and_only_its_own_runs(
    app: Starlette, gql: GraphQLClient
) -> None:
    github = await service(gql, "github")
    profile = await gql('mutation { createProfile(input: {name: "P"}) { profile { id } } }')
    profile_id = profile["createProfile"]["profile"]["id"]
    await gql(LINK, input={"profileId": profile_id, "serviceId": github, "token": "own-token"})
    refused_at = utcnow()
    await observe(
        app,
        github,
        profile_id,
        token_valid=False,
        observed_at=refused_at,
        detail="HTTP 401: Bad credentials",
    )
    doomed = await run(gql, commandString="true", serviceIds=[github], profileId=profile_id)
    shared = await run(gql, commandString="true", serviceIds=[github])
    failed = await wait_final(gql, doomed)
    assert failed["status"] == "FAILED"
    assert failed["attempts"] == 0
    assert failed["error"] == (
        "github token of profile 'P' is invalid: the provider answered 401 at "
        f"{refused_at.strftime('%H:%M')} UTC (Bad credentials); set a new token"
    )
    services: AppServices = app.state.services
    async with services.sessionmaker() as session:
        lines = list(
            await session.scalars(select(LogLine.text).where(LogLine.command_id == pk(doomed)))
        )
    assert lines == [f"not started: {failed['error']}"]
    assert (await wait_final(gql, shared))["status"] == "SUCCEEDED"  # the shared token is fine


async def test_two_runners_never_overspend_a_budget_of_one(
    app: Starlette, gql: GraphQLClient, settings: Settings
) -> None:
    services: AppServices = app.state.services
    second = Supervisor(settings, services.sessionmaker, services.secret_box, services.broker)
    await second.start()
    try:
        by_count = await service(gql, "github", {"budget": {"requests": 1, "windowSeconds": 600}})
        by_remaining = await service(gql, "openai")
        await observe(
            app, by_remaining, remaining=1, limit=100, reset_at=utcnow() + timedelta(minutes=5)
        )
        ids = {
            name: [await run(gql, commandString="true", serviceIds=[sid]) for _ in range(6)]
            for name, sid in (("github", by_count), ("openai", by_remaining))
        }
        deadline = time.monotonic() + 20
        while True:
            async with services.sessionmaker() as session:
                rows = list(await session.scalars(select(Command)))
            statuses = sorted(row.status for row in rows)
            if statuses == ["SUCCEEDED"] * 2 + ["WAITING"] * 10:
                break
            assert time.monotonic() < deadline, statuses
            await asyncio.sleep(0.1)
        await asyncio.sleep(1.0)  # a few more ticks of both runners: still one each
        for name, command_ids in ids.items():
            nodes = [await command(gql, command_id) for command_id in command_ids]
            assert sorted(node["status"] for node in nodes) == ["SUCCEEDED"] + ["WAITING"] * 5
            reasons = {node["waitReason"] for node in nodes if node["status"] == "WAITING"}
            assert len(reasons) == 1, reasons
            assert reasons.pop().startswith(f"{name} token (shared): ")
    finally:
        await second.stop()


async def test_a_command_behind_the_limit_says_it_waits_for_a_slot(
    app: Starlette, gql: GraphQLClient, settings: Settings
) -> None:
    running = [await run(gql, commandString="sleep 30") for _ in range(settings.max_concurrency)]
    for command_id in running:
        await wait_status(gql, command_id, {"RUNNING"})
    behind = await run(gql, commandString="true")
    limit = settings.max_concurrency
    deadline = time.monotonic() + 10
    while (node := await command(gql, behind))["waitReason"] is None:
        assert time.monotonic() < deadline, node
        await asyncio.sleep(0.05)
    assert node["status"] == "QUEUED"
    assert node["waitReason"] == f"waiting for a free slot ({limit} of {limit} running)"
    for command_id in running:
        await gql(CANCEL, id=command_id)
    done = await wait_final(gql, behind)
    assert done["status"] == "SUCCEEDED"
    assert done["waitReason"] is None
