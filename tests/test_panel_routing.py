"""The proxy page's routing rule editor (issue 18): admins edit, add, reorder, delete and reset
rules in one form saved through setRoutingRules' domain function (audited alike); a bad
pattern is shown next to its rule with the input kept; viewers read the table only."""

from __future__ import annotations

import html
import re
from pathlib import Path

import httpx
from starlette.applications import Starlette

from server.settings import Settings
from tests.fixtures.chromium import ROOT, browser_script, run_browser_script
from tests.fixtures.servers import running_server
from tests.test_login import PASSWORD as LOGIN_PASSWORD
from tests.test_login import add_user
from tests.test_panel import admin, audit_of, viewer  # noqa: F401
from tests.test_panel_proxies import add_proxy, main_of, post, post_htmx, proxy_named
from xray.config import BACKGROUND_DOMAINS

DEFAULT = [
    {
        "domains": list(BACKGROUND_DOMAINS),
        "ips": [],
        "ports": None,
        "network": None,
        "action": "BLOCK",
        "via_proxy_id": None,
    }
]


def rule(**values: object) -> dict[str, object]:
    return {
        "domains": [],
        "ips": [],
        "ports": None,
        "network": None,
        "action": "PROXY",
        "via_proxy_id": None,
    } | values


def row(index: int, **values: str) -> dict[str, str]:
    """Form fields of rule row `index` (unset ones as the page leaves them: blank)."""
    fields = {"domains": "", "ips": "", "ports": "", "network": "", "action": "PROXY"}
    fields |= {"viaProxyId": ""} | values
    return {f"rules-{index}-{name}": value for name, value in fields.items()}


async def rules_of(app: Starlette, name: str) -> list[dict[str, object]]:
    proxy = await proxy_named(app, name)
    assert proxy is not None
    return list(proxy.routing_rules)


async def test_viewer_reads_the_table_and_admin_gets_the_editor(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
    viewer: httpx.AsyncClient,  # noqa: F811
) -> None:
    other = await add_proxy(app, "other")
    proxy_id = await add_proxy(app, "main", routing_rules=[rule(ports="443", action="BLOCK")])
    as_viewer = main_of(await viewer.get(f"/proxies/{proxy_id}"))
    assert "<li><code>1. port 443 → blocked</code></li>" in as_viewer
    assert 'id="routing-rules"' not in as_viewer
    page = main_of(await admin.get(f"/proxies/{proxy_id}"))
    form = page.split('id="routing-rules"')[1].split("</form>")[0]
    assert 'name="rules-0-ports" type="text" value="443"' in form
    assert 'name="rules-1-ports" type="text" value=""' in form  # the spare row
    assert "rules-2-" not in form
    # VIA offers the other saved proxies, not this one.
    via = form.split('name="rules-0-viaProxyId"')[1].split("</select>")[0]
    assert f'<option value="{other}">other</option>' in via
    assert f'value="{proxy_id}"' not in via
    # A forged post by a viewer changes nothing and is audited as denied.
    refused = await post(viewer, f"/proxies/{proxy_id}/routing", op="reset")
    assert refused.status_code == 403
    assert await rules_of(app, "main") == [rule(ports="443", action="BLOCK")]
    events = await audit_of(app, "setRoutingRules")
    assert [(event.outcome, event.actor) for event in events] == [("denied", "victor")]


