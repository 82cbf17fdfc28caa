"""Secrets stay out of every error, every log line and every command's output (issue 10).

A mistyped input, a syntax error, an unexpected exception or a bad share link never
brings a secret back in the response or into any log record; a command that prints
secrets it was never given (another service's token, a proxy's password) gets them
masked in its stored and streamed lines all the same. SQLite and PostgreSQL both.
"""

from __future__ import annotations

import base64
import json
import logging
from typing import Any

import pytest

from tests.conftest import GraphQLClient
from tests.fixtures.auth import admin_client

TOKEN = "ghp_" + "Wq8zX2mR" * 4 + "e5f6"  # a GitHub-shaped token
PASSWORD = "pw-Lk3!vT9#hidden"
LINK_PASSWORD = "pw-Lk3vT9hidden42"
UUID_SECRET = "0f1e2d3c-4b5a-4978-8695-a4b3c2d1e0f9"

CREATE_SERVICE = (
    "mutation($input: CreateServiceInput!) { createService(input: $input) "
    "{ service { id } userErrors { field message code } } }"
)


def record_text(caplog: pytest.LogCaptureFixture) -> str:
    """Everything every logger recorded, formatted as a handler would (tracebacks too)."""
    parts = [caplog.text]
    for record in caplog.records:
        parts.append(record.getMessage())
        if record.exc_info:
            parts.append(logging.Formatter().formatException(record.exc_info))
    return "\n".join(parts)


def assert_hidden(secret: str, body: Any, caplog: pytest.LogCaptureFixture) -> None:
    # Case-blind: a parser may have lower-cased what it echoes.
    text = json.dumps(body)
    assert secret.lower() not in text.lower(), text
    logged = record_text(caplog)
    assert secret.lower() not in logged.lower(), logged


@pytest.fixture
def everything_logged(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG)
    return caplog


MISTYPED_INPUTS = {
    "other-field-wrong-type": {"name": 1, "kind": "github", "envVar": "GH_T", "token": TOKEN},
    "unknown-field": {"name": "gh", "kind": "github", "envVar": "GH_T", "token": TOKEN, "x": 1},
    "token-as-list": {"name": "gh", "kind": "github", "envVar": "GH_T", "token": [TOKEN]},
    "token-as-object": {"name": "gh", "kind": "github", "envVar": "GH_T", "token": {"t": TOKEN}},
    "missing-required": {"kind": "github", "envVar": "GH_T", "token": TOKEN},
    "input-not-an-object": TOKEN,
}


@pytest.mark.parametrize("value", MISTYPED_INPUTS.values(), ids=list(MISTYPED_INPUTS))
async def test_a_mistyped_input_keeps_its_token_out_of_response_and_logs(
    gql: GraphQLClient, everything_logged: pytest.LogCaptureFixture, value: Any
) -> None:
    body = await gql.raw(CREATE_SERVICE, input=value)
    assert body["errors"]
    assert body.get("data") is None
    assert_hidden(TOKEN, body, everything_logged)
    # Nothing a client got wrong is an ERROR in the server's log.
    assert not [r for r in everything_logged.records if r.levelno >= logging.WARNING]


async def test_a_coercion_error_still_says_where_and_why(gql: GraphQLClient) -> None:
    body = await gql.raw(CREATE_SERVICE, input=MISTYPED_INPUTS["token-as-list"])
    message = body["errors"][0]["message"]
    assert ".token" in message
    assert "String cannot represent" in message
    body = await gql.raw(CREATE_SERVICE, input=MISTYPED_INPUTS["unknown-field"])
    assert "unknown field 'x'" in body["errors"][0]["message"]


INLINE = 'name: "gh", kind: "github", envVar: "GH_T"'
BAD_DOCUMENTS = {
    "syntax-missing-colon": f'mutation {{ createService(input: {{{INLINE}, token "{TOKEN}"}}) }}',
    "syntax-unclosed": f'mutation {{ createService(input: {{{INLINE}, token: "{TOKEN}"}}) {{ ',
    "syntax-unterminated-string": f'mutation {{ createService(input: {{token: "{TOKEN}',
    "syntax-bare-token": f"mutation {{ createService(input: {{token: {TOKEN}}} }}",
    "literal-wrong-type": f'mutation {{ createService(input: {{name: 1, kind: "{TOKEN}", '
    f'envVar: "X", token: ["{TOKEN}"]}}) {{ userErrors {{ message }} }} }}',
    "literal-unknown-field": f'mutation {{ createService(input: {{{INLINE}, token: "{TOKEN}", '
    "x: 1}) { userErrors { message } } }",
    "literal-bad-enum": f'mutation {{ createProxy(input: {{name: "p", protocol: {TOKEN}, '
    'host: "h.example.com", port: 1}) { userErrors { message } } }',
}


