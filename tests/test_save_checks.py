"""Mistakes refused when they are saved, not when a run fails later (issue 12, items 2, 5,
6, 9, 11, 12), through the GraphQL API on SQLite and PostgreSQL, and one in the panel."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette

from graphql_schema.relay import decode_id
from server.settings import Settings
from tests.conftest import GraphQLClient
from tests.fixtures.commands import run, wait_final, wait_status
from tests.test_panel import add_profile, admin, post_form  # noqa: F401  (admin: a fixture)

ERRORS = "userErrors { field message code }"
CREATE_PROFILE = f"""mutation($input: CreateProfileInput!) {{ createProfile(input: $input) {{
  profile {{ id userDataDir timezone locale }} {ERRORS} }} }}"""
UPDATE_PROFILE = f"""mutation($input: UpdateProfileInput!) {{ updateProfile(input: $input) {{
  profile {{ id }} {ERRORS} }} }}"""
DELETE_PROFILE = f"""mutation($id: ID!, $deleteData: Boolean) {{
  deleteProfile(id: $id, deleteData: $deleteData) {{ deletedId notices {ERRORS} }} }}"""
CREATE_TEMPLATE = f"""mutation($input: CreateCommandTemplateInput!) {{
  createCommandTemplate(input: $input) {{ commandTemplate {{ id }} {ERRORS} }} }}"""
UPDATE_TEMPLATE = f"""mutation($input: UpdateCommandTemplateInput!) {{
  updateCommandTemplate(input: $input) {{ commandTemplate {{ id }} {ERRORS} }} }}"""
CREATE_SERVICE = f"""mutation($input: CreateServiceInput!) {{ createService(input: $input) {{
  service {{ id }} {ERRORS} }} }}"""
CANCEL = f"""mutation($id: ID!) {{ cancelCommand(id: $id) {{
  command {{ status cancelRequested }} {ERRORS} }} }}"""
COMMANDS = """query($order: CommandOrder!, $after: String) {
  commands(orderBy: $order, first: 2, after: $after) {
    nodes { id cancelRequested } pageInfo { endCursor hasNextPage } } }"""
COUNTS = "{ profiles { totalCount } commandTemplates { totalCount } services { totalCount } }"


async def refused(gql: GraphQLClient, query: str, name: str, **variables: Any) -> dict[str, Any]:
    """The one userError of a mutation that must write nothing."""
    before = await gql(COUNTS)
    payload = (await gql(query, **variables))[name]
    assert len(payload["userErrors"]) == 1, payload
    assert await gql(COUNTS) == before
    error: dict[str, Any] = payload["userErrors"][0]
    return error


async def accepted(gql: GraphQLClient, query: str, name: str, **variables: Any) -> dict[str, Any]:
    payload: dict[str, Any] = (await gql(query, **variables))[name]
    assert payload["userErrors"] == [], payload
    return payload


BAD_SETTINGS: list[tuple[dict[str, Any], str, str]] = [
    ({"timezone": "Mars/Olympus"}, "timezone", "not an IANA time zone"),
    ({"timezone": "../../etc/passwd"}, "timezone", "not an IANA time zone"),
    ({"locale": "en_US"}, "locale", "did you mean 'en-US'"),
    ({"locale": "english please"}, "locale", "BCP 47"),
    ({"viewportWidth": 20}, "viewportWidth", "between 200 and 10000"),
    ({"viewportHeight": 100_000}, "viewportHeight", "between 200 and 10000"),
    ({"userAgent": "Mozilla/5.0\r\nX-Injected: 1"}, "userAgent", "printable ASCII"),
    ({"userAgent": "M" * 513}, "userAgent", "too long"),
]


async def test_bad_browser_settings_and_shared_dirs_are_refused(
    gql: GraphQLClient, tmp_path: Path
) -> None:
    for extra, field, message in BAD_SETTINGS:
        error = await refused(gql, CREATE_PROFILE, "createProfile", input={"name": "p", **extra})
        assert (error["field"], message in error["message"]) == ([field], True), (extra, error)
    good = {"timezone": "Asia/Tokyo", "locale": "zh-Hant-TW", "userAgent": "CorralTest/1.0"}
    shared = tmp_path / "browsers" / "shop"
    first = await accepted(
        gql,
        CREATE_PROFILE,
        "createProfile",
        input={"name": "first", "userDataDir": str(shared), **good},
    )
    assert first["profile"]["timezone"] == "Asia/Tokyo"
    error = await refused(
        gql, UPDATE_PROFILE, "updateProfile", input={"id": first["profile"]["id"], "timezone": "X"}
    )
    assert error["field"] == ["timezone"]

    # Spelled another way, through a symlink, or nested: still the same directory.
    (tmp_path / "browsers").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "browsers")
    for spelling in (
        f"{shared}/",
        f"{tmp_path}/browsers/./x/../shop",
        f"{tmp_path}/link/shop",
        f"{shared}/inner",
        str(tmp_path / "browsers"),
    ):
        variables = {"input": {"name": "second", "userDataDir": spelling}}
        error = await refused(gql, CREATE_PROFILE, "createProfile", **variables)
        assert (error["field"], error["code"]) == (["userDataDir"], "TAKEN"), (spelling, error)
        assert "'first'" in error["message"]
    second = await accepted(
        gql, CREATE_PROFILE, "createProfile", input={"name": "second", "userDataDir": f"{shared}2"}
    )  # a sibling whose name starts with the other's is not nested
    moved = {"id": second["profile"]["id"], "userDataDir": f"{shared}//"}
    error = await refused(gql, UPDATE_PROFILE, "updateProfile", input=moved)
    assert error["field"] == ["userDataDir"]


TEMPLATE_MISTAKES = [
    ("run {{ params.url }} {{ params.depth }}", "params.depth is not a declared parameter"),
    ("run {{ params['deep'] }}", "params.deep is not a declared parameter"),
    ("run {{ params.url | shout }}", "no filter named 'shout'"),
    ("run {% if params.url is loud %}x{% endif %}", "no test named 'loud'"),
    ("run {{ params.url }} --title 'It's here'", "quote is never closed"),
    ("run {{ params.url }} \\", "ends with a backslash"),
]
URL_PARAMETER = [{"name": "url", "type": "string", "required": True}]


async def test_templates_and_env_names_are_checked_when_saved(gql: GraphQLClient) -> None:
    for source, message in TEMPLATE_MISTAKES:
        template = {"name": "t", "template": source, "parameters": URL_PARAMETER}
        error = await refused(gql, CREATE_TEMPLATE, "createCommandTemplate", input=template)
        assert error["field"] == ["template"], (source, error)
        assert message in error["message"], (source, error)
    created = await accepted(
        gql,
        CREATE_TEMPLATE,
        "createCommandTemplate",
        input={
            "name": "t",
            "template": "run {{ params.url | upper }} {{ params.get('url') }}",
            "parameters": URL_PARAMETER,
            "env": {"GITHUB_TOKEN_HINT": "x"},
        },
    )
    template_id = created["commandTemplate"]["id"]
    # Dropping a parameter the template still reads is refused too.
    update = {"id": template_id, "parameters": []}
    error = await refused(gql, UPDATE_TEMPLATE, "updateCommandTemplate", input=update)
    assert "params.url is not a declared parameter" in error["message"]

    for name in (
        "LD_PRELOAD",
        "dyld_insert_libraries",
        "NODE_OPTIONS",
        "PYTHONPATH",
        "BASH_ENV",
        "ENV",
        "PERL5OPT",
        "RUBYOPT",
        "CORRAL_PROXY_URL",
        "PATH",
    ):
        service = {"name": "s", "envVar": name}
        error = await refused(gql, CREATE_SERVICE, "createService", input=service)
        assert (error["field"], error["code"]) == (["envVar"], "INVALID"), (name, error)
        assert name in error["message"]
        update = {"id": template_id, "env": {name: "/tmp/evil.so"}}
        error = await refused(gql, UPDATE_TEMPLATE, "updateCommandTemplate", input=update)
        assert error["field"] == ["env"], (name, error)
        assert name in error["message"], (name, error)
    await accepted(gql, CREATE_SERVICE, "createService", input={"name": "s", "envVar": "GH_TOKEN"})


async def test_a_tz_chromium_would_ignore_is_refused_in_template_env(gql: GraphQLClient) -> None:
    for value in ("Mars/Olympus", "CET-1CEST", "", "../../etc/localtime"):
        template = {"name": "t", "template": "run", "env": {"TZ": value}}
        error = await refused(gql, CREATE_TEMPLATE, "createCommandTemplate", input=template)
        assert error["field"] == ["env"], (value, error)
        expected = f"env TZ: {value!r} is not a known time zone; Chromium ignores it"
        assert expected in error["message"], (value, error)
    for value in ("Europe/Berlin", ":America/New_York", "UTC"):
        template = {"name": f"tz {value}", "template": "run", "env": {"TZ": value}}
        await accepted(gql, CREATE_TEMPLATE, "createCommandTemplate", input=template)


async def test_delete_profile_removes_corrals_own_browser_data_when_asked(
    gql: GraphQLClient, settings: Settings, tmp_path: Path
) -> None:
    async def profile(name: str, **extra: Any) -> tuple[str, Path]:
        created = await accepted(
            gql, CREATE_PROFILE, "createProfile", input={"name": name, **extra}
        )
        path = Path(created["profile"]["userDataDir"])
        (path / "Default").mkdir(parents=True, exist_ok=True)
        (path / "Default" / "Cookies").write_bytes(b"session=1")
        return created["profile"]["id"], path

    kept_id, kept = await profile("kept")
    removed_id, removed = await profile("removed")
    own_id, own = await profile("own", userDataDir=str(tmp_path / "own-dir"))
    assert removed.parent == settings.profiles_dir

    payload = await accepted(gql, DELETE_PROFILE, "deleteProfile", id=kept_id)
    assert (kept / "Default" / "Cookies").exists()
    assert any(f"browser data at {kept} is kept" in notice for notice in payload["notices"])

    payload = await accepted(gql, DELETE_PROFILE, "deleteProfile", id=removed_id, deleteData=True)
    assert payload["deletedId"] == removed_id
    assert not removed.exists()
    assert settings.profiles_dir.is_dir()
    assert any(f"browser data at {removed} was removed" in n for n in payload["notices"])

    payload = await accepted(gql, DELETE_PROFILE, "deleteProfile", id=own_id, deleteData=True)
    assert (own / "Default" / "Cookies").exists()  # chosen by an admin: never removed
    assert any("chosen by an admin" in notice for notice in payload["notices"])

    # A default dir swapped for a symlink to elsewhere is not followed.
    swapped_id, swapped = await profile("swapped")
    os.rename(swapped, tmp_path / "elsewhere")
    swapped.symlink_to(tmp_path / "elsewhere")
    payload = await accepted(gql, DELETE_PROFILE, "deleteProfile", id=swapped_id, deleteData=True)
    assert (tmp_path / "elsewhere" / "Default" / "Cookies").exists()
    assert any("is kept: not a directory of Corral" in n for n in payload["notices"])


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"kill_grace_seconds": 0.5})


async def test_cancel_says_it_is_stopping_and_commands_can_be_ordered(
    gql: GraphQLClient,
) -> None:
    done = [await run(gql, commandString="true") for _ in range(2)]
    for command_id in done:
        await wait_final(gql, command_id)
    # Ignores SIGTERM, so it is still stopping when cancelCommand answers.
    stubborn = await run(gql, commandString="sh -c 'trap \"\" TERM; sleep 30'")
    await wait_status(gql, stubborn, {"RUNNING"})
    payload = await accepted(gql, CANCEL, "cancelCommand", id=stubborn)
    assert payload["command"] == {"status": "RUNNING", "cancelRequested": True}
    assert (await wait_final(gql, stubborn))["status"] == "CANCELLED"

    async def listing(order: str) -> list[dict[str, Any]]:
        nodes: list[dict[str, Any]] = []
        after = None
        while True:
            page = (await gql(COMMANDS, order=order, after=after))["commands"]
            nodes += page["nodes"]
            if not page["pageInfo"]["hasNextPage"]:
                return nodes
            after = page["pageInfo"]["endCursor"]

    oldest_first = [*done, stubborn]
    assert [node["id"] for node in await listing("CREATED_ASC")] == oldest_first
    newest_first = await listing("CREATED_DESC")
    assert [node["id"] for node in newest_first] == oldest_first[::-1]
    assert newest_first[0]["cancelRequested"] is False  # it has stopped
    assert decode_id(stubborn) is not None


async def test_panel_shows_the_refusal_and_deletes_the_data_when_asked(
    app: Starlette,
    admin: httpx.AsyncClient,  # noqa: F811
) -> None:
    profile_id = await add_profile(app, "tz")
    answer = await post_form(admin, f"/profiles/{profile_id}", name="tz", timezone="Mars/Olympus")
    assert answer.status_code == 422, answer.text
    assert 'id="timezone-error"' in answer.text
    assert "not an IANA time zone" in answer.text

    data_dir = app.state.services.settings.profiles_dir / str(profile_id)
    (data_dir / "Default").mkdir(parents=True)
    confirm = await admin.get(f"/profiles/{profile_id}/delete")
    assert 'name="deleteData"' in confirm.text
    gone = await post_form(admin, f"/profiles/{profile_id}/delete", deleteData="on")
    assert gone.status_code == 303
    assert not data_dir.exists()
    assert "was removed" in (await admin.get("/profiles")).text