async def test_save_add_reorder_delete_and_reset(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
) -> None:
    other = await add_proxy(app, "other")
    proxy_id = await add_proxy(app, "main", routing_rules=[rule(ports="443", action="BLOCK")])
    path = f"/proxies/{proxy_id}/routing"
    edited = row(0, ports="8443", network="tcp", action="DIRECT")
    added = row(1, domains=" full:a.test \n\ndomain:b.test", action="VIA", viaProxyId=str(other))
    saved = await post(admin, path, op="save", **edited, **added)
    assert saved.status_code == 303
    assert saved.headers["location"] == f"/proxies/{proxy_id}#routing"
    first = rule(ports="8443", network="tcp", action="DIRECT")
    second = rule(domains=["full:a.test", "domain:b.test"], action="VIA", via_proxy_id=other)
    assert await rules_of(app, "main") == [first, second]
    page = html.unescape((await admin.get(f"/proxies/{proxy_id}")).text)
    assert "Routing rules of main saved." in page
    assert "1. port 8443, network tcp → direct" in page
    assert "2. full:a.test, domain:b.test → via proxy 'other'" in page
    # A row's VIA choice is ignored unless its action is VIA; blank rows are dropped.
    stray = row(1, domains="full:a.test", action="BLOCK", viaProxyId=str(other))
    await post(admin, path, op="save", **row(0, ports="8443"), **stray, **row(2))
    assert await rules_of(app, "main") == [
        rule(ports="8443"),
        rule(domains=["full:a.test"], action="BLOCK"),
    ]
    both = {**row(0, ports="8443"), **row(1, domains="full:a.test", action="BLOCK")}
    # Up on the second row swaps them (with the edits in the form saved too).
    await post(admin, path, op="up-1", **both, **row(2))
    assert await rules_of(app, "main") == [
        rule(domains=["full:a.test"], action="BLOCK"),
        rule(ports="8443"),
    ]
    swapped = {**row(0, domains="full:a.test", action="BLOCK"), **row(1, ports="8443")}
    await post(admin, path, op="down-0", **swapped)
    assert await rules_of(app, "main") == [
        rule(ports="8443"),
        rule(domains=["full:a.test"], action="BLOCK"),
    ]
    deleted = await post(admin, path, op="delete-0", **both)
    assert "rule%201%20deleted" in deleted.headers["set-cookie"]
    assert await rules_of(app, "main") == [rule(domains=["full:a.test"], action="BLOCK")]
    await post(admin, path, op="reset", **both)
    assert await rules_of(app, "main") == DEFAULT
    events = await audit_of(app, "setRoutingRules")
    assert [(event.outcome, event.object_type) for event in events] == [("ok", "Proxy")] * 6
    assert (await post(admin, "/proxies/999999/routing", op="reset")).status_code == 404


async def test_a_bad_pattern_is_shown_next_to_its_rule_with_the_input_kept(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
) -> None:
    proxy_id = await add_proxy(app, "main", routing_rules=[rule(ports="443", action="BLOCK")])
    path = f"/proxies/{proxy_id}/routing"
    fields = {
        **row(0, ports="443", action="BLOCK"),
        **row(1, domains="full:ok.test\nregexp:a(b", ips="10.0.0.0/8, 300.1.1.1"),
    }
    for htmx in (False, True):
        answer = await (post_htmx if htmx else post)(admin, path, op="save", **fields)
        assert answer.status_code == 422
        text = html.unescape(answer.text)
        if htmx:
            assert text.lstrip().startswith('<form id="routing-rules"')
        form = text.split('id="routing-rules"')[1]
        second = form.split('id="rule-1"')[1].split("</fieldset>")[0]
        assert "'regexp:a(b' is not a valid regular expression" in second
        assert "'300.1.1.1' is not an IP address" in second
        assert re.search(r'id="rules-1-domains-error"[^>]*>', second)
        assert ">full:ok.test\nregexp:a(b</textarea>" in second
        assert 'aria-describedby="rules-1-domains-error "' in second
        assert "error" not in form.split('id="rule-0"')[1].split("</fieldset>")[0]
    assert await rules_of(app, "main") == [rule(ports="443", action="BLOCK")]
    # What only the binary refuses (RE2 has no lookahead) is the form's own message.
    lookahead = await post(admin, path, op="save", **row(0, domains="regexp:(?=x)y"))
    assert lookahead.status_code == 422
    assert "v2ray refuses these rules" in html.unescape(lookahead.text)
    assert ">regexp:(?=x)y</textarea>" in html.unescape(lookahead.text)
    # A VIA rule with no proxy chosen says so next to its select.
    via = await post(admin, path, op="save", **row(0, ports="1", action="VIA"))
    assert 'id="rules-0-viaProxyId-error"' in via.text
    events = await audit_of(app, "setRoutingRules")
    assert [event.outcome for event in events] == ["error"] * 4
    success = await post_htmx(admin, path, op="save", **row(0, domains="regexp:^a+b$"))
    assert success.headers["hx-redirect"] == f"/proxies/{proxy_id}"  # a load, not a scroll
    assert await rules_of(app, "main") == [rule(domains=["regexp:^a+b$"])]


async def test_the_composer_preview_shows_the_runs_routing_table(
    app: Starlette,
    viewer: httpx.AsyncClient,  # noqa: F811
) -> None:
    other = await add_proxy(app, "other")
    rules = [rule(ips=["127.0.0.2"], action="VIA", via_proxy_id=other), rule(ports="25")]
    proxy_id = await add_proxy(app, "main", routing_rules=rules)
    fields = {"commandString": "echo hi", "proxy": str(proxy_id)}
    preview = html.unescape((await post(viewer, "/compose/preview", **fields)).text)
    table = preview.split('id="preview-routing"')[1].split("</ul>")[0]
    assert re.findall(r"<code>(.*?)</code>", table) == [
        "1. 127.0.0.2 → via proxy 'other'",
        "2. port 25 → proxy 'main'",
        "everything else → proxy 'main'",
    ]
    direct = await post(viewer, "/compose/preview", commandString="echo hi")
    assert 'id="preview-routing"' not in direct.text  # no proxy: no table


