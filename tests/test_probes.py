"""Provider probes against local fakes of GitHub and an OpenAI-style API: figures per token
(shared and profiles' own), invalid tokens, rate-limit answers, failures, the token never
quoted; and the schedule, taken once across runners on one database."""

from __future__ import annotations

import asyncio
import logging
import os
import sys
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.applications import Starlette

from runner.schedules import RESCAN_SECONDS, ProbeSchedule
from server.app_services import AppServices
from server.broker import Broker
from server.db import create_engine, create_sessionmaker
from server.models import Profile, ProfileService, Service, ServiceUsage
from server.probes import observe, take_due_probe
from server.providers import provider_for
from server.providers.common import parse_duration
from server.secretbox import SecretBox, load_secret_box
from server.settings import Settings
from tests.conftest import TEST_KEY, GraphQLClient, StatementCounter
from tests.fixtures.fake_providers import FakeAnswer, FakeProviders

ROOT = Path(__file__).resolve().parent.parent
SHARED = "ghp_sharedSHAREDshared0001"
OWN = "ghp_ownOWNown0000000000002"
BAD = "sk-badBADbad00000000000003"

CREATE = """mutation($input: CreateServiceInput!) { createService(input: $input) {
  service { id } userErrors { field message code } } }"""
LINK = """mutation($p: ID!, $s: ID!, $t: String) {
  linkService(input: {profileId: $p, serviceId: $s, token: $t}) { userErrors { message } } }"""
PROBE = """mutation($id: ID!) { probeService(id: $id) {
  service { id usage { remaining limit resetAt tokenValid source detail ageSeconds sharedToken } }
  userErrors { field message code } } }"""
USAGE_FIELDS = "remaining limit resetAt tokenValid source detail sharedToken"
LINKS = "{ profiles { nodes { name services { hasToken usage { " + USAGE_FIELDS + " } } } } }"


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # No embedded runner: its schedule is not what these tests run, nor count statements of.
    return settings.model_copy(update={"embedded_runner": False})


async def service(gql: GraphQLClient, kind: str, base_url: str, **fields: Any) -> str:
    data = await gql(
        CREATE,
        input={
            "name": fields.pop("name", kind),
            "kind": kind,
            "baseUrl": base_url,
            "envVar": fields.pop("envVar", f"{kind.upper()}_TOKEN"),
            **fields,
        },
    )
    assert data["createService"]["userErrors"] == []
    return str(data["createService"]["service"]["id"])


async def linked_profile(gql: GraphQLClient, name: str, service_id: str, token: str | None) -> str:
    data = await gql(
        "mutation($n: String!) { createProfile(input: {name: $n}) { profile { id } } }", n=name
    )
    profile_id = str(data["createProfile"]["profile"]["id"])
    assert (await gql(LINK, p=profile_id, s=service_id, t=token))["linkService"]["userErrors"] == []
    return profile_id


