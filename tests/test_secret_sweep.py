"""No secret anywhere: after a session that stores tokens and proxy passwords, makes API
tokens, runs commands that print their environment and echo tokens, and makes client
mistakes with a token in the input, no secret's plaintext (nor its URL-encoded,
JSON-escaped or hex form) is in the database (SQLite: every file in the data dir, the
-wal file included; PostgreSQL: every row of every table as text), in any response the
session got, in the stored logs or the audit log, or in anything logged at DEBUG.
SQLite and PostgreSQL both."""

from __future__ import annotations

import json
import logging
import secrets
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest
from sqlalchemy import text
from starlette.applications import Starlette

from server.db import create_engine
from server.settings import Settings
from tests.conftest import GraphQLClient
from tests.fixtures.auth import bearer, issue_api_token
from tests.fixtures.commands import logs_of, run, texts, wait_final
from tests.test_walls_secrets import printing, record_text

MASK = "[redacted]"


def fresh(prefix: str) -> str:
    """A distinctive secret no test has used before."""
    return prefix + secrets.token_urlsafe(24)


SECRETS = {
    "shared token": fresh("ghp_"),
    "shared token, replaced": fresh("ghp_"),
    "profile token": fresh("sk-"),
    # Characters that URL-encoding and JSON-escaping change.
    "proxy password": fresh('pw"/+ ') + "\\x",
    "proxy password, replaced": fresh("pw%&="),
}
# Corral masks the secrets it holds; the two replaced ones it no longer knows.
HELD = ("shared token, replaced", "profile token", "proxy password, replaced")


def forms(secret: str) -> list[str]:
    """The ways a secret may be spelled where it leaked."""
    return [secret, quote(secret, safe=""), json.dumps(secret)[1:-1], secret.encode().hex()]


def leaks(secrets_: dict[str, str], places: dict[str, bytes]) -> list[str]:
    """`secret in place` for each secret found (case-blind, in any of its forms)."""
    found = []
    for place, content in places.items():
        haystack = content.lower()
        for name, secret in secrets_.items():
            if any(form.lower().encode() in haystack for form in forms(secret)):
                found.append(f"{name} in {place}")
    return found


class Recorder:
    """Keeps every response body the session received."""

    def __init__(self) -> None:
        self.bodies: list[bytes] = []

    async def __call__(self, response: httpx.Response) -> None:
        self.bodies.append(await response.aread())


def database_files(data_dir: Path) -> dict[str, bytes]:
    """Every file under the data dir (SQLite's database, -wal and -shm among them)."""
    return {
        str(path.relative_to(data_dir)): path.read_bytes()
        for path in sorted(data_dir.rglob("*"))
        if path.is_file()
    }


async def postgres_rows(settings: Settings) -> dict[str, bytes]:
    """Every row of every table of the database, as PostgreSQL spells it as text."""
    engine = create_engine(settings)
    try:
        async with engine.connect() as connection:
            tables = list(
                await connection.scalars(
                    text(
                        "SELECT table_name FROM information_schema.tables "
                        "WHERE table_schema = current_schema() AND table_type = 'BASE TABLE'"
                    )
                )
            )
            dump = {}
            for table in tables:
                # Names from information_schema, not from any input.
                query = f'SELECT CAST(t AS text) FROM "{table}" t'  # noqa: S608
                rows = await connection.scalars(text(query))
                dump[f"table {table}"] = "\n".join(rows).encode()
    finally:
        await engine.dispose()
    assert {"table audit_events", "table log_lines"} <= set(dump), sorted(dump)
    return dump


async def store_secrets(gql: GraphQLClient) -> str:
    """Services, a profile's own token and proxies, all through GraphQL; the profile's ID."""
    created = await gql(
        "mutation($a: CreateServiceInput!, $b: CreateServiceInput!, $p: CreateProfileInput!) {"
        " a: createService(input: $a) { service { id } userErrors { code } }"
        " b: createService(input: $b) { service { id } userErrors { code } }"
        " p: createProfile(input: $p) { profile { id } userErrors { code } } }",
        a={"name": "GitHub", "envVar": "GITHUB_TOKEN", "token": SECRETS["shared token"]},
        b={"name": "OpenAI", "envVar": "OPENAI_API_KEY"},
        p={"name": "alice"},
    )
    github, openai = created["a"]["service"]["id"], created["b"]["service"]["id"]
    profile = created["p"]["profile"]["id"]
    replaced = SECRETS["shared token, replaced"]
    changed = await gql(
        "mutation($s: UpdateServiceInput!, $g: LinkServiceInput!, $o: LinkServiceInput!,"
        " $x: CreateProxyInput!) {"
        " s: updateService(input: $s) { service { tokenPreview } userErrors { code } }"
        " g: linkService(input: $g) { userErrors { code } }"
        " o: linkService(input: $o) { userErrors { code } }"
        " x: createProxy(input: $x) { proxy { id hasCredentials } userErrors { code } } }",
        s={"id": github, "token": replaced},
        g={"profileId": profile, "serviceId": github},
        o={"profileId": profile, "serviceId": openai, "token": SECRETS["profile token"]},
        x={
            "name": "tr",
            "protocol": "TROJAN",
            "host": "t.example.com",
            "port": 443,
            "password": SECRETS["proxy password"],
        },
    )
    assert all(payload["userErrors"] == [] for payload in changed.values()), changed
    proxy = changed["x"]["proxy"]["id"]
    data = await gql(
        "mutation($x: UpdateProxyInput!) { updateProxy(input: $x) { userErrors { code } } }",
        x={"id": proxy, "password": SECRETS["proxy password, replaced"]},
    )
    assert data["updateProxy"]["userErrors"] == []
    return str(profile)


