"""The login page, panel sessions (cookie, rotation, expiry), open redirects, the login rate
limit, and CSRF protection of cookie-authenticated requests."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import func, select, update
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import PlainTextResponse
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from server.access import PRINCIPAL_SCOPE_KEY, SESSION_COOKIE
from server.auth import Principal, create_user
from server.csrf import CsrfProtection
from server.models import AuditEvent, Role, UserSession, utcnow
from server.ratelimit import Attempt, LoginLimiter
from tests.fixtures.auth import admin_headers
from tests.fixtures.chromium import ROOT

PASSWORD = "correct horse battery"
CREATE_PROFILE = 'mutation { createProfile(input: {name: "via-cookie"}) { profile { name } } }'


async def add_user(app: Starlette, name: str = "alice", role: str = "admin") -> None:
    async with app.state.services.sessionmaker() as session:
        await create_user(session, name, PASSWORD, role)
        await session.commit()


def browser_for(
    app: Starlette, base_url: str = "http://localhost", address: str = "127.0.0.1"
) -> httpx.AsyncClient:
    """A client with no API token (a browser: it keeps cookies)."""
    transport = httpx.ASGITransport(app=app, client=(address, 40000))
    return httpx.AsyncClient(transport=transport, base_url=base_url)


@pytest.fixture
async def browser(app: Starlette) -> AsyncIterator[httpx.AsyncClient]:
    await add_user(app)
    async with browser_for(app) as http:
        yield http


async def log_in(
    http: httpx.AsyncClient, name: str = "alice", password: str = PASSWORD, **extra: str
) -> httpx.Response:
    """Fill in and send the login form as a browser would."""
    page = await http.get("/login")
    assert page.status_code == 200
    match = re.search(r'name="login_token" value="([^"]+)"', page.text)
    assert match is not None, page.text
    form = {"login_token": match.group(1), "name": name, "password": password, **extra}
    return await http.post("/login", data=form)


async def csrf_token_of(http: httpx.AsyncClient) -> str:
    page = await http.get("/")
    assert page.status_code == 200, page.text
    match = re.search(r'<meta name="csrf-token" content="([^"]+)">', page.text)
    assert match is not None, page.text
    return match.group(1)


def session_cookie_header(response: httpx.Response) -> str:
    headers = [h for h in response.headers.get_list("set-cookie") if h.startswith(SESSION_COOKIE)]
    assert len(headers) == 1, response.headers
    return headers[0]


async def audit_events(app: Starlette, action: str) -> list[AuditEvent]:
    async with app.state.services.sessionmaker() as session:
        rows = await session.scalars(
            select(AuditEvent).where(AuditEvent.action == action).order_by(AuditEvent.id)
        )
        return list(rows)


async def session_count(app: Starlette) -> int:
    async with app.state.services.sessionmaker() as session:
        return int(await session.scalar(select(func.count()).select_from(UserSession)) or 0)


HTML = {"accept": "text/html"}


# --- login and logout ----------------------------------------------------------------


async def test_login_sets_a_session_cookie_and_logout_ends_it(
    app: Starlette, browser: httpx.AsyncClient
) -> None:
    response = await log_in(browser)
    assert response.status_code == 303
    assert response.headers["location"] == "/"
    cookie = session_cookie_header(response)
    attributes = [part.strip().lower() for part in cookie.split(";")]
    assert "httponly" in attributes
    assert "samesite=lax" in attributes
    assert "path=/" in attributes
    assert f"max-age={int(app.state.services.settings.session_max_seconds)}" in attributes
    assert "secure" not in attributes  # plain http: a Secure cookie would never come back

    home = await browser.get("/")
    assert home.status_code == 200
    assert "alice (admin)" in home.text
    [login] = await audit_events(app, "login")
    assert (login.actor, login.actor_kind, login.outcome) == ("alice", "user", "ok")
    assert login.session_id is not None

    stale = browser.cookies[SESSION_COOKIE]
    token = await csrf_token_of(browser)
    out = await browser.post("/logout", data={"csrf_token": token})
    assert out.status_code == 303
    assert out.headers["location"] == "/login"
    assert 'corral_session=""' in session_cookie_header(out) or "max-age=0" in (
        session_cookie_header(out).lower()
    )
    assert await session_count(app) == 0
    [logout] = await audit_events(app, "logout")
    assert (logout.actor, logout.outcome) == ("alice", "ok")

    # The old cookie is worth nothing now, even if the browser kept it.
    async with browser_for(app) as replayed:
        replayed.cookies.set(SESSION_COOKIE, stale)
        again = await replayed.get("/", headers=HTML)
        assert again.status_code == 303
        assert again.headers["location"] == "/login?next=%2F"
        api = await replayed.post("/graphql", json={"query": "{ __typename }"})
        assert api.status_code == 401


async def test_session_cookie_is_secure_over_https(app: Starlette) -> None:
    await add_user(app)
    async with browser_for(app, base_url="https://localhost") as http:
        response = await log_in(http)
        assert response.status_code == 303
        attributes = [part.strip().lower() for part in session_cookie_header(response).split(";")]
        assert "secure" in attributes
        assert (await http.get("/")).status_code == 200


async def test_wrong_password_and_unknown_name_get_the_same_answer(
    app: Starlette, browser: httpx.AsyncClient
) -> None:
    wrong = await log_in(browser, password="not the password")
    unknown = await log_in(browser, name="mallory", password="not the password")
    for response in (wrong, unknown):
        assert response.status_code == 401
        assert "wrong name or password" in response.text
        assert "not the password" not in response.text
        assert SESSION_COOKIE not in response.headers.get("set-cookie", "")
    events = await audit_events(app, "login")
    assert [(e.actor, e.outcome, e.detail) for e in events] == [
        ("alice", "error", {"reason": "wrong-password"}),
        (None, "error", {"reason": "wrong-password"}),  # no user's name: may be a password
    ]
    assert all(e.actor_kind == "anonymous" for e in events)


async def test_login_form_needs_its_own_token(app: Starlette, browser: httpx.AsyncClient) -> None:
    # A page elsewhere posting the form (login CSRF) has neither the cookie nor the field.
    forged = await browser.post("/login", data={"name": "alice", "password": PASSWORD})
    assert forged.status_code == 403
    assert SESSION_COOKIE not in browser.cookies
    await browser.get("/login")  # the browser now has a login cookie, but not its value
    guessed = await browser.post(
        "/login", data={"name": "alice", "password": PASSWORD, "login_token": "guess"}
    )
    assert guessed.status_code == 403
    assert "expired" in guessed.text
    assert await session_count(app) == 0


async def test_login_rotates_the_session_id(app: Starlette, browser: httpx.AsyncClient) -> None:
    assert (await log_in(browser)).status_code == 303
    first = browser.cookies[SESSION_COOKIE]
    assert (await log_in(browser)).status_code == 303  # the browser presents `first`
    second = browser.cookies[SESSION_COOKIE]
    assert second != first
    assert await session_count(app) == 1
    assert (await browser.get("/")).status_code == 200
    async with browser_for(app) as old:
        old.cookies.set(SESSION_COOKIE, first)
        assert (await old.get("/")).status_code == 401


@pytest.mark.parametrize("which", ["idle", "absolute"])
async def test_sessions_expire(app: Starlette, browser: httpx.AsyncClient, which: str) -> None:
    assert (await log_in(browser)).status_code == 303
    assert (await browser.get("/")).status_code == 200
    settings = app.state.services.settings
    now = utcnow()
    moved: dict[str, Any] = (
        {"last_seen_at": now - timedelta(seconds=settings.session_idle_seconds + 60)}
        if which == "idle"
        else {  # in use a minute ago, but begun longer ago than the longest session
            "created_at": now - timedelta(seconds=settings.session_max_seconds + 60),
            "last_seen_at": now - timedelta(seconds=60),
        }
    )
    async with app.state.services.sessionmaker() as session:
        await session.execute(update(UserSession).values(**moved))
        await session.commit()
    expired = await browser.get("/", headers=HTML)
    assert expired.status_code == 303
    assert expired.headers["location"].startswith("/login")
    assert await session_count(app) == 0


async def test_session_is_used_again_within_its_limits(
    app: Starlette, browser: httpx.AsyncClient
) -> None:
    assert (await log_in(browser)).status_code == 303
    settings = app.state.services.settings
    async with app.state.services.sessionmaker() as session:
        recent = utcnow() - timedelta(seconds=settings.session_idle_seconds - 60)
        await session.execute(update(UserSession).values(last_seen_at=recent))
        await session.commit()
    assert (await browser.get("/")).status_code == 200


@pytest.mark.parametrize(
    "target",
    [
        "//evil.example",
        "https://evil.example",
        "/\\evil.example",
        "\\\\evil.example",
        "/\t/evil.example",
        "http:/evil.example",
        "evil.example",
        "",
    ],
)
async def test_login_never_redirects_off_site(browser: httpx.AsyncClient, target: str) -> None:
    response = await log_in(browser, next=target)
    assert response.status_code == 303
    assert response.headers["location"] == "/"


async def test_login_returns_to_a_local_next(app: Starlette) -> None:
    await add_user(app)
    async with browser_for(app) as http:
        page = await http.get("/graphql", headers=HTML)  # sent to the login page, and back
        assert page.status_code == 303
        login_page = await http.get(page.headers["location"])
        assert 'name="next" value="/graphql"' in login_page.text
        response = await log_in(http, next="/commands?status=RUNNING")
        assert response.headers["location"] == "/commands?status=RUNNING"


# --- rate limit ------------------------------------------------------------------------


async def test_sixth_bad_password_in_a_minute_is_refused_unchecked(
    app: Starlette, browser: httpx.AsyncClient
) -> None:
    for _ in range(5):
        assert (await log_in(browser, password="wrong password")).status_code == 401
    # The right password now is refused too: it is not even checked.
    refused = await log_in(browser)
    assert refused.status_code == 429
    assert re.search(r"try again in \d+ seconds", refused.text)
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    assert SESSION_COOKIE not in browser.cookies
    events = await audit_events(app, "login")
    assert [e.detail for e in events][-1] == {"reason": "rate-limited"}
    assert "wrong password" not in repr([e.detail for e in events])
    # The name is blocked from any address.
    async with browser_for(app, address="10.9.9.9") as elsewhere:
        assert (await log_in(elsewhere)).status_code == 429


async def test_bad_passwords_from_one_address_block_every_name(
    app: Starlette, browser: httpx.AsyncClient
) -> None:
    await add_user(app, "bob")
    for name in ("x1", "x2", "x3", "x4"):
        assert (await log_in(browser, name=name, password="nope nope")).status_code == 401
    # bob's success does not wipe the address's failures for other names...
    async with browser_for(app) as bob:
        assert (await log_in(bob, name="bob")).status_code == 303
    assert (await log_in(browser, name="x5", password="nope nope")).status_code == 401
    # ...so the address is now at its limit, for every name.
    assert (await log_in(browser)).status_code == 429
    async with browser_for(app, address="10.1.1.1") as other:
        assert (await log_in(other)).status_code == 303


def test_limiter_window_passes_and_memory_stays_bounded() -> None:
    now = [1000.0]
    limiter = LoginLimiter(2, 60, max_keys=100, clock=lambda: now[0])
    assert isinstance(limiter.begin("alice", "a1"), Attempt)
    assert isinstance(limiter.begin("alice", "a2"), Attempt)
    assert limiter.begin("alice", "a3") == 60
    now[0] += 30
    assert limiter.begin("ALICE ", "a3") == 30  # one name, however it is typed
    now[0] += 30.5
    attempt = limiter.begin("alice", "a3")
    assert isinstance(attempt, Attempt)
    limiter.succeeded(attempt)
    assert isinstance(limiter.begin("alice", "a3"), Attempt)
    for number in range(10_000):  # a flood of made-up names from made-up addresses
        limiter.begin(f"name-{number}", f"10.0.{number // 256}.{number % 256}")
    assert len(limiter.names) <= 100
    assert len(limiter.addresses) <= 100


# --- CSRF ------------------------------------------------------------------------------


async def test_cookie_graphql_post_needs_the_csrf_header(
    app: Starlette, browser: httpx.AsyncClient
) -> None:
    assert (await log_in(browser)).status_code == 303
    body = {"query": CREATE_PROFILE}
    missing = await browser.post("/graphql", json=body)
    assert missing.status_code == 403
    assert missing.json()["errors"][0]["extensions"]["code"] == "CSRF"
    wrong = await browser.post("/graphql", json=body, headers={"X-CSRF-Token": "x" * 43})
    assert wrong.status_code == 403
    token = await csrf_token_of(browser)
    assert token not in missing.text + wrong.text
    ok = await browser.post("/graphql", json=body, headers={"X-CSRF-Token": token})
    assert ok.status_code == 200, ok.text
    assert ok.json()["data"]["createProfile"]["profile"] == {"name": "via-cookie"}


async def test_bearer_requests_need_no_csrf_token(client: httpx.AsyncClient) -> None:
    response = await client.post("/graphql", json={"query": CREATE_PROFILE})
    assert response.status_code == 200
    assert response.json()["data"]["createProfile"]["profile"] == {"name": "via-cookie"}


async def test_cookie_form_post_needs_the_csrf_field(
    app: Starlette, browser: httpx.AsyncClient
) -> None:
    assert (await log_in(browser)).status_code == 303
    refused = await browser.post("/logout", data={"csrf_token": "forged"}, headers=HTML)
    assert refused.status_code == 403
    assert refused.headers["content-type"].startswith("text/html")
    assert "reload the page" in refused.text
    plain = await browser.post("/logout")
    assert plain.status_code == 403
    assert plain.headers["content-type"].startswith("text/plain")
    multipart = await browser.post("/logout", files={"csrf_token": ("t", b"x")})
    assert multipart.status_code == 403
    assert await session_count(app) == 1  # still logged in
    token = await csrf_token_of(browser)
    assert (await browser.post("/logout", data={"csrf_token": token})).status_code == 303
    assert await session_count(app) == 0


async def test_pages_carry_the_csrf_token_only_with_a_session(
    app: Starlette, browser: httpx.AsyncClient
) -> None:
    anonymous = await browser.get("/login")
    assert anonymous.headers["cache-control"] == "no-store"
    assert "csrf-token" not in anonymous.text
    assert "hx-headers" not in anonymous.text
    assert (await log_in(browser)).status_code == 303
    token = await csrf_token_of(browser)
    home = await browser.get("/")
    assert f'hx-headers=\'{{"X-CSRF-Token": "{token}"}}\'' in home.text
    assert f'name="csrf_token" value="{token}"' in home.text  # the logout form
    # An API client with a token sees no session token in a page.
    api_page = await browser.get("/", headers=admin_headers(app))
    assert "csrf-token" not in api_page.text


async def test_csrf_form_body_is_replayed_to_the_route() -> None:
    """The middleware reads a urlencoded body to find the field; the route still gets it."""

    async def echo(request: Request) -> PlainTextResponse:
        return PlainTextResponse((await request.body()).decode())

    user = Principal(kind="user", name="u", role=Role.ADMIN, session_id=1, csrf_token="t0k3n")

    def as_user(app: Any) -> Any:
        async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
            scope[PRINCIPAL_SCOPE_KEY] = user
            await app(scope, receive, send)

        return wrapped

    inner = Starlette(routes=[Route("/echo", echo, methods=["POST"])])
    stack = as_user(CsrfProtection(inner))
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=stack), base_url="http://localhost"
    ) as http:
        ok = await http.post("/echo", data={"csrf_token": "t0k3n", "a": "1" * 100_000})
        assert ok.status_code == 200
        assert ok.text == "csrf_token=t0k3n&a=" + "1" * 100_000
        assert (await http.post("/echo", data={"csrf_token": "t0k3"})).status_code == 403
        header = await http.post("/echo", content=b"raw", headers={"X-CSRF-Token": "t0k3n"})
        assert header.text == "raw"


def test_corral_itself_hashes_passwords_with_argon2id_production_parameters() -> None:
    """The suite hashes with cheap parameters (tests/conftest.py); Corral's own processes
    keep argon2-cffi's RFC 9106 low-memory profile (64 MiB, 3 passes, 4 lanes)."""
    code = "from server.auth import hash_password; print(hash_password('a good password'))"
    found = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True
    )
    assert found.stdout.startswith("$argon2id$v=19$m=65536,t=3,p=4$"), found.stdout