# --- in real headless Chromium ---------------------------------------------------------

EDITOR_SCRIPT = browser_script(
    r"""
(async () => {
  const [base, chromiumPath, shots, path] = process.argv.slice(2);
/*LAUNCH*/
  const found = { errors: [], violations: [], overflow: {} };
  try {
    const page = await browser.newPage({ viewport: { width: 1280, height: 900 } });
    page.on('pageerror', (error) => found.errors.push(String(error)));
    page.on('console', (message) => {
      // Chromium logs every 4xx; a refused save answers 422 by design.
      if (message.type() === 'error' && !message.text().includes('status of 422')) {
        found.errors.push(message.text());
      }
    });
    /*PAGE_HELPERS*/
    const overflow = () => page.evaluate(
      () => document.documentElement.scrollWidth - window.innerWidth);
    await logIn(path);
    found.before = await page.locator('#routing-table').innerText();

    const domains = page.locator('#rules-0-domains');
    await domains.fill('regexp:a(b');
    await page.getByRole('button', { name: 'Save rules' }).click();
    await page.locator('#rules-0-domains-error').waitFor({ timeout: 20000 });
    found.refusal = await page.locator('#rules-0-domains-error').innerText();
    found.kept = await domains.inputValue();
    found.invalid = await domains.getAttribute('aria-invalid');
    found.unchanged = await page.locator('#routing-table').innerText();
    await shoot('routing-refused');

    await domains.fill('regexp:^ads[0-9]+\\.example$\nfull:tracker.test');
    await page.locator('#rules-0-action').selectOption('BLOCK');
    await page.locator('#rules-1-ports').fill('8443');
    await page.locator('#rules-1-action').selectOption('VIA');
    await page.locator('#rules-1-viaProxyId').selectOption({ label: 'other hop' });
    await page.getByRole('button', { name: 'Save rules' }).click();
    await page.locator('.flash').waitFor({ timeout: 20000 });
    found.flash = await page.locator('.flash').innerText();
    found.after = await page.locator('#routing-table').innerText();
    found.overflow.laptop = await overflow();
    await shoot('routing-saved');
    found.violations.push(...await page.evaluate(() => window.__violations));

    await page.setViewportSize({ width: 390, height: 844 });
    await page.goto(`${base}${path}`);
    found.overflow.phone = await overflow();
    await shoot('routing-phone');
    found.violations.push(...await page.evaluate(() => window.__violations));
  /*END*/
"""
)


async def test_edit_a_rule_in_chromium(settings: Settings, tmp_path: Path, backend: str) -> None:
    """A malformed regexp is refused next to its rule with the input kept and the table
    unchanged; a good rule (and a VIA rule added in the spare row) saves and the table
    shows it; no overflow on a laptop or a phone. Screenshots in test-artifacts/."""
    script = tmp_path / "routing.cjs"
    script.write_text(EDITOR_SCRIPT)
    shots = ROOT / "test-artifacts" / backend
    shots.mkdir(parents=True, exist_ok=True)
    async with running_server(settings) as live:
        await add_user(live.app, "grace", "admin")
        other_hop_id = await add_proxy(live.app, "other hop")
        proxy_id = await add_proxy(live.app, "main", routing_rules=DEFAULT)
        found = await run_browser_script(
            script,
            live.base_url,
            settings.chromium_path,
            str(shots),
            f"/proxies/{proxy_id}",
            user="grace",
            password=LOGIN_PASSWORD,
            timeout=120,
        )
        assert await rules_of(live.app, "main") == [
            rule(domains=["regexp:^ads[0-9]+\\.example$", "full:tracker.test"], action="BLOCK"),
            rule(ports="8443", action="VIA", via_proxy_id=other_hop_id),
        ]
    assert found["before"].startswith("1. domain:accounts.google.com")
    assert found["refusal"].startswith("'regexp:a(b' is not a valid regular expression")
    assert found["kept"] == "regexp:a(b"
    assert found["invalid"] == "true"
    assert found["unchanged"] == found["before"]
    assert found["flash"].endswith("Routing rules of main saved.")
    assert found["after"].splitlines() == [
        "1. regexp:^ads[0-9]+\\.example$, full:tracker.test → blocked",
        "2. port 8443 → via proxy 'other hop'",
        "everything else → proxy 'main'",
    ]
    assert found["overflow"] == {"laptop": 0, "phone": 0}
    assert found["violations"] == []
    assert found["errors"] == []
