"""The usage page (issue 13): each token's budget, reset, source and age, the invalid badge,
the policy in effect, a 24 h chart with its text, what the gate holds for it, and "Probe
now" for admins only (audited as probeService)."""

# The `admin` and `viewer` fixtures come from tests/test_panel.py.
# ruff: noqa: F811

from __future__ import annotations

import html
from datetime import timedelta
from pathlib import Path

import httpx
from starlette.applications import Starlette

from server.models import utcnow
from server.settings import Settings
from tests.conftest import GraphQLClient
from tests.fixtures.chromium import PAGE_HELPERS_JS, ROOT, run_browser_script
from tests.fixtures.commands import command, run, wait_status
from tests.fixtures.fake_providers import FakeProviders
from tests.fixtures.servers import running_server
from tests.test_gate import LINK, observe, pk, service
from tests.test_login import PASSWORD, add_user
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
        "budget 500 runs per 1\u00a0h",
        "reserve 10",
        "at most 2 running (per service)",
        "cool-down 1\u00a0min after a rate-limit answer",
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


WAIT_SCRIPT = r"""
const { chromium } = require(process.env.PLAYWRIGHT_CORE);
(async () => {
  const [base, chromiumPath, shots, runId, reason] = process.argv.slice(2);
  const browser = await chromium.launch({
    executablePath: chromiumPath,
    args: ['--no-sandbox', '--disable-background-networking', '--disable-component-update',
           '--disable-sync', '--disable-gpu'],
  });
  const found = { pages: {}, errors: [] };
  try {
    for (const width of [1280, 390]) {
      const page = await browser.newPage({ viewport: { width, height: 900 } });
      page.on('pageerror', (error) => found.errors.push(String(error)));
      page.on('console', (message) => {
        if (message.type() === 'error') found.errors.push(`${page.url()}: ${message.text()}`);
      });
      /*PAGE_HELPERS*/
      await page.goto(`${base}/login`);
      await page.locator('input[name="name"]').fill(process.env.CORRAL_USER);
      await page.locator('input[name="password"]').fill(process.env.CORRAL_PASSWORD);
      await page.locator('button[type="submit"]').click();
      await page.waitForURL((target) => target.pathname === '/', { timeout: 20000 });
      for (const path of [`/runs/${runId}`, '/', '/usage']) {
        await page.goto(`${base}${path}`);
        await page.waitForLoadState('networkidle');
        found.pages[`${width} ${path}`] = await page.evaluate(([reason, runId]) => ({
          shown: document.querySelector('main').innerText.includes(reason),
          linked: !!document.querySelector(`main a[href="/runs/${runId}"]`),
          charts: [...document.querySelectorAll('svg.usage-chart')].map(
            (svg) => [svg.getAttribute('role'), svg.querySelector('title')?.textContent]),
          overflow: document.documentElement.scrollWidth - window.innerWidth,
        }), [reason, runId]);
        await shoot(`usage-wait-${width}${path.replace(/[^a-z0-9]+/gi, '-')}`);
      }
      found.violations = (found.violations || []).concat(
        await page.evaluate(() => window.__violations));
      await page.close();
    }
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(found));
})().catch((error) => { console.error(error); process.exit(1); });
""".replace("/*PAGE_HELPERS*/", PAGE_HELPERS_JS)


async def test_the_wait_reason_shows_in_chromium_on_the_run_dashboard_and_usage_pages(
    settings: Settings, tmp_path: Path, backend: str
) -> None:
    script = tmp_path / "wait.cjs"
    script.write_text(WAIT_SCRIPT)
    shots = ROOT / "test-artifacts" / f"usage-{backend}"
    shots.mkdir(parents=True, exist_ok=True)
    async with running_server(settings) as live:
        await add_user(live.app, "grace", "admin")
        gql = GraphQLClient(httpx.AsyncClient(base_url=live.base_url, headers=live.headers))
        async with gql.http:
            _github, _profile, waiting = await held_by_the_gate(live.app, gql)
            reason = (await command(gql, waiting))["waitReason"]
            assert reason.startswith("github token (shared): 0 of 5,000 left")
            found = await run_browser_script(
                script,
                live.base_url,
                settings.chromium_path,
                str(shots),
                str(pk(waiting)),
                reason,
                user="grace",
                password=PASSWORD,
                timeout=120,
            )
            await gql(CANCEL, id=waiting)
    assert found["errors"] == []
    assert found["violations"] == []
    for where, report in found["pages"].items():
        assert report["shown"], where
        assert report["overflow"] <= 1, (where, report)
        if not where.endswith(f"/runs/{pk(waiting)}"):
            assert report["linked"], where
        if where.endswith("/usage"):
            assert [role for role, _title in report["charts"]] == ["img", "img"], where
            assert all(title.startswith("github token ") for _role, title in report["charts"])
