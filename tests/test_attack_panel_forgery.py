"""Forged admin requests in the panel, tried as an attacker would (adversarial testing):
every state-changing panel route, listed from the route table, is sent forms from another
site (no token, a wrong one, another session's), with a stolen cookie and its token after
the session expired or was logged out, and with the wrong method. Each is refused with a
clear answer, reached the server (its refusal is logged), and changed nothing.

In-process over HTTP (httpx on the ASGI app: a 500 fails the test), on SQLite and
PostgreSQL. test_panel_attacks.py covers outsiders, viewers and a missing token.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from typing import Any

import httpx
import pytest
from sqlalchemy import select, update
from starlette.applications import Starlette

from server.models import Base, UserSession, utcnow
from server.settings import Settings
from tests.test_login import browser_for
from tests.test_panel import admin, csrf_of, logged_in  # noqa: F401 - fixtures
from tests.test_panel_attacks import add_objects, panel_paths

# What a page on another site sends along with the victim's cookie.
CROSS_SITE = {"Origin": "https://evil.example", "Sec-Fetch-Site": "cross-site"}
# Tables a refused request may touch: a session's last-seen time, an expired one deleted.
VOLATILE = {"user_sessions", "api_tokens"}


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """No embedded runner: the runs these tests add stay as they are."""
    return settings.model_copy(update={"embedded_runner": False})


def mutating_paths(ids: dict[str, int]) -> list[str]:
    paths = [path for method, path in panel_paths(**ids) if method == "POST"]
    assert len(paths) > 20, paths  # the route table, not an empty list
    return [*paths, "/logout"]


async def snapshot(app: Starlette) -> dict[str, list[tuple[Any, ...]]]:
    """Every row of every table but the volatile ones."""
    rows = {}
    async with app.state.services.sessionmaker() as session:
        for table in Base.metadata.sorted_tables:
            if table.name not in VOLATILE:
                found = await session.execute(select(table))
                rows[table.name] = sorted(map(tuple, found.all()), key=repr)
    return rows


def refusals(caplog: pytest.LogCaptureFixture, logger: str) -> int:
    return sum(1 for r in caplog.records if r.name == logger and "refused" in r.getMessage())


async def test_cross_site_forms_without_the_session_s_token_are_refused(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="corral")
    paths = mutating_paths(await add_objects(app, "alpha"))
    own_token = csrf_of(await admin.get("/"))
    async with logged_in(app, "mallory", "admin") as other:
        others_token = csrf_of(await other.get("/"))  # a real token, of another session
    before = await snapshot(app)
    assert before["profiles"]  # something a forgery could change
    assert before["commands"]
    forged = 0
    for path in paths:
        for form in (
            {"name": "x"},
            {"csrf_token": "", "name": "x"},
            {"csrf_token": own_token[:-1] + "x", "name": "x"},
            {"csrf_token": others_token, "name": "x"},
            {"csrf_token": own_token.upper() if own_token != own_token.upper() else "x"},
        ):
            answer = await admin.post(path, data=form, headers=CROSS_SITE)
            assert answer.status_code == 403, (path, form, answer.status_code)
            assert "CSRF token missing or wrong" in answer.text
            forged += 1
        # A token in a header that is not ours, a JSON body: no token at all.
        answer = await admin.post(
            path, json={"csrf_token": own_token}, headers={"X-CSRFToken": own_token, **CROSS_SITE}
        )
        assert answer.status_code == 403, path
        # A browser's page asks for HTML: it gets a page that says what to do.
        page = await admin.post(path, data={}, headers={"Accept": "text/html", **CROSS_SITE})
        assert page.status_code == 403
        assert "reload the page" in page.text
        forged += 2
    assert refusals(caplog, "corral.csrf") == forged  # each one reached the server
    assert await snapshot(app) == before
    assert (await admin.get("/")).status_code == 200  # still logged in: /logout was refused


@pytest.mark.parametrize("expiry", ["idle", "absolute", "logged out"])
async def test_a_stolen_cookie_and_token_of_a_session_that_ended_are_refused(
    app: Starlette, caplog: pytest.LogCaptureFixture, expiry: str
) -> None:
    caplog.set_level(logging.INFO, logger="corral")
    paths = mutating_paths(await add_objects(app, "alpha"))
    async with logged_in(app, "alice", "admin") as victim:
        token = csrf_of(await victim.get("/"))
        cookies = dict(victim.cookies)
        if expiry == "logged out":
            assert (await victim.post("/logout", data={"csrf_token": token})).status_code == 303
        else:
            policy = app.state.authenticator.policy
            age = (policy.idle if expiry == "idle" else policy.absolute) + timedelta(minutes=1)
            column = UserSession.last_seen_at if expiry == "idle" else UserSession.created_at
            async with app.state.services.sessionmaker() as session:
                await session.execute(update(UserSession).values({column: utcnow() - age}))
                await session.commit()
    before = await snapshot(app)
    async with browser_for(app) as thief:
        thief.cookies.update(cookies)
        for path in paths:
            answer = await thief.post(path, data={"csrf_token": token, "name": "x"})
            if path == "/logout":  # open: it clears the cookie and changes nothing else
                assert answer.status_code == 303, answer.text
                continue
            assert answer.status_code == 401, (path, answer.status_code)
            assert "authentication required" in answer.text
        answer = await thief.get("/profiles", headers={"Accept": "text/html"})
        assert answer.status_code == 303  # to the login page
        assert answer.headers["location"].startswith("/login")
    assert refusals(caplog, "corral.access") >= len(paths) - 1
    assert await snapshot(app) == before
    async with app.state.services.sessionmaker() as session:
        assert list(await session.scalars(select(UserSession))) == []  # ended, not revived


async def test_the_wrong_method_on_a_mutating_route_changes_nothing(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
) -> None:
    paths = mutating_paths(await add_objects(app, "alpha"))
    token = csrf_of(await admin.get("/"))
    before = await snapshot(app)
    for path in paths:
        for method in ("PUT", "PATCH", "DELETE"):
            answer = await admin.request(
                method, path, data={"csrf_token": token}, headers={"X-CSRF-Token": token}
            )
            assert answer.status_code == 405, (method, path, answer.status_code)
        for method in ("GET", "HEAD"):
            answer = await admin.request(method, path, params={"csrf_token": token, "name": "x"})
            # A page of a path that matches may be shown (a form, an object; /proxies/import
            # is a proxy named "import" to GET /proxies/{id}: 404), nothing is done.
            assert answer.status_code in (200, 404, 405), (method, path, answer.status_code)
            if answer.status_code == 405:
                assert "POST" in answer.headers["allow"]
        override = await admin.post(
            path, data={"_method": "DELETE"}, headers={"X-HTTP-Method-Override": "DELETE"}
        )
        assert override.status_code == 403, path  # still a POST, and still no token
    assert await snapshot(app) == before
