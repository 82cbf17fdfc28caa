"""GraphQL over HTTP as standard clients expect it: negotiated response types (with 4xx for
request errors under application/graphql-response+json), 405 for a mutation over GET,
the token limit beside the depth/alias/size limits, introspection and GraphiQL switches,
GraphiQL served offline (and opened in real headless Chromium), security headers, and logs
that keep ERROR for Corral's own failures."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import logging
import re
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.types import Message, Receive, Scope, Send
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Origin, Subprotocol

from graphql_schema.relay import encode_id
from server import profiles as profile_service
from server.app import create_app
from server.auth import create_user
from server.graphql_http import (
    GRAPHIQL_SCRIPTS,
    GRAPHIQL_STYLES,
    GRAPHQL_RESPONSE_JSON,
    negotiate_media_type,
)
from server.headers import SecurityHeaders, content_security_policy
from server.settings import Settings
from tests.fixtures.auth import admin_client
from tests.fixtures.chromium import run_browser_script
from tests.fixtures.servers import running_server

ROOT = Path(__file__).resolve().parents[1]
PREFERRED = f"{GRAPHQL_RESPONSE_JSON}, application/json;q=0.9"
PROTOCOL = [Subprotocol("graphql-transport-ws")]
BROWSER = {"accept": "text/html,application/xhtml+xml,*/*;q=0.8"}
OK_QUERY = "{ profiles(first: 1) { totalCount } }"
SYNTAX_ERROR = "{ profiles(first: 1) { totalCount }"
UNKNOWN_FIELD = "{ profiles(first: 1) { noSuchField } }"
WRONG_VARIABLE = "query($n: Int) { profiles(first: $n) { totalCount } }"
BAD_CURSOR = '{ profiles(after: "zzz") { totalCount } }'
MUTATION = 'mutation { deleteProfile(id: "UHJvZmlsZTox") { userErrors { message } } }'
SUBSCRIPTION = 'subscription { commandLogs(commandId: "Q29tbWFuZDox") { seq } }'


async def post(
    client: httpx.AsyncClient, query: str, accept: str | None = PREFERRED, **variables: Any
) -> httpx.Response:
    headers = {} if accept is None else {"accept": accept}
    body = {"query": query, "variables": variables}
    return await client.post("/graphql", json=body, headers=headers)


@contextlib.asynccontextmanager
async def client_of(settings: Settings, **overrides: Any) -> AsyncIterator[httpx.AsyncClient]:
    """A client of an app built with `settings` changed by `overrides`, lifespan running."""
    app = create_app(settings.model_copy(update=overrides))
    async with app.router.lifespan_context(app), admin_client(app) as http:
        yield http


async def assert_healthy(client: httpx.AsyncClient) -> None:
    """A normal query still works (after a refused one)."""
    response = await post(client, OK_QUERY)
    assert response.status_code == 200, response.text
    assert response.json() == {"data": {"profiles": {"totalCount": 0}}}


# --- content negotiation -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("accept", "chosen"),
    [
        (None, "application/json"),
        ("", "application/json"),
        ("*/*", "application/json"),
        ("application/*", "application/json"),
        ("application/json", "application/json"),
        (PREFERRED, GRAPHQL_RESPONSE_JSON),
        (GRAPHQL_RESPONSE_JSON, GRAPHQL_RESPONSE_JSON),
        (f"{GRAPHQL_RESPONSE_JSON}, application/json", GRAPHQL_RESPONSE_JSON),
        (f"application/json, {GRAPHQL_RESPONSE_JSON};q=0.5", "application/json"),
        (f"{GRAPHQL_RESPONSE_JSON};q=0.5, */*", "application/json"),
        (f"text/html, {GRAPHQL_RESPONSE_JSON};q=0.1", GRAPHQL_RESPONSE_JSON),
        ("Application/JSON; charset=utf-8", "application/json"),
        ("text/plain", None),
        ("application/xml, text/html", None),
        ("application/json;q=0", None),
        ("application/json;q=zero", None),
        ("*/*;q=0", None),
    ],
)
def test_negotiate_media_type(accept: str | None, chosen: str | None) -> None:
    assert negotiate_media_type(accept) == chosen


async def test_graphql_response_json_when_the_client_prefers_it(
    client: httpx.AsyncClient,
) -> None:
    response = await post(client, OK_QUERY)
    assert response.status_code == 200
    assert response.headers["content-type"] == GRAPHQL_RESPONSE_JSON
    assert response.json() == {"data": {"profiles": {"totalCount": 0}}}


@pytest.mark.parametrize(
    ("query", "variables"),
    [(SYNTAX_ERROR, {}), (UNKNOWN_FIELD, {}), (WRONG_VARIABLE, {"n": "ten"})],
    ids=["syntax", "validation", "variables"],
)
async def test_request_error_is_400_without_data_in_graphql_response_json(
    client: httpx.AsyncClient, query: str, variables: dict[str, Any]
) -> None:
    response = await post(client, query, **variables)
    assert response.status_code == 400, response.text
    assert response.headers["content-type"] == GRAPHQL_RESPONSE_JSON
    body = response.json()
    assert "data" not in body
    assert body["errors"][0]["message"]


@pytest.mark.parametrize("accept", [None, "*/*", "application/json"])
@pytest.mark.parametrize(
    ("query", "variables"),
    [(SYNTAX_ERROR, {}), (UNKNOWN_FIELD, {}), (WRONG_VARIABLE, {"n": "ten"})],
    ids=["syntax", "validation", "variables"],
)
async def test_request_error_is_200_in_application_json(
    client: httpx.AsyncClient, accept: str | None, query: str, variables: dict[str, Any]
) -> None:
    response = await post(client, query, accept, **variables)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == "application/json"
    assert response.json()["data"] is None
    assert response.json()["errors"]


async def test_field_error_is_200_with_data_in_graphql_response_json(
    client: httpx.AsyncClient,
) -> None:
    """An error inside execution has a path: the request ran, so 200 with `data` (null here:
    the connection is non-null) per the spec."""
    response = await post(client, BAD_CURSOR)
    assert response.status_code == 200, response.text
    assert response.headers["content-type"] == GRAPHQL_RESPONSE_JSON
    body = response.json()
    assert body["data"] is None
    assert body["errors"][0]["path"] == ["profiles"]


@pytest.mark.parametrize("accept", ["text/plain", "application/xml", "application/json;q=0"])
async def test_accept_that_allows_neither_json_type_is_406(
    client: httpx.AsyncClient, accept: str
) -> None:
    response = await post(client, OK_QUERY, accept)
    assert response.status_code == 406
    assert GRAPHQL_RESPONSE_JSON in response.text
    query = await client.get("/graphql", params={"query": OK_QUERY}, headers={"accept": accept})
    assert query.status_code == 406


async def test_get_query_is_negotiated_too(client: httpx.AsyncClient) -> None:
    response = await client.get(
        "/graphql", params={"query": UNKNOWN_FIELD}, headers={"accept": PREFERRED}
    )
    assert response.status_code == 400
    assert response.headers["content-type"] == GRAPHQL_RESPONSE_JSON


# --- operations by method -------------------------------------------------------------------


@pytest.mark.parametrize("accept", [PREFERRED, "application/json"])
async def test_mutation_over_get_is_405_allow_post(client: httpx.AsyncClient, accept: str) -> None:
    response = await client.get("/graphql", params={"query": MUTATION}, headers={"accept": accept})
    assert response.status_code == 405, response.text
    assert response.headers["allow"] == "POST"
    assert "POST" in response.text


@pytest.mark.parametrize("method", ["GET", "POST"])
async def test_subscription_over_http_is_400_naming_the_websocket(
    client: httpx.AsyncClient, method: str
) -> None:
    if method == "GET":
        response = await client.get("/graphql", params={"query": SUBSCRIPTION})
    else:
        response = await post(client, SUBSCRIPTION)
    assert response.status_code == 400, response.text
    assert "WebSocket" in response.text
    assert "graphql-transport-ws" in response.text
    await assert_healthy(client)


# --- query limits ---------------------------------------------------------------------------


def nested(depth: int) -> str:
    """A query `depth` selections deep (profiles > edges > node > commands > ...)."""
    inner = "id"
    levels = 3
    while levels < depth:
        inner = f"commands(first: 1) {{ edges {{ node {{ profile {{ {inner} }} }} }} }}"
        levels += 4
    return f"{{ profiles(first: 1) {{ edges {{ node {{ {inner} }} }} }} }}"


async def test_depth_30_query_is_refused(client: httpx.AsyncClient) -> None:
    response = await post(client, nested(30))
    assert response.status_code == 400
    assert "exceeds maximum operation depth" in response.json()["errors"][0]["message"]
    await assert_healthy(client)


async def test_500_aliases_are_refused(client: httpx.AsyncClient) -> None:
    query = "{ " + " ".join(f"a{i}: __typename" for i in range(500)) + " }"
    response = await post(client, query)
    assert response.status_code == 400
    assert "500 aliases found" in response.json()["errors"][0]["message"]
    await assert_healthy(client)


async def test_aliases_hidden_in_fragments_are_counted(client: httpx.AsyncClient) -> None:
    """20 aliases in a fragment, spread twice (plus 2): 42 at run time, over the 30 allowed,
    though the document spells 22."""
    fragment = " ".join(f"f{i}: totalCount" for i in range(20))
    query = (
        "{ a: profiles(first: 1) { ...F } b: profiles(first: 1) { ...F } } "
        f"fragment F on ProfileConnection {{ {fragment} }}"
    )
    response = await post(client, query)
    assert response.status_code == 400
    assert "42 aliases found" in response.json()["errors"][0]["message"]
    await assert_healthy(client)


def token_flood(size: int) -> str:
    """A query of about `size` bytes, almost all of it tokens (2 bytes each)."""
    return "{ " + "__typename " * (size // 11) + "}"


async def test_query_of_more_tokens_than_the_limit_is_refused(
    client: httpx.AsyncClient,
) -> None:
    query = token_flood(30 * 1024)  # under the 32 KiB text limit: the token limit stops it
    response = await post(client, query)
    assert response.status_code == 400
    error = response.json()["errors"][0]
    assert error["extensions"] == {"code": "QUERY_TOO_LARGE", "limit": 2000}
    assert "more than 2000 tokens" in error["message"]
    await assert_healthy(client)


async def test_comments_count_as_tokens(
    client: httpx.AsyncClient,
) -> None:
    """Comments count: 3000 comment lines before a small query are refused too."""
    query = "#\n" * 3000 + OK_QUERY
    response = await post(client, query)
    assert response.status_code == 400
    assert response.json()["errors"][0]["extensions"]["code"] == "QUERY_TOO_LARGE"
    await assert_healthy(client)


async def test_one_megabyte_query_is_refused_by_default(client: httpx.AsyncClient) -> None:
    response = await post(client, token_flood(1024 * 1024))
    assert response.status_code == 413
    assert "CORRAL_MAX_REQUEST_BYTES" in response.text
    await assert_healthy(client)


async def test_one_megabyte_query_of_tokens_stops_at_the_token_limit(settings: Settings) -> None:
    """With byte limits far above a 1 MB query, the token limit is what stops it, early: it
    costs about what a query just over the limit costs (the same number of tokens parsed),
    not the 40x more a parse of the whole text would (times compared within this run)."""
    roomy = {"max_request_bytes": 4 * 1024 * 1024, "graphql_max_query_bytes": 2 * 1024 * 1024}
    async with client_of(settings, **roomy) as client:

        async def refused(size: int) -> float:
            started = time.monotonic()
            response = await post(client, token_flood(size))
            elapsed = time.monotonic() - started
            assert response.status_code == 400
            error = response.json()["errors"][0]["extensions"]
            assert error == {"code": "QUERY_TOO_LARGE", "limit": settings.graphql_max_tokens}
            return elapsed

        just_over = min([await refused(24 * 1024) for _ in range(3)])
        huge = min([await refused(1024 * 1024) for _ in range(3)])
        assert huge < 10 * just_over + 0.5, f"{huge:.2f} s vs {just_over:.2f} s: no early stop"
        await assert_healthy(client)


# --- introspection and GraphiQL switches ----------------------------------------------------

INTROSPECTION = "{ __schema { queryType { name } } }"


async def test_introspection_is_on_by_default(client: httpx.AsyncClient) -> None:
    response = await post(client, INTROSPECTION)
    assert response.json() == {"data": {"__schema": {"queryType": {"name": "Query"}}}}


@pytest.fixture
async def locked_client(settings: Settings) -> AsyncIterator[httpx.AsyncClient]:
    """A client of an app with introspection and GraphiQL off."""
    async with client_of(settings, graphql_introspection=False, graphiql=False) as http:
        yield http


async def test_introspection_off_is_a_clear_error(locked_client: httpx.AsyncClient) -> None:
    for query in (INTROSPECTION, '{ __type(name: "Profile") { name } }'):
        response = await post(locked_client, query)
        assert response.status_code == 400
        assert "introspection has been disabled" in response.json()["errors"][0]["message"]
    typename = await post(locked_client, "{ __typename }")
    assert typename.json() == {"data": {"__typename": "Query"}}
    await assert_healthy(locked_client)


async def test_graphiql_off_is_404(locked_client: httpx.AsyncClient) -> None:
    response = await locked_client.get("/graphql", headers=BROWSER)
    assert response.status_code == 404
    assert "GraphiQL" not in response.text


# --- GraphiQL served offline ----------------------------------------------------------------


def page_urls(html: str) -> list[str]:
    return re.findall(r'(?:src|href)="([^"]+)"', html)


async def test_graphiql_page_loads_only_local_files(client: httpx.AsyncClient) -> None:
    page = await client.get("/graphql", headers=BROWSER)
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    urls = page_urls(page.text)
    assert len(urls) >= 8, urls
    assert "<script>" not in page.text  # no inline script
    for url in urls:
        if url.startswith("data:"):
            continue
        assert url.startswith("/static/graphiql/"), url
        asset = await client.get(url)
        assert asset.status_code == 200, url
        kind = asset.headers["content-type"]
        if url.endswith(".js"):
            assert "javascript" in kind, (url, kind)
        else:
            assert kind.startswith("text/css"), (url, kind)


async def test_vendored_files_match_their_pinned_hashes(client: httpx.AsyncClient) -> None:
    """The copies are the very files Strawberry's template pins (the page's SRI checks them
    in the browser too)."""
    for asset in (*GRAPHIQL_STYLES, *GRAPHIQL_SCRIPTS):
        response = await client.get(f"/static/graphiql/{asset.name}")
        digest = base64.b64encode(hashlib.sha384(response.content).digest()).decode()
        assert asset.integrity == f"sha384-{digest}", asset.name


async def test_graphiql_from_the_cdn_is_pinned_with_sri(settings: Settings) -> None:
    async with client_of(settings, graphiql_cdn=True) as http:
        page = await http.get("/graphql", headers=BROWSER)
    scripts = re.findall(r"<script[^>]*>", page.text)
    links = re.findall(r"<link[^>]*stylesheet[^>]*>", page.text)
    cdn_tags = [tag for tag in scripts + links if "https://unpkg.com/" in tag]
    assert len(cdn_tags) == len(GRAPHIQL_SCRIPTS) + len(GRAPHIQL_STYLES)
    for tag in cdn_tags:
        assert re.search(r'integrity="sha384-[A-Za-z0-9+/=]{64}"', tag), tag
        assert re.search(r"@\d+\.\d+\.\d+/", tag), tag  # a pinned version
    csp = page.headers["content-security-policy"]
    assert "script-src 'self' https://unpkg.com" in csp


PASSWORD = "correct horse battery"
BROWSER_SCRIPT = r"""
const { chromium } = require(process.env.PLAYWRIGHT_CORE);
(async () => {
  const [url, chromiumPath, screenshot] = process.argv.slice(2);
  const origin = new URL(url).origin;
  const browser = await chromium.launch({
    executablePath: chromiumPath,
    args: ['--no-sandbox', '--disable-background-networking', '--disable-component-update',
           '--disable-sync', '--disable-gpu'],
  });
  const found = { errors: [], foreign: [], violations: [] };
  try {
    const page = await browser.newPage({ viewport: { width: 1400, height: 900 } });
    page.on('pageerror', (error) => found.errors.push(String(error)));
    page.on('console', (message) => {
      if (message.type() === 'error') found.errors.push(message.text());
    });
    page.on('response', (response) => {
      if (response.status() >= 400) found.errors.push(`${response.status()} ${response.url()}`);
    });
    page.on('request', (request) => {
      if (!request.url().startsWith(origin) && !request.url().startsWith('data:')) {
        found.foreign.push(request.url());
      }
    });
    await page.addInitScript(() => {
      window.__violations = [];
      document.addEventListener('securitypolicyviolation', (event) => {
        window.__violations.push(`${event.violatedDirective} ${event.blockedURI}`);
      });
    });
    // Not logged in: the browser is sent to the login page, and back after it. GraphiQL's
    // POSTs then ride on the session cookie, with the page's CSRF token in a header.
    await page.goto(`${url}?q=${encodeURIComponent('{ __typename }')}`);
    await page.locator('input[name="name"]').fill(process.env.CORRAL_USER);
    await page.locator('input[name="password"]').fill(process.env.CORRAL_PASSWORD);
    await page.locator('button[type="submit"]').click();
    await page.waitForURL((target) => target.pathname === '/graphql', { timeout: 20000 });
    await page.locator('.graphiql-query-editor .CodeMirror').waitFor({ timeout: 20000 });
    await page.locator('.graphiql-execute-button').click();
    await page.locator('.graphiql-response').getByText('"Query"').waitFor({ timeout: 20000 });
    // The schema arrived (introspection): the documentation lists the root types, and the
    // explorer plugin lists the query fields.
    await page.getByLabel('Show Documentation Explorer').click();
    await page.locator('.graphiql-doc-explorer').getByText('Query').first()
      .waitFor({ timeout: 20000 });
    found.docs = await page.locator('.graphiql-doc-explorer').innerText();
    await page.getByLabel('Show GraphiQL Explorer').click();
    await page.locator('.graphiql-explorer-root').getByText('profiles').first()
      .waitFor({ timeout: 20000 });
    await page.locator('.graphiql-explorer-root').getByText('profiles').first().click();
    found.body = await page.locator('body').innerText();
    found.response = await page.locator('.graphiql-response').innerText();
    found.violations = await page.evaluate(() => window.__violations);
    await page.screenshot({ path: screenshot });
  } finally {
    await browser.close();
  }
  console.log(JSON.stringify(found));
})().catch((error) => { console.error(error); process.exit(1); });
"""


async def test_graphiql_renders_offline_in_chromium(settings: Settings, tmp_path: Path) -> None:
    """Real headless Chromium, a real server: the login page first, then the editor renders
    (not "Loading..."), runs a query over the session (its CSRF token sent), loads nothing
    from another origin and breaks no CSP rule."""
    script = tmp_path / "graphiql.cjs"
    script.write_text(BROWSER_SCRIPT)
    shot = tmp_path / "graphiql.png"
    async with running_server(settings) as live:
        async with live.app.state.services.sessionmaker() as session:
            await create_user(session, "grace", PASSWORD)
            await session.commit()
        found = await run_browser_script(
            script,
            f"{live.base_url}/graphql",
            settings.chromium_path,
            str(shot),
            user="grace",
            password=PASSWORD,
        )
    assert "Loading..." not in found["body"]
    assert '"__typename": "Query"' in found["response"]
    assert "Mutation" in found["docs"]
    assert found["foreign"] == []
    assert found["violations"] == []
    assert found["errors"] == []
    assert shot.stat().st_size > 10_000


# --- security headers -----------------------------------------------------------------------


async def test_html_pages_carry_security_headers(client: httpx.AsyncClient) -> None:
    page = await client.get("/graphql", headers=BROWSER)
    csp = page.headers["content-security-policy"]
    directives = dict(part.strip().split(" ", 1) for part in csp.split(";"))
    assert directives["default-src"] == "'self'"
    assert directives["script-src"] == "'self'"  # no 'unsafe-inline', no other origin
    assert directives["frame-ancestors"] == "'none'"
    assert "unpkg" not in csp
    assert page.headers["referrer-policy"] == "no-referrer"
    assert page.headers["x-content-type-options"] == "nosniff"
    assert page.headers["x-frame-options"] == "DENY"


@pytest.mark.parametrize("path", ["/healthz", "/static/graphiql/graphiql.min.css", "/nowhere"])
async def test_every_response_is_nosniff(client: httpx.AsyncClient, path: str) -> None:
    response = await client.get(path)
    assert response.headers["x-content-type-options"] == "nosniff"
    assert "content-security-policy" not in response.headers  # not HTML


async def test_graphql_answers_are_nosniff(client: httpx.AsyncClient) -> None:
    for response in (await post(client, OK_QUERY), await post(client, SYNTAX_ERROR)):
        assert response.headers["x-content-type-options"] == "nosniff"


async def test_refusals_before_the_app_are_nosniff(client: httpx.AsyncClient) -> None:
    response = await client.get("/healthz", headers={"host": "evil.example"})
    assert response.status_code == 400
    assert response.headers["x-content-type-options"] == "nosniff"


async def test_headers_middleware_passes_a_stream_through_as_it_comes() -> None:
    """Pure ASGI: each body chunk goes out when the app sends it (SSE relies on that), not
    when the response ends, and a streamed HTML response gets the headers too."""
    release = asyncio.Event()
    sent: list[Message] = []

    async def streaming_app(scope: Scope, receive: Receive, send: Send) -> None:
        headers = [(b"content-type", b"text/html; charset=utf-8")]
        await send({"type": "http.response.start", "status": 200, "headers": headers})
        await send({"type": "http.response.body", "body": b"first", "more_body": True})
        await release.wait()
        await send({"type": "http.response.body", "body": b"", "more_body": False})

    first_chunk = asyncio.Event()

    async def collect(message: Message) -> None:
        sent.append(message)
        if message.get("body") == b"first":
            first_chunk.set()

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    app = SecurityHeaders(streaming_app, html_policy=content_security_policy())
    task = asyncio.create_task(app({"type": "http", "headers": []}, receive, collect))
    async with asyncio.timeout(5):
        await first_chunk.wait()
    assert sent[1]["body"] == b"first"
    names = {name for name, _ in sent[0]["headers"]}
    assert {b"content-security-policy", b"x-content-type-options"} <= names
    release.set()
    await task


# --- logs -----------------------------------------------------------------------------------


async def client_mistakes(client: httpx.AsyncClient) -> list[httpx.Response]:
    unknown = encode_id("Profile", 999_999)
    return [
        await post(client, SYNTAX_ERROR),
        await post(client, SYNTAX_ERROR, "application/json"),
        await post(client, UNKNOWN_FIELD),
        await post(client, WRONG_VARIABLE, n="ten"),
        await post(client, BAD_CURSOR),
        await post(client, "query($id: ID!) { node(id: $id) { id } }", id=unknown),
        await post(client, "query($id: ID!) { node(id: $id) { id } }", id="garbage"),
        await post(
            client,
            "mutation($id: ID!) { deleteProfile(id: $id) { userErrors { message } } }",
            id=unknown,
        ),
        await client.get("/graphql", params={"query": MUTATION}),
        await post(client, SUBSCRIPTION),
        await post(client, OK_QUERY, "text/plain"),
        await post(client, nested(30)),
        await post(client, token_flood(30 * 1024)),
        await client.post(
            "/graphql", content=b'{"query": ', headers={"content-type": "application/json"}
        ),
        await client.post(
            "/graphql", content=b'"a string"', headers={"content-type": "application/json"}
        ),
        await client.post("/graphql", content=b"query=1", headers={"content-type": "text/plain"}),
        await client.get("/healthz", headers={"host": "evil.example"}),
    ]


async def test_client_mistakes_are_logged_at_most_at_info_without_traceback(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    responses = await client_mistakes(client)
    assert all(response.status_code < 500 for response in responses)
    loud = [
        (record.name, record.levelname, record.getMessage()[:200])
        for record in caplog.records
        if record.levelno >= logging.WARNING or record.exc_info
    ]
    assert loud == []


async def test_internal_error_is_logged_at_error_with_traceback_and_masked(
    client: httpx.AsyncClient, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*_args: Any, **_kwargs: Any) -> Any:
        raise RuntimeError("the disk is on fire")

    monkeypatch.setattr(profile_service, "create_profile", broken)
    response = await post(
        client, 'mutation { createProfile(input: {name: "p"}) { userErrors { message } } }'
    )
    assert response.status_code == 200
    body = response.json()
    assert body["errors"][0]["message"] == "Unexpected error."
    assert "fire" not in response.text
    errors = [record for record in caplog.records if record.levelno >= logging.ERROR]
    assert len(errors) == 1
    message = errors[0].getMessage()
    assert "RuntimeError" in message
    assert "Traceback" in message
    assert "the disk is on fire" in message
    caplog.clear()  # expected: the autouse check fails a test on any ERROR record


async def test_denied_websocket_origin_is_logged_at_info(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    """A page on another site that opens the WebSocket is refused (403) - a client's doing,
    not the operator's problem: INFO at most (Strawberry says it at WARNING)."""
    caplog.set_level(logging.DEBUG)
    async with running_server(settings) as live:
        with pytest.raises(InvalidStatus) as refused:
            async with connect(
                live.ws_url, subprotocols=PROTOCOL, origin=Origin("http://evil.example")
            ):
                pass
        assert refused.value.response.status_code == 403
        async with httpx.AsyncClient(base_url=live.base_url, headers=live.headers) as http:
            await assert_healthy(http)
    loud = [
        (record.name, record.levelname, record.getMessage()[:200])
        for record in caplog.records
        if record.levelno >= logging.WARNING or record.exc_info
    ]
    assert loud == []
    assert any("evil.example" in record.getMessage() for record in caplog.records)