@pytest.mark.parametrize("document", BAD_DOCUMENTS.values(), ids=list(BAD_DOCUMENTS))
async def test_a_bad_document_keeps_its_inline_token_out_of_response_and_logs(
    gql: GraphQLClient, everything_logged: pytest.LogCaptureFixture, document: str
) -> None:
    body = await gql.raw(document)
    assert body["errors"]
    assert_hidden(TOKEN, body, everything_logged)
    assert not [r for r in everything_logged.records if r.levelno >= logging.WARNING]
    # Only the message and where: no excerpt of the query goes back either.
    assert all(set(error) <= {"message", "locations", "path"} for error in body["errors"])


async def test_a_bad_variable_in_a_query_keeps_its_value_out(
    gql: GraphQLClient, everything_logged: pytest.LogCaptureFixture
) -> None:
    body = await gql.raw(
        "query($first: Int) { profiles(first: $first) { totalCount } }", first=TOKEN
    )
    assert "Int cannot represent" in body["errors"][0]["message"]
    assert_hidden(TOKEN, body, everything_logged)


async def test_an_unexpected_error_is_masked_and_logged_without_the_input(
    gql: GraphQLClient,
    everything_logged: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import server.services as service_domain

    def explode(*args: Any, **kwargs: Any) -> Any:
        values = [arg for arg in args if isinstance(arg, dict)]
        raise RuntimeError(f"database said no to {values}")

    monkeypatch.setattr(service_domain, "create_service", explode)
    body = await gql.raw(
        CREATE_SERVICE, input={"name": "gh", "kind": "github", "envVar": "GH_T", "token": TOKEN}
    )
    assert body["errors"][0]["message"] == "Unexpected error."
    assert_hidden(TOKEN, body, everything_logged)
    errors = [r for r in everything_logged.records if r.levelno >= logging.ERROR]
    assert len(errors) == 1
    assert "RuntimeError" in errors[0].getMessage()
    assert "createService" in errors[0].getMessage()
    everything_logged.clear()  # the one ERROR was the point; the autouse check would object


def b64(text: str) -> str:
    return base64.b64encode(text.encode()).decode()


def vmess(**fields: Any) -> str:
    base = {"v": "2", "add": "v.example.com", "port": 443, "id": UUID_SECRET, "net": "tcp"}
    return "vmess://" + b64(json.dumps(base | fields))


BAD_SECRET_LINKS = {
    "vless-bad-uuid": (f"vless://{LINK_PASSWORD}@vl.example.com:443", LINK_PASSWORD),
    "vless-bad-port": (f"vless://{UUID_SECRET}@vl.example.com:99999", UUID_SECRET),
    "vless-no-at": (f"vless://{UUID_SECRET}:443", UUID_SECRET),
    "vless-bad-type": (
        f"vless://{UUID_SECRET}@h.example.com:443?type={LINK_PASSWORD}",
        LINK_PASSWORD,
    ),
    "vmess-bad-uuid": (vmess(id=LINK_PASSWORD), LINK_PASSWORD),
    "vmess-uuid-as-list": (vmess(id=[UUID_SECRET]), UUID_SECRET),
    "vmess-bad-port": (vmess(port="x"), UUID_SECRET),
    "vmess-bad-aid": (vmess(aid=LINK_PASSWORD), LINK_PASSWORD),
    "trojan-bad-port": (f"trojan://{LINK_PASSWORD}@t.example.com:0", LINK_PASSWORD),
    "trojan-no-at": (f"trojan://t.example.com:{LINK_PASSWORD}", LINK_PASSWORD),
    "trojan-bad-host": (f"trojan://{LINK_PASSWORD}@bad host!:443", LINK_PASSWORD),
    "ss-bad-port": (
        f"ss://{b64('aes-256-gcm:' + LINK_PASSWORD)}@s.example.com:70000",
        LINK_PASSWORD,
    ),
    "ss-legacy-bad-host": (
        f"ss://{b64('aes-256-gcm:' + LINK_PASSWORD + '@bad host:1')}",
        LINK_PASSWORD,
    ),
    "ss-plain-plugin": (
        f"ss://aes-256-gcm:{LINK_PASSWORD}@s.example.com:1/?plugin={LINK_PASSWORD}",
        LINK_PASSWORD,
    ),
    "socks-no-at": (f"socks5://user:{LINK_PASSWORD}", LINK_PASSWORD),
    "socks-digits-password": ("socks5://user:918273645", "918273645"),
    "http-path": (f"http://u:p@h.example.com:8080/{LINK_PASSWORD}", LINK_PASSWORD),
    "unknown-scheme": (f"{LINK_PASSWORD}://h:1", LINK_PASSWORD),
}


@pytest.mark.parametrize(("link", "secret"), BAD_SECRET_LINKS.values(), ids=list(BAD_SECRET_LINKS))
async def test_a_bad_share_link_is_named_by_position_never_echoed(
    gql: GraphQLClient, everything_logged: pytest.LogCaptureFixture, link: str, secret: str
) -> None:
    good = f"trojan://{LINK_PASSWORD}@fine.example.com:443#fine"
    data = await gql(
        "mutation($links: [String!]!) { importProxies(links: $links) "
        "{ proxies { name } userErrors { field message code } } }",
        links=[good, link],
    )
    payload = data["importProxies"]
    assert [error["field"] for error in payload["userErrors"]] == [["links", "1"]]
    assert payload["userErrors"][0]["message"].startswith("link 2: ")
    assert_hidden(secret, payload, everything_logged)


# -- every secret Corral holds is masked in every command's output -------------------------

SHARED_TOKEN = "ghp_" + "Sh4r3dT0" * 4 + "aa11"
OWN_TOKEN = "sk-" + "0wnT0k3n" * 4 + "bb22"
VLESS_ID = "7c6b5a49-3827-4160-9e5d-4c3b2a190817"
LATE_TOKEN = "ghp_" + "L4t3T0k3" * 4 + "cc33"
INPUT_TYPES = {
    "createService": ("CreateServiceInput", "service"),
    "createProfile": ("CreateProfileInput", "profile"),
    "linkService": ("LinkServiceInput", "profile"),
    "createProxy": ("CreateProxyInput", "proxy"),
}


async def create(gql: GraphQLClient, mutation: str, **values: Any) -> str:
    """Run a create-like mutation; the ID of what it returns."""
    input_type, select = INPUT_TYPES[mutation]
    data = await gql(
        f"mutation($input: {input_type}!) {{ {mutation}(input: $input) "
        f"{{ {select} {{ id }} userErrors {{ message }} }} }}",
        input=values,
    )
    assert data[mutation]["userErrors"] == [], data
    return str(data[mutation][select]["id"])


async def hold_secrets(gql: GraphQLClient) -> None:
    """A service with a shared token, a profile with its own token for another service,
    a trojan proxy with a password and a VLESS proxy with its id: none for our command."""
    await create(gql, "createService", name="GitHub", envVar="GITHUB_TOKEN", token=SHARED_TOKEN)
    other = await create(gql, "createService", name="OpenAI", envVar="OPENAI_API_KEY")
    profile = await create(gql, "createProfile", name="alice")
    await create(gql, "linkService", profileId=profile, serviceId=other, token=OWN_TOKEN)
    await create(
        gql,
        "createProxy",
        name="tr",
        protocol="TROJAN",
        host="t.example.com",
        port=443,
        password=PASSWORD,
    )
    await create(
        gql,
        "createProxy",
        name="vl",
        protocol="VLESS",
        host="v.example.com",
        port=443,
        password=VLESS_ID,
    )


def printing(secrets: list[str], *, wait: float = 0.0) -> str:
    """A command line that prints `secrets` without carrying them (base64 in its argv),
    as a command that found them somewhere would."""
    encoded = " ".join(base64.b64encode(s.encode()).decode() for s in secrets)
    return (
        "python3 -c 'import base64,sys,time; time.sleep(float(sys.argv[1])); "
        '[print("found", base64.b64decode(a).decode(), flush=True) for a in sys.argv[2:]]\' '
        f"{wait} {encoded}"
    )


def held() -> list[str]:
    from urllib.parse import quote

    from tests.conftest import TEST_KEY

    return [SHARED_TOKEN, OWN_TOKEN, PASSWORD, quote(PASSWORD, safe=""), VLESS_ID, TEST_KEY]


async def test_a_command_without_services_gets_every_held_secret_masked(
    gql: GraphQLClient, app: Any
) -> None:
    from graphql_schema.relay import decode_id
    from server.broker import command_topic
    from server.messages import StoredBatch
    from tests.fixtures.commands import logs_of, run, texts, wait_final

    await hold_secrets(gql)
    secrets = held()
    command_id = await run(gql, commandString=printing(secrets, wait=0.5))
    decoded = decode_id(command_id)
    assert decoded is not None
    streamed: list[str] = []
    async with app.state.services.broker.subscribe(command_topic(decoded[1])) as subscription:
        assert (await wait_final(gql, command_id))["status"] == "SUCCEEDED"
        for message in list(subscription.waiting()):
            if isinstance(message, StoredBatch):
                streamed += [text for run_ in message.runs for text in run_.texts]
    stored = texts(await logs_of(gql, command_id))
    assert stored == ["found [redacted]"] * len(secrets)
    assert [text for text in streamed if text.startswith("found")] == stored


async def test_a_secret_stored_while_a_command_runs_is_masked_from_then_on(
    gql: GraphQLClient,
) -> None:
    from tests.fixtures.commands import logs_of, run, texts, wait_final, wait_status

    command_id = await run(gql, commandString=printing([LATE_TOKEN], wait=1.5))
    await wait_status(gql, command_id, {"RUNNING"})
    await create(gql, "createService", name="Late", envVar="LATE_TOKEN", token=LATE_TOKEN)
    assert (await wait_final(gql, command_id))["status"] == "SUCCEEDED"
    assert texts(await logs_of(gql, command_id)) == ["found [redacted]"]


async def test_a_secret_another_process_stored_is_masked_within_the_refresh(
    settings: Any,
) -> None:
    import asyncio

    from server.app import create_app
    from server.db import create_engine, create_sessionmaker
    from server.models import Service
    from server.secretbox import load_secret_box
    from tests.fixtures.commands import logs_of, run, texts, wait_final

    quick = settings.model_copy(update={"secrets_refresh_seconds": 0.2})
    application = create_app(quick)
    async with (
        application.router.lifespan_context(application),
        admin_client(application) as http,
    ):
        gql = GraphQLClient(http)
        command_id = await run(gql, commandString=printing([LATE_TOKEN], wait=1.5))
        await asyncio.sleep(0.3)  # the command was claimed without it
        # Written as another Corral process would: no announcement reaches this one.
        engine = create_engine(quick)
        try:
            async with create_sessionmaker(engine)() as session:
                box = load_secret_box(quick)
                session.add(
                    Service(
                        name="Elsewhere",
                        env_var="ELSEWHERE",
                        token_encrypted=box.encrypt(LATE_TOKEN),
                    )
                )
                await session.commit()
        finally:
            await engine.dispose()
        assert (await wait_final(gql, command_id))["status"] == "SUCCEEDED"
        assert texts(await logs_of(gql, command_id)) == ["found [redacted]"]


def test_the_redactor_masks_json_escaped_and_overlapping_secrets() -> None:
    from runner.lines import MASK, Redactor

    quoted = 'pa"ss\\wörd-42'
    redact = Redactor([quoted, "abcdef12", "ef12xyz9"])
    as_json = json.dumps({"password": quoted})
    assert quoted not in redact(as_json)
    assert json.dumps(quoted)[1:-1] not in redact(as_json)
    assert redact(json.dumps(quoted, ensure_ascii=False)) == f'"{MASK}"'
    # Two secrets that overlap are masked as one: no tail of either is left.
    assert redact("<abcdef12xyz9>") == f"<{MASK}>"
    assert Redactor(["abcdef12"]).joined(Redactor(["ef12xyz9"]))("<abcdef12xyz9>") == f"<{MASK}>"


def test_the_redactor_costs_the_same_with_thousands_of_secrets() -> None:
    import time
    import uuid

    from runner.lines import MASK, Redactor

    secrets = [str(uuid.uuid4()) for _ in range(3000)]
    redact = Redactor(secrets)
    lines = [f"worker {i} item {uuid.uuid4().hex} status=ok" for i in range(20_000)]
    lines[7777] = f"found {secrets[1234]}"
    began = time.perf_counter()
    masked = [text for i in range(0, len(lines), 100) for text in redact.all(lines[i : i + 100])]
    elapsed = time.perf_counter() - began
    assert masked[7777] == f"found {MASK}"
    # An alternation regex took ~1 ms a line here (20 s); generous for a noisy machine.
    assert elapsed < 2.0, elapsed


FAKE_XRAY = """#!/usr/bin/env python3
import sys
if sys.argv[1:] in (["version"], ["-version"]):
    print("Xray 1.8.24 (Xray, Penetrates Everything.)")
    sys.exit(0)
config = sys.argv[sys.argv.index("-c") + 1]
sys.stderr.write("failed to load config: " + open(config).read())
sys.exit(23)
"""


async def test_a_sidecar_that_quotes_its_config_leaks_no_password(
    settings: Any, tmp_path: Any
) -> None:
    import asyncio

    from server.app import create_app
    from tests.fixtures.commands import logs_of, run, wait_final

    fake = tmp_path / "fake-xray"
    fake.write_text(FAKE_XRAY)
    fake.chmod(0o755)
    password = 'tr"oj\\an-pw-7731'
    listener = await asyncio.start_server(lambda _r, w: w.close(), "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    application = create_app(settings.model_copy(update={"xray_bin": str(fake)}))
    try:
        async with (
            application.router.lifespan_context(application),
            admin_client(application) as http,
        ):
            gql = GraphQLClient(http)
            # Shadowsocks: the pre-flight probe only opens a TCP connection (no TLS, no
            # login of its own), so the sidecar is started and quotes its config.
            ss = {"protocol": "SHADOWSOCKS", "host": "127.0.0.1", "port": port}
            ss["settings"] = {"method": "aes-256-gcm"}
            proxy = await create(gql, "createProxy", name="ss", password=password, **ss)
            command_id = await run(gql, commandString="true", proxyId=proxy)
            node = await wait_final(gql, command_id)
            lines = [line["text"] for line in await logs_of(gql, command_id)]
    finally:
        listener.close()
        await listener.wait_closed()
    assert node["status"] == "FAILED"
    assert any("[sidecar]" in line and '"password"' in line for line in lines), lines
    text = json.dumps([lines, node])
    for form in (password, json.dumps(password)[1:-1]):
        assert form not in text
        assert form not in "\n".join(lines)


def test_corral_serve_logs_no_query_text_and_no_secret(tmp_path: Any) -> None:
    """The real server's whole output (uvicorn's access log included) after requests that
    carry a token in a GET query string, a mistyped input, a syntax error and a bad link."""
    import subprocess

    import httpx

    from tests.fixtures.processes import CORRAL_BIN, cli_token, free_port, stop, wait_for_http
    from tests.test_cli import corral_env

    port = free_port()
    env = corral_env(CORRAL_LOG_LEVEL="debug")
    http = httpx.Client(headers={"Authorization": f"Bearer {cli_token(tmp_path, env)}"})
    process = subprocess.Popen(
        [str(CORRAL_BIN), "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{base}/healthz", process)
        query = f'{{ profiles(search: "{TOKEN}") {{ totalCount }} }}'
        assert http.get(f"{base}/graphql", params={"query": query}).status_code == 200
        mistyped = {"name": 1, "kind": "github", "envVar": "GH_T", "token": TOKEN}
        http.post(
            f"{base}/graphql", json={"query": CREATE_SERVICE, "variables": {"input": mistyped}}
        )
        http.post(f"{base}/graphql", json={"query": BAD_DOCUMENTS["syntax-missing-colon"]})
        links = {"links": [f"vless://{TOKEN}@h.example.com:443"]}
        importing = "mutation($links: [String!]!) { importProxies(links: $links) { userErrors { message } } }"
        body = http.post(f"{base}/graphql", json={"query": importing, "variables": links}).json()
        assert body["data"]["importProxies"]["userErrors"]
    finally:
        http.close()
        _code, output = stop(process)
    assert '"GET /graphql?… HTTP/1.1" 200' in output, output
    assert "GraphQL error" in output  # client mistakes are logged, at INFO, without values
    assert TOKEN not in output, output


async def test_database_errors_never_quote_statement_parameters(settings: Any) -> None:
    from sqlalchemy import text
    from sqlalchemy.exc import IntegrityError

    from server.db import create_engine

    engine = create_engine(settings)
    try:
        async with engine.connect() as connection:
            with pytest.raises(IntegrityError) as caught:
                await connection.execute(
                    text("INSERT INTO services (name, name_key) VALUES (:n, :n)"), {"n": TOKEN}
                )
    finally:
        await engine.dispose()
    assert TOKEN not in str(caught.value)


async def test_a_proxy_host_holding_a_pasted_link_is_refused_without_echo(
    gql: GraphQLClient, everything_logged: pytest.LogCaptureFixture
) -> None:
    data = await gql(
        "mutation($input: CreateProxyInput!) { createProxy(input: $input) "
        "{ proxy { id } userErrors { field message } } }",
        input={
            "name": "pasted",
            "protocol": "HTTP",
            "host": f"http://user:{LINK_PASSWORD}@h.example.com",
            "port": 8080,
        },
    )
    errors = data["createProxy"]["userErrors"]
    assert [error["field"] for error in errors] == [["host"]]
    assert_hidden(LINK_PASSWORD, data, everything_logged)


@pytest.mark.parametrize(
    ("message", "expected"),
    [
        (
            "Variable '$input' has invalid value: Expected value of type 'In' not to include "
            "unknown field 'x'. Did you mean 'y'? Found: {'token': 'SECRET'}.",
            "Variable '$input' has invalid value: Expected value of type 'In' not to include "
            "unknown field 'x'. Did you mean 'y'?",
        ),
        (
            "Variable '$d' has invalid value at .at: Expected value of type 'DateTime', but "
            "encountered error 'Invalid isoformat string: \\'SECRET\\''; found: 'SECRET'.",
            "Variable '$d' has invalid value at .at: Expected value of type 'DateTime'.",
        ),
        (
            "Variable '$p' has invalid value at .protocol: Value 'SE'CRET' does not exist in "
            "'ProxyProtocol' enum.",
            "Variable '$p' has invalid value at .protocol: Value does not exist in "
            "'ProxyProtocol' enum.",
        ),
        (
            "Int cannot represent non 32-bit signed integer value: 99999999999SECRET",
            "Int cannot represent non 32-bit signed integer value.",
        ),
        (
            "Expected value of type 'String!', found [\"SECRET\"].",
            "Expected value of type 'String!'.",
        ),
        ("the command was not found in this runner", "the command was not found in this runner."),
        ("Cannot query field 'x' on type 'Query'.", "Cannot query field 'x' on type 'Query'."),
    ],
)
def test_error_messages_lose_their_values_and_keep_where_and_why(
    message: str, expected: str
) -> None:
    from graphql import GraphQLError

    from graphql_schema.errors import without_values

    assert without_values(GraphQLError(message)) == expected


def test_syntax_error_messages_lose_the_token_they_met() -> None:
    from graphql import GraphQLSyntaxError, Source

    from graphql_schema.errors import without_values

    for description, expected in [
        ("Expected ':', found String 'SECRET'.", "Expected ':', found String."),
        ("Unexpected Name 'SECRET'.", "Unexpected Name."),
        ("Expected Name, found <EOF>.", "Expected Name, found <EOF>."),
        ("Unterminated string.", "Unterminated string."),
    ]:
        error = GraphQLSyntaxError(Source("{ x }"), 1, description)
        assert without_values(error) == f"Syntax Error: {expected}"


async def test_a_token_sent_as_an_input_key_is_not_named_back(
    gql: GraphQLClient, everything_logged: pytest.LogCaptureFixture
) -> None:
    mistaken = {"name": "gh", "kind": "github", "envVar": "GH_T", TOKEN: "oops"}
    body = await gql.raw(CREATE_SERVICE, input=mistaken)
    assert "an unknown field" in body["errors"][0]["message"]
    assert_hidden(TOKEN, body, everything_logged)


@pytest.mark.parametrize("padding", [0, 40], ids=["few-secrets", "many-secrets"])
def test_the_redactor_masks_alike_with_few_or_many_secrets(padding: int) -> None:
    from runner.lines import MASK, Redactor

    others = [f"unrelated-secret-{i:03d}" for i in range(padding)]
    redact = Redactor(["abcdef12", "ef12xyz9", "tok/en+1", *others])
    texts = ["<abcdef12xyz9>", "a tok%2Fen%2B1 b tok/en+1", "abcdef12abcdef12", "clean"]
    assert redact.all(texts) == [f"<{MASK}>", f"a {MASK} b {MASK}", MASK + MASK, "clean"]