def links_by_profile(data: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {p["name"]: p["services"][0] for p in data["profiles"]["nodes"]}


async def observations(app: Starlette) -> list[ServiceUsage]:
    services: AppServices = app.state.services
    async with services.sessionmaker() as session:
        return list(await session.scalars(select(ServiceUsage).order_by(ServiceUsage.id)))


async def test_probe_records_figures_for_shared_and_own_tokens(
    app: Starlette, gql: GraphQLClient, fake_providers: FakeProviders
) -> None:
    fake_providers.answers[SHARED] = FakeAnswer(remaining=4000, limit=5000, reset_in=600)
    fake_providers.answers[OWN] = FakeAnswer(remaining=10, limit=5000)
    service_id = await service(gql, "github", fake_providers.github, token=SHARED)
    await linked_profile(gql, "own", service_id, OWN)
    await linked_profile(gql, "shared", service_id, None)

    payload = (await gql(PROBE, id=service_id))["probeService"]
    assert payload["userErrors"] == []
    usage = payload["service"]["usage"]
    assert (usage["remaining"], usage["limit"], usage["tokenValid"]) == (4000, 5000, True)
    assert (usage["source"], usage["sharedToken"], usage["detail"]) == ("PROBE", True, None)
    assert 0 <= usage["ageSeconds"] < 30
    reset = datetime.fromisoformat(usage["resetAt"])
    assert timedelta(seconds=590) < reset - datetime.now(UTC) < timedelta(seconds=610)
    assert sorted(fake_providers.authorizations("/rate_limit")) == sorted(
        [f"Bearer {SHARED}", f"Bearer {OWN}"]
    )

    links = links_by_profile(await gql(LINKS))
    assert links["own"]["usage"]["remaining"] == 10
    assert links["own"]["usage"]["sharedToken"] is False
    # No token of its own: its runs use the shared token, whose budget it shows.
    assert links["shared"]["usage"]["remaining"] == 4000
    assert links["shared"]["usage"]["sharedToken"] is True
    rows = await observations(app)
    assert sorted((r.profile_id is None, r.remaining, r.source) for r in rows) == [
        (False, 10, "probe"),
        (True, 4000, "probe"),
    ]

    history = await gql(
        """query { services { nodes { usageHistory { sharedToken profile { name }
        points { remaining limit observedAt } } } } }"""
    )
    tokens = history["services"]["nodes"][0]["usageHistory"]
    assert [(t["sharedToken"], t["profile"] and t["profile"]["name"]) for t in tokens] == [
        (True, None),
        (False, "own"),
    ]
    assert [p["remaining"] for p in tokens[0]["points"]] == [4000]


async def test_openai_probe_reads_request_and_token_headers(
    gql: GraphQLClient, fake_providers: FakeProviders
) -> None:
    fake_providers.default = FakeAnswer(remaining=59, limit=60, reset_in=360)
    service_id = await service(gql, "openai", fake_providers.openai, token=SHARED)
    usage = (await gql(PROBE, id=service_id))["probeService"]["service"]["usage"]
    assert (usage["remaining"], usage["limit"], usage["tokenValid"]) == (59, 60, True)
    assert usage["detail"] == "tokens: 39000 of 40000 left, resets in 1.5s"
    reset = datetime.fromisoformat(usage["resetAt"]) - datetime.now(UTC)
    assert timedelta(seconds=350) < reset < timedelta(seconds=361)  # `6m0s`
    assert fake_providers.seen == [("/openai/models", f"Bearer {SHARED}")]


async def test_401_marks_the_token_invalid_and_never_quotes_it(
    app: Starlette,
    gql: GraphQLClient,
    fake_providers: FakeProviders,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    # Like OpenAI's "Incorrect API key provided: sk-...", the answer quotes the token.
    fake_providers.answers[BAD] = FakeAnswer(status=401, message="Incorrect API key: {token}")
    service_id = await service(gql, "openai", fake_providers.openai)
    await linked_profile(gql, "p", service_id, BAD)
    raw = await gql.raw(PROBE, id=service_id)
    assert raw["data"]["probeService"]["userErrors"] == []
    link = links_by_profile(await gql(LINKS))["p"]["usage"]
    assert link["tokenValid"] is False
    assert link["remaining"] is None
    assert link["detail"] == "HTTP 401: Incorrect API key: [token]"
    everything = [str(raw), str(await gql(LINKS)), caplog.text]
    everything += [str(r.detail) for r in await observations(app)]
    assert all(BAD not in text for text in everything)


@pytest.mark.parametrize(("kind", "status"), [("github", 403), ("github", 429), ("openai", 429)])
async def test_rate_limited_answer_records_none_left_and_the_reset(
    gql: GraphQLClient, fake_providers: FakeProviders, kind: str, status: int
) -> None:
    fake_providers.default = FakeAnswer(status=status, reset_in=120, message="rate limit exceeded")
    base = fake_providers.github if kind == "github" else fake_providers.openai
    service_id = await service(gql, kind, base, token=SHARED)
    usage = (await gql(PROBE, id=service_id))["probeService"]["service"]["usage"]
    assert usage["remaining"] == 0
    assert usage["detail"] == f"HTTP {status}: rate limit exceeded"
    reset = datetime.fromisoformat(usage["resetAt"]) - datetime.now(UTC)
    assert timedelta(seconds=100) < reset < timedelta(seconds=121)


async def test_probe_refuses_unknown_kind_and_a_service_without_tokens(
    gql: GraphQLClient, fake_providers: FakeProviders
) -> None:
    generic = await service(gql, "generic", fake_providers.github, token=SHARED)
    errors = (await gql(PROBE, id=generic))["probeService"]["userErrors"]
    assert errors == [
        {"field": ["id"], "message": "no provider for kind 'generic'", "code": "INVALID"}
    ]
    tokenless = await service(gql, "github", fake_providers.github)
    errors = (await gql(PROBE, id=tokenless))["probeService"]["userErrors"]
    assert "has no token to probe" in errors[0]["message"]
    errors = (await gql(PROBE, id="bm9wZQ=="))["probeService"]["userErrors"]
    assert errors[0]["field"] == ["id"]
    assert fake_providers.seen == []


async def test_unreachable_provider_is_an_observation_with_a_detail(gql: GraphQLClient) -> None:
    with socket_closed() as port:
        service_id = await service(gql, "github", f"http://127.0.0.1:{port}", token=SHARED)
        payload = (await gql(PROBE, id=service_id))["probeService"]
    usage = payload["service"]["usage"]
    assert payload["userErrors"] == []
    assert (usage["remaining"], usage["tokenValid"]) == (None, None)
    assert usage["detail"].startswith("request failed: ConnectError")
    assert SHARED not in usage["detail"]


async def test_a_slow_provider_times_out_into_a_detail(fake_providers: FakeProviders) -> None:
    fake_providers.default = FakeAnswer(delay=0.6)
    provider = provider_for("GitHub")
    assert provider is not None
    async with httpx.AsyncClient(timeout=0.2) as client:
        found = await observe(provider, fake_providers.github, SHARED, client)
    assert found.detail == "no answer within 0.2s"
    assert found.remaining is None


def test_openai_durations() -> None:
    assert parse_duration("6m0s") == 360
    assert parse_duration("1.5s") == 1.5
    assert parse_duration("20ms") == 0.02
    assert parse_duration("1h2m3s") == 3723
    assert parse_duration("soon") is None
    assert parse_duration("5s later") is None


# -- the schedule ----------------------------------------------------------------------


class socket_closed:
    """A port of 127.0.0.1 that nothing listens on (bound, never listening)."""

    def __enter__(self) -> int:
        import socket

        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        port: int = self.sock.getsockname()[1]
        return port

    def __exit__(self, *_: object) -> None:
        self.sock.close()


async def _add_service(
    sessions: async_sessionmaker[AsyncSession], box: SecretBox, **values: Any
) -> int:
    from server.services import create_service

    async with sessions() as session, session.begin():
        row = await create_service(session, box, values)
        return row.id


async def _wait_for(check: Any, timeout: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + timeout
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "timed out"
        await asyncio.sleep(0.02)


async def test_schedule_runs_a_due_probe_once_across_two_runners(
    settings: Settings, fake_providers: FakeProviders
) -> None:
    """Two runners (each its own engine, as two processes) race for the due probes: each
    probe is run once; a service without probeIntervalSeconds is never probed."""
    engines = [create_engine(settings), create_engine(settings)]
    sessions = [create_sessionmaker(engine) for engine in engines]
    box = load_secret_box(settings)
    policy = {"probeIntervalSeconds": 3600}
    scheduled = [
        await _add_service(
            sessions[0],
            box,
            name=f"gh{n}",
            kind="github",
            baseUrl=fake_providers.github,
            envVar=f"GH{n}_TOKEN",
            token=f"{SHARED}{n}",
            rateLimitPolicy=policy,
        )
        for n in range(3)
    ]
    async with sessions[0]() as session, session.begin():  # as saved before probes existed
        await session.execute(
            update(Service).where(Service.id == scheduled[0]).values(next_probe_at=None)
        )
    await _add_service(
        sessions[0],
        box,
        name="never",
        kind="github",
        baseUrl=fake_providers.github,
        envVar="NEVER_TOKEN",
        token=OWN,
        rateLimitPolicy={"reserve": 5},
    )
    schedules = [ProbeSchedule(settings, s, box, Broker()) for s in sessions]
    try:
        await asyncio.gather(*(schedule.start() for schedule in schedules))
        await _wait_for(lambda: len(fake_providers.seen) >= 3)
        await asyncio.sleep(0.5)  # a second probe of the same service would land by now
        delays = await asyncio.gather(*(schedule.run_due() for schedule in schedules))
        await asyncio.sleep(0.2)
    finally:
        await asyncio.gather(*(schedule.stop() for schedule in schedules))
    assert sorted(fake_providers.authorizations()) == [f"Bearer {SHARED}{n}" for n in range(3)]
    assert all(3500 < delay <= RESCAN_SECONDS or delay == RESCAN_SECONDS for delay in delays)
    async with sessions[0]() as session:
        usage = list(await session.scalars(select(ServiceUsage)))
        due = dict((await session.execute(select(Service.name, Service.next_probe_at))).all())
    assert sorted(u.service_id for u in usage) == scheduled
    assert {u.source for u in usage} == {"probe"}
    assert due["never"] is None
    for n in range(3):
        next_probe = due[f"gh{n}"]
        assert next_probe is not None
        assert timedelta(seconds=3590) < next_probe - datetime.now(UTC) <= timedelta(seconds=3600)
    for engine in engines:
        await engine.dispose()


async def test_only_one_of_many_racing_takers_gets_a_due_probe(settings: Settings) -> None:
    engines = [create_engine(settings), create_engine(settings)]
    sessions = [create_sessionmaker(engine) for engine in engines]
    box = load_secret_box(settings)
    service_id = await _add_service(
        sessions[0],
        box,
        name="gh",
        kind="github",
        envVar="GH_TOKEN",
        rateLimitPolicy={"probeIntervalSeconds": 60},
    )
    now = datetime.now(UTC) + timedelta(seconds=1)

    async def take(maker: async_sessionmaker[AsyncSession]) -> bool:
        async with maker() as session, session.begin():
            return await take_due_probe(session, service_id, now)

    try:
        taken = await asyncio.gather(*(take(sessions[n % 2]) for n in range(8)))
    finally:
        for engine in engines:
            await engine.dispose()
    assert sorted(taken) == [False] * 7 + [True]


async def test_probe_service_is_audited(gql: GraphQLClient, fake_providers: FakeProviders) -> None:
    service_id = await service(gql, "github", fake_providers.github, token=SHARED)
    await gql(PROBE, id=service_id)
    data = await gql(
        """query($id: ID!) { auditEvents(objectId: $id, action: "probeService") {
        nodes { action outcome objectId } } }""",
        id=service_id,
    )
    assert data["auditEvents"]["nodes"] == [
        {"action": "probeService", "outcome": "ok", "objectId": service_id}
    ]


USAGE_PAGE = """{
  services { nodes { usage { remaining } usageHistory { profile { name } points { remaining } } } }
  profiles { nodes { services { usage { remaining sharedToken } } } }
}"""


@pytest.mark.parametrize("profiles", [2, 40])
async def test_usage_fields_cost_a_constant_number_of_statements(
    app: Starlette, gql: GraphQLClient, count_statements: StatementCounter, profiles: int
) -> None:
    services: AppServices = app.state.services
    box = services.secret_box
    async with services.sessionmaker() as session, session.begin():
        rows = [Service(name=f"s{n}", kind="github", env_var=f"S{n}_TOKEN") for n in range(2)]
        session.add_all(rows)
        people = [Profile(name=f"p{n:02d}") for n in range(profiles)]
        session.add_all(people)
        await session.flush()
        for n, person in enumerate(people):
            for row in rows:
                own = box.encrypt(f"tok{n}") if n % 2 else None
                session.add(
                    ProfileService(profile_id=person.id, service_id=row.id, token_encrypted=own)
                )
                session.add(ServiceUsage(service_id=row.id, profile_id=person.id, remaining=n))
        session.add_all(ServiceUsage(service_id=row.id, remaining=7) for row in rows)
    count_statements.statements.clear()
    data = await gql(USAGE_PAGE)
    links = [link["usage"] for p in data["profiles"]["nodes"] for link in p["services"]]
    assert {link["remaining"] for link in links if link["sharedToken"]} == {7}
    assert len(data["services"]["nodes"][0]["usageHistory"]) == profiles + 1
    selects = [s for s in count_statements.statements if s.lstrip().upper().startswith("SELECT")]
    # api token, services, usage, history, profiles, links, own usage (+ what auth costs)
    assert len(selects) <= 9, selects


async def _started(runner: asyncio.subprocess.Process) -> None:
    assert runner.stdout is not None
    said: list[bytes] = []
    while b"is running" not in (line := await runner.stdout.readline()):
        said.append(line)
        assert line, f"the runner stopped before it started (exit {runner.returncode}): {said}"


@pytest.mark.parametrize("backend", ["postgresql"], indirect=True)  # `corral runner` needs it
async def test_two_runner_processes_run_a_due_probe_once(
    settings: Settings, fake_providers: FakeProviders, tmp_path: Path
) -> None:
    """Two real `corral runner` processes, started together, find the same probe due; one
    runs it (takers at the same instant: test_only_one_of_many_racing_takers_gets_a_due_probe)."""
    engine = create_engine(settings)
    sessions = create_sessionmaker(engine)
    box = load_secret_box(settings)
    service_id = await _add_service(
        sessions, box, name="gh", kind="github", baseUrl=fake_providers.github,
        envVar="GH_TOKEN", token=SHARED, rateLimitPolicy={"probeIntervalSeconds": 3600},
    )  # fmt: skip
    runners = []
    try:
        for n in range(2):
            env = {
                **{k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")},
                "PYTHONPATH": str(ROOT),
                "CORRAL_DATABASE_URL": str(settings.database_url),
                "CORRAL_SECRET_KEY": TEST_KEY,
                "CORRAL_DATA_DIR": str(tmp_path / f"runner{n}"),
                "CORRAL_SANDBOX": "none",
            }
            runners.append(
                await asyncio.create_subprocess_exec(
                    *(sys.executable, "-m", "server.cli", "runner"),
                    env=env,
                    cwd=tmp_path,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                )
            )
        for runner in runners:
            await asyncio.wait_for(_started(runner), 20)
        await _wait_for(lambda: len(fake_providers.seen) >= 1, timeout=15)
        await asyncio.sleep(1.0)  # a second probe would have landed by now
        async with sessions() as session:
            usage = list(await session.scalars(select(ServiceUsage)))
    finally:
        for runner in runners:
            if runner.returncode is None:
                runner.terminate()
        for runner in runners:
            await asyncio.wait_for(runner.wait(), 20)
        await engine.dispose()
    assert fake_providers.authorizations() == [f"Bearer {SHARED}"]
    assert [(u.service_id, u.remaining, u.source) for u in usage] == [(service_id, 4999, "probe")]
    assert [runner.returncode for runner in runners] == [0, 0]
