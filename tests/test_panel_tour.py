"""A tour of every panel page in real headless Chromium (issue #17): each page in the menu,
and the first object page each list links to, as an admin on a laptop and as a viewer on a
phone. Each page loads without a CSP violation or a console error, has a heading, labels
every input, and fits a phone's width; a screenshot of each (light and dark) is left in
test-artifacts/tour-<backend>/ for a person to look at."""

from __future__ import annotations

import json
from pathlib import Path

import httpx

from server.settings import Settings
from tests.conftest import GraphQLClient
from tests.fixtures.chromium import ROOT, browser_script, run_browser_script
from tests.fixtures.servers import running_server
from tests.test_login import PASSWORD, add_user
from tests.test_panel import add_run

TOUR_SCRIPT = browser_script(
    r"""
(async () => {
  const [base, chromiumPath, shots, mode] = process.argv.slice(2);
  const phone = mode === 'phone';
/*LAUNCH*/
  const found = { pages: {}, errors: [] };
  try {
    const page = await browser.newPage({
      viewport: phone ? { width: 390, height: 844 } : { width: 1280, height: 900 },
    });
    page.on('pageerror', (error) => found.errors.push(String(error)));
    page.on('console', (message) => {
      if (message.type() === 'error') found.errors.push(`${page.url()}: ${message.text()}`);
    });
    /*PAGE_HELPERS*/
    await logIn();
    const menu = await page.locator('nav[aria-label="Main"] a').evaluateAll(
      (links) => links.map((link) => link.getAttribute('href')));
    const visit = async (path) => {
      const response = await page.goto(`${base}${path}`);
      await page.waitForLoadState('networkidle');
      const report = await page.evaluate(() => {
        const unlabelled = [...document.querySelectorAll('input, select, textarea')]
          .filter((el) => el.type !== 'hidden' && el.type !== 'submit')
          .filter((el) => !(el.labels && el.labels.length) && !el.getAttribute('aria-label')
                          && !el.getAttribute('aria-labelledby'))
          .map((el) => el.outerHTML.slice(0, 120));
        return {
          heading: (document.querySelector('h1') || {}).textContent || null,
          unlabelled,
          overflow: document.documentElement.scrollWidth - window.innerWidth,
          // Forms that change something (a preview only reads).
          forms: document.querySelectorAll(
            'form[method="post"]:not([action="/logout"]):not([action$="/preview"])').length,
          links: [...document.querySelectorAll('main a[href]')].map((a) => a.getAttribute('href')),
        };
      });
      report.status = response.status();
      found.pages[path] = report;
      const name = (mode + path).replace(/[^a-z0-9]+/gi, '-').replace(/-$/, '');
      await shoot(name);
      return report;
    };
    for (const path of menu) {
      const report = await visit(path);
      if (path === '/') continue;
      // The first object page this list links to (not a filter or a page of the list).
      const detail = report.links.find((href) => href.startsWith(path + '/')
        && /^\/[a-z]+\/\d+$/.test(href));
      if (detail && !(detail in found.pages)) await visit(detail);
    }
    found.menu = menu;
    found.violations = await page.evaluate(() => window.__violations);
  /*END*/
"""
)

SEED = """
mutation Seed($profile: CreateProfileInput!, $service: CreateServiceInput!,
              $proxy: CreateProxyInput!, $template: CreateCommandTemplateInput!) {
  createProfile(input: $profile) { userErrors { message } }
  createService(input: $service) { userErrors { message } }
  createProxy(input: $proxy) { userErrors { message } }
  createCommandTemplate(input: $template) { userErrors { message } }
}
"""


async def test_every_page_in_chromium_as_admin_and_as_viewer_on_a_phone(
    settings: Settings, tmp_path: Path, backend: str
) -> None:
    script = tmp_path / "tour.cjs"
    script.write_text(TOUR_SCRIPT)
    shots = ROOT / "test-artifacts" / f"tour-{backend}"
    shots.mkdir(parents=True, exist_ok=True)
    async with running_server(settings) as live:
        await add_user(live.app, "grace", "admin")
        await add_user(live.app, "victor", "viewer")
        gql = GraphQLClient(httpx.AsyncClient(base_url=live.base_url, headers=live.headers))
        async with gql.http:
            seeded = await gql(
                SEED,
                profile={"name": "Tour profile", "tags": ["tour"]},
                service={"name": "GitHub", "envVar": "GITHUB_TOKEN", "token": "ghp_tour"},
                proxy={"name": "Tour proxy", "protocol": "socks5", "host": "127.0.0.1", "port": 1},
                template={
                    "name": "Tour template",
                    "template": "echo {{ params.who }}",
                    "parameters": [{"name": "who", "type": "string", "default": "tour"}],
                },
            )
        assert all(not payload["userErrors"] for payload in seeded.values()), seeded
        await add_run(live.app, "FAILED", lines=30, error="exit code 1")
        await add_run(live.app, "SUCCEEDED", lines=5)
        found = {
            mode: await run_browser_script(
                script,
                live.base_url,
                settings.chromium_path,
                str(shots),
                mode,
                user=user,
                password=PASSWORD,
                timeout=240,
            )
            for mode, user in (("laptop", "grace"), ("phone", "victor"))
        }
    (shots / "tour.json").write_text(json.dumps(found, indent=1))
    admin, viewer = found["laptop"], found["phone"]
    # The admin's menu has every page of the issue; the viewer's lacks the admin pages.
    pages = {"/", "/profiles", "/services", "/proxies", "/usage", "/templates", "/runs"}
    assert pages <= set(admin["menu"])
    assert {"/audit", "/tokens"} <= set(admin["menu"])
    assert not {"/audit", "/tokens"} & set(viewer["menu"])
    for mode, tour in found.items():
        assert tour["errors"] == [], (mode, tour["errors"])
        assert tour["violations"] == [], (mode, tour["violations"])
        for path, report in tour["pages"].items():
            where = f"{mode} {path}: {json.dumps(report)[:400]}"
            assert report["status"] == 200, where
            assert report["heading"], where
            assert report["unlabelled"] == [], where
            assert report["overflow"] <= 1, where
    # Object pages were reached from each list.
    for kind in ("profiles", "runs"):
        assert any(path.startswith(f"/{kind}/") for path in admin["pages"]), admin["pages"].keys()
    # A viewer is shown no form that changes anything.
    assert all(report["forms"] == 0 for report in viewer["pages"].values()), {
        path: report["forms"] for path, report in viewer["pages"].items()
    }


def test_stylesheet_blocks_are_balanced() -> None:
    """Each section of static/corral.css closes what it opens (an unclosed `@media {` hides
    every rule after it from wide screens; Chromium reports no error for it)."""
    css = (ROOT / "static" / "corral.css").read_text()
    depth = 0
    for number, line in enumerate(css.splitlines(), 1):
        depth += line.count("{") - line.count("}")
        assert depth >= 0, f"line {number} closes a block that was not opened"
        if line.startswith("/* ---"):
            assert depth == 0, f"line {number}: a section starts inside an open block"
    assert depth == 0