async def run_revealing_commands(gql: GraphQLClient, profile: str) -> list[str]:
    """Commands that print their environment, echo a token and print every secret Corral
    holds as is, URL-encoded and JSON-escaped; their stored stdout and stderr lines."""
    held = [secret for name, secret in SECRETS.items() if name in HELD]
    everything = [form for secret in held for form in forms(secret)[:3]]
    lines = []
    for command_string in [
        "/usr/bin/env",
        "/bin/sh -c 'echo token=$GITHUB_TOKEN; echo key=$OPENAI_API_KEY >&2'",
        printing(everything),
    ]:
        command = await run(gql, commandString=command_string, profileId=profile)
        assert (await wait_final(gql, command))["status"] == "SUCCEEDED"
        stored = await logs_of(gql, command)
        lines += texts(stored) + texts(stored, "STDERR")
    return lines


async def make_mistakes(gql: GraphQLClient, http: httpx.AsyncClient, profile: str) -> None:
    """Client mistakes with a token in the input: mistyped and unknown fields, a token where
    an ID goes, a bad link, a token sent as the API token."""
    token = SECRETS["shared token"]
    create = (
        "mutation($input: CreateServiceInput!) { createService(input: $input) "
        "{ service { id } userErrors { field message code } } }"
    )
    body = await gql.raw(create, input={"name": 1, "envVar": "X_TOKEN", "token": token})
    assert body["errors"]
    body = await gql.raw(create, input={"name": "x", "envVar": "X_TOKEN", "tokn": token})
    assert body["errors"]
    data = await gql(
        "mutation($input: LinkServiceInput!) { linkService(input: $input) "
        "{ userErrors { field message code } } }",
        input={"profileId": profile, "serviceId": "no-such-id", "token": token},
    )
    assert data["linkService"]["userErrors"]
    data = await gql(
        "mutation($id: ID!) { deleteService(id: $id) { userErrors { message code } } }", id=token
    )
    assert data["deleteService"]["userErrors"][0]["code"] == "NOT_FOUND"
    data = await gql(
        "mutation($input: CreateProxyInput!) { createProxy(input: $input) "
        "{ userErrors { field message code } } }",
        input={"name": "p", "protocol": "HTTP", "host": "h.example.com", "port": 0,
               "password": SECRETS["proxy password"]},
    )  # fmt: skip
    assert data["createProxy"]["userErrors"]
    body = await gql.raw(f'mutation {{ createService(input: {{token: "{token}" }}) }}')
    assert body["errors"]
    refused = await http.post("/graphql", json={"query": "{ __typename }"}, headers=bearer(token))
    assert refused.status_code == 401


READ_BACK = """
{ services(first: 5) { nodes { name hasToken tokenPreview } }
  profiles(first: 5) { nodes { name services { hasToken tokenPreview } } }
  proxies(first: 5) { nodes { name hasCredentials } }
  commands(first: 5) { nodes { argv error logs(first: 100) { text } } }
  auditEvents(first: 50) { nodes { action objectId outcome detail clientAddress } } }"""


async def test_no_secret_is_anywhere(
    app: Starlette, settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("corral", "uvicorn", "uvicorn.error", "uvicorn.access"):
        caplog.set_level(logging.DEBUG, logger=name)
    api_token = await issue_api_token(app, role="admin", name="sweeper")
    viewer_token = await issue_api_token(app, role="viewer", name="watcher")
    recorder = Recorder()
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app),
        base_url="http://localhost",
        headers=bearer(api_token),
        event_hooks={"response": [recorder]},
    ) as http:
        gql = GraphQLClient(http)
        profile = await store_secrets(gql)
        lines = await run_revealing_commands(gql, profile)
        await make_mistakes(gql, http, profile)
        read_back = await gql(READ_BACK)
        viewed = await http.post(
            "/graphql", json={"query": READ_BACK}, headers=bearer(viewer_token)
        )
        assert viewed.status_code == 200

    everything = SECRETS | {"admin API token": app.state.admin_token, "API token": api_token}
    everything["viewer API token"] = viewer_token
    places = {f"response {i}": body for i, body in enumerate(recorder.bodies)}
    places["server log"] = record_text(caplog).encode()
    places |= database_files(settings.data_dir)
    if settings.database_url is not None:
        places |= await postgres_rows(settings)
    else:
        assert {"corral.db", "corral.db-wal"} <= set(places), sorted(places)
    assert leaks(everything, places) == []

    # The commands did get and print the secrets (or there would be nothing to find).
    assert f"GITHUB_TOKEN={MASK}" in lines
    assert f"OPENAI_API_KEY={MASK}" in lines
    assert f"token={MASK}" in lines
    assert f"key={MASK}" in lines
    assert [line for line in lines if line.startswith("found")] == [f"found {MASK}"] * 9, lines
    # The audit log names the secret fields it was given, never their values.
    details = {(e["action"], json.dumps(e["detail"])) for e in read_back["auditEvents"]["nodes"]}
    assert ("updateService", json.dumps({"fields": ["id", "token"]})) in details
    assert ("updateProxy", json.dumps({"fields": ["id", "password"]})) in details
