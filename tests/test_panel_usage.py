"""The usage page (issue 13): each token's budget, reset, source and age, the invalid badge,
the policy in effect, a 24 h chart with its text, what the gate holds for it, and "Probe
now" for admins only (audited as probeService)."""

# The `admin` and `viewer` fixtures come from tests/test_panel.py.
# ruff: noqa: F811

from __future__ import annotations

import html
from datetime import timedelta

import httpx
from starlette.applications import Starlette

from server.models import utcnow
from tests.conftest import GraphQLClient
from tests.fixtures.commands import run, wait_status
from tests.fixtures.fake_providers import FakeProviders
from tests.test_gate import LINK, observe, pk, service
from tests.test_panel import admin, audit_of, post_form, viewer  # noqa: F401
from tests.test_panel_services import main_of
from tests.test_probes import service as probed_service

CANCEL = "mutation($id: ID!) { cancelCommand(id: $id) { userErrors { message } } }"
POLICY = {
    "budget": {"requests": 500, "windowSeconds": 3600},
    "reserve": 10,
    "concurrency": 2,
    "coolDownSeconds": 60,
}


async def held_by_the_gate(app: Starlette, gql: GraphQLClient) -> tuple[str, str, str]:
    """A github service (shared token nearly spent, its budget seen twice today), a profile
    `P` whose own token the provider refused, and a run the gate holds on the shared token:
    (service id, profile id, waiting run id)."""
    github = await service(gql, "github", POLICY)
    profile = await gql('mutation { createProfile(input: {name: "P"}) { profile { id } } }')
    profile_id = profile["createProfile"]["profile"]["id"]
    await gql(LINK, input={"profileId": profile_id, "serviceId": github, "token": "own-token"})
    now = utcnow()
    await observe(
        app,
        github,
        remaining=4000,
        limit=5000,
        source="probe",
        observed_at=now - timedelta(hours=2),
    )
    await observe(
        app,
        github,
        remaining=0,
        limit=5000,
        reset_at=now + timedelta(minutes=12, seconds=10),
        source="probe",
        observed_at=now,
    )
    await observe(
        app,
        github,
        profile_id,
        token_valid=False,
        detail="HTTP 401: Bad credentials",
        source="probe",
        observed_at=now,
    )
    waiting = await run(gql, commandString="true", serviceIds=[github])
    await wait_status(gql, waiting, {"WAITING"})
    return github, profile_id, waiting


async def test_the_usage_page_shows_each_token_and_what_waits_on_it(
    app: Starlette, gql: GraphQLClient, admin: httpx.AsyncClient, viewer: httpx.AsyncClient
) -> None:
    github, _profile_id, waiting = await held_by_the_gate(app, gql)
    page = await admin.get("/usage")
    assert page.status_code == 200
    text = html.unescape(main_of(page))
    shared, own = text.split('aria-label="github token (shared)"')[1].split(
        "aria-label=\"github token of profile 'P'\""
    )
    assert '<span class="usage-remaining">0</span> of 5,000' in shared
    assert "(in 12 min)" in shared
    assert "probe, now" in shared
    assert (
        "<title>github token (shared): remaining over the last 24 h. "
        "2 observations: from 4,000 to 0, lowest 0.</title>" in shared
    )
    assert "Last 24 h: 2 observations: from 4,000 to 0, lowest 0." in shared
    for words in (
        "budget 500 runs per 1 h",
        "reserve 10",
        "at most 2 running (per service)",
        "cool-down 1 min after a rate-limit answer",
    ):
        assert words in shared, words
    assert f'href="/runs/{pk(waiting)}"' in shared
    assert "github token (shared): 0 of 5,000 left (10 kept in reserve), resets" in shared
    assert '<span class="status status-failed">invalid</span>' in own
    assert "HTTP 401: Bad credentials" in own
    assert "Nothing waits on it." in own
    assert "Probe now" in text
    # The service's page links here; one service alone by its id.
    service_page = await admin.get(f"/services/{pk(github)}")
    assert f'href="/usage?service={pk(github)}"' in service_page.text
    alone = await admin.get(f"/usage?service={pk(github)}")
    assert "<h1>Usage of github</h1>" in alone.text
    for bad in ("abc", "999999"):
        assert (await admin.get(f"/usage?service={bad}")).status_code == 404
    # A viewer reads the page without the button, and a forged probe is refused and audited.
    seen = await viewer.get("/usage")
    assert seen.status_code == 200
    assert "Probe now" not in seen.text
    assert f'href="/runs/{pk(waiting)}"' in seen.text
    refused = await post_form(viewer, f"/usage/{pk(github)}/probe")
    assert refused.status_code == 403
    assert [event.outcome for event in await audit_of(app, "probeService")] == ["denied"]
    await gql(CANCEL, id=waiting)


async def test_probe_now_asks_the_provider_and_is_audited(
    app: Starlette, gql: GraphQLClient, admin: httpx.AsyncClient, fake_providers: FakeProviders
) -> None:
    service_id = pk(await probed_service(gql, "github", fake_providers.github, token="ghp_now"))
    answer = await post_form(admin, f"/usage/{service_id}/probe")
    assert answer.status_code == 303
    assert answer.headers["location"] == f"/usage?service={service_id}"
    page = html.unescape((await admin.get(answer.headers["location"])).text)
    assert "Probed: the provider's answers are below." in page
    assert '<span class="usage-remaining">4,999</span> of 5,000' in page
    assert [event.outcome for event in await audit_of(app, "probeService")] == ["ok"]
    # A service with no token to ask about: the reason, as a message on the page.
    bare = await service(gql, "bare")
    await gql(
        "mutation($input: UpdateServiceInput!) {"
        " updateService(input: $input) { userErrors { message } } }",
        input={"id": bare, "token": None, "kind": "github"},
    )
    refused = await post_form(admin, f"/usage/{pk(bare)}/probe")
    page = html.unescape((await admin.get(refused.headers["location"])).text)
    assert "Not probed: service 'bare' has no token to probe" in page
    assert (await post_form(admin, "/usage/999999/probe")).status_code == 404
