"""Composition: every value reaches the child as exactly one literal argument, no shell."""

from __future__ import annotations

import json
from typing import Any

import pytest

from runner.compose import render_argv
from runner.template_env import CompositionError
from runner.template_params import check_params
from tests.conftest import GraphQLClient

HOSTILE = [
    "a; touch /tmp/corral-pwned",
    "$(id)",
    "`id`",
    'it\'s "quoted"',
    "line1\nline2",
    "--help",
    "-rf",
    "żółw 🐢 ünïcödé",
    "",
    "  spaces  ",
    "*",
    "a\\b",
    "x > /tmp/corral-redirect",
]


@pytest.mark.parametrize("value", HOSTILE)
def test_value_is_one_literal_argument(value: str) -> None:
    argv = render_argv("echo {{ params.v }} end", {"params": {"v": value}})
    assert argv == ["echo", value, "end"]


def test_numbers_and_booleans_render_plainly() -> None:
    argv = render_argv("run {{ params.n }} {{ params.b }}", {"params": {"n": 3, "b": True}})
    assert argv == ["run", "3", "true"]


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ cycler.__init__.__globals__ }}",
        "{{ params.__class__ }}",
        "{{ 2 ** 100000000 }}",
    ],
)
def test_sandbox_escapes_are_refused(source: str) -> None:
    with pytest.raises(CompositionError, match="sandbox"):
        render_argv(source, {"params": {}})


def test_unknown_variable_is_an_error_not_empty() -> None:
    with pytest.raises(CompositionError, match="unknown variable"):
        render_argv("echo {{ params.missing }}", {"params": {}})
    with pytest.raises(CompositionError, match="unknown variable"):
        render_argv("echo {{ nothing }}", {})


def test_unbalanced_literal_quote_is_an_error() -> None:
    with pytest.raises(CompositionError, match="does not split"):
        render_argv("echo 'unterminated", {})


def test_nul_in_a_value_is_an_error() -> None:
    with pytest.raises(CompositionError, match="NUL"):
        render_argv("echo {{ params.v }}", {"params": {"v": "a\x00b"}})


def test_empty_command_is_an_error() -> None:
    with pytest.raises(CompositionError, match="empty"):
        render_argv("{# nothing #}", {})


def test_loops_over_services() -> None:
    services = [{"name": "GitHub", "env_var": "GITHUB_TOKEN"}, {"name": "Open AI", "env_var": "K"}]
    argv = render_argv(
        "tool {% for s in services %}--service {{ s.name }} {% endfor %}", {"services": services}
    )
    assert argv == ["tool", "--service", "GitHub", "--service", "Open AI"]


DECLARED: list[dict[str, Any]] = [
    {"name": "url", "type": "string", "required": True, "default": None},
    {"name": "count", "type": "int", "required": False, "default": 3},
    {"name": "headed", "type": "bool", "required": False, "default": False},
    {"name": "mode", "type": "choice", "choices": ["fast", "slow"], "default": "fast"},
]


def test_params_get_defaults() -> None:
    checked = check_params(DECLARED, {"url": "http://x"})
    assert checked.problems == []
    assert checked.values == {"url": "http://x", "count": 3, "headed": False, "mode": "fast"}


@pytest.mark.parametrize(
    ("given", "name"),
    [
        ({}, "url"),
        ({"url": 5}, "url"),
        ({"url": "x", "count": "3"}, "count"),
        ({"url": "x", "count": True}, "count"),
        ({"url": "x", "headed": "yes"}, "headed"),
        ({"url": "x", "mode": "medium"}, "mode"),
        ({"url": "x", "extra": 1}, "extra"),
    ],
)
def test_bad_params_are_reported(given: dict[str, Any], name: str) -> None:
    problems = check_params(DECLARED, given).problems
    assert [p.name for p in problems] == [name]


# --- through the API -----------------------------------------------------------------

ECHO_ARGS = "python3 -c 'import json,sys; print(json.dumps(sys.argv[1:]))'"

CREATE_TEMPLATE = """
mutation($input: CreateCommandTemplateInput!) {
  createCommandTemplate(input: $input) { commandTemplate { id } userErrors { field message } }
}"""
COMPOSE = """
query($input: RunCommandInput!) {
  composeCommand(input: $input) { argv env errors { field message code } }
}"""
RUN = """
mutation($input: RunCommandInput!) {
  runCommand(input: $input) { command { id status argv } userErrors { field message code } }
}"""


async def make_template(gql: GraphQLClient, template: str, parameters: list[Any]) -> str:
    data = await gql(
        CREATE_TEMPLATE,
        input={"name": "t", "template": template, "parameters": parameters},
    )
    assert data["createCommandTemplate"]["userErrors"] == []
    return str(data["createCommandTemplate"]["commandTemplate"]["id"])


async def test_compose_command_previews_without_running(gql: GraphQLClient) -> None:
    template_id = await make_template(
        gql, ECHO_ARGS + " {{ params.v }}", [{"name": "v", "type": "string"}]
    )
    data = await gql(COMPOSE, input={"templateId": template_id, "params": {"v": "$(id)"}})
    composed = data["composeCommand"]
    assert composed["errors"] == []
    assert composed["argv"][-1] == "$(id)"
    listed = await gql("{ commands { totalCount } }")
    assert listed["commands"]["totalCount"] == 0


@pytest.mark.parametrize(
    ("params", "field"),
    [
        ({}, ["params", "v"]),
        ({"v": 1}, ["params", "v"]),
        ({"v": "x", "nope": 1}, ["params", "nope"]),
    ],
)
async def test_run_command_rejects_bad_params(
    gql: GraphQLClient, params: dict[str, Any], field: list[str]
) -> None:
    template_id = await make_template(
        gql, "echo {{ params.v }}", [{"name": "v", "type": "string", "required": True}]
    )
    data = await gql(RUN, input={"templateId": template_id, "params": params})
    errors = data["runCommand"]["userErrors"]
    assert data["runCommand"]["command"] is None
    assert [e["field"] for e in errors] == [field]
    assert (await gql("{ commands { totalCount } }"))["commands"]["totalCount"] == 0


@pytest.mark.parametrize(
    ("command_string", "message"),
    [
        ("echo {{ params.undefined_thing }}", "unknown variable"),
        ("echo {{ ''.__class__.__mro__ }}", "sandbox"),
        ("echo {{ cycler.__init__.__globals__ }}", "sandbox"),
        ("echo {{ ", "parse"),
        ("   ", "blank"),
        ("printf 'a\x00b'", "NUL"),
    ],
)
async def test_ad_hoc_command_errors_are_user_errors(
    gql: GraphQLClient, command_string: str, message: str
) -> None:
    data = await gql(RUN, input={"commandString": command_string})
    errors = data["runCommand"]["userErrors"]
    assert len(errors) == 1
    assert errors[0]["field"] == ["commandString"]
    assert message in errors[0]["message"]


async def test_template_and_command_string_are_exclusive(gql: GraphQLClient) -> None:
    template_id = await make_template(gql, "echo hi", [])
    both = await gql(RUN, input={"templateId": template_id, "commandString": "echo"})
    neither = await gql(RUN, input={})
    for data in (both, neither):
        assert data["runCommand"]["userErrors"][0]["field"] == ["templateId"]


async def test_hostile_values_reach_the_child_literally(gql: GraphQLClient) -> None:
    from tests.fixtures.commands import logs_of, wait_final

    template_id = await make_template(
        gql,
        ECHO_ARGS + " {% for v in params.values %}{{ v }} {% endfor %}",
        [{"name": "values", "type": "string", "required": False}],
    )
    # A JSON list goes in through an ad-hoc command (templates type their parameters).
    del template_id
    data = await gql(
        RUN,
        input={
            "commandString": ECHO_ARGS + " {% for v in params['values'] %}{{ v }} {% endfor %}",
            "params": {"values": HOSTILE},
        },
    )
    command_id = data["runCommand"]["command"]["id"]
    final = await wait_final(gql, command_id)
    assert final["status"] == "SUCCEEDED", final
    stdout = [line["text"] for line in await logs_of(gql, command_id) if line["stream"] == "STDOUT"]
    assert json.loads(stdout[0]) == HOSTILE


# --- the preview of a proxied run (issue 12, item 7) ----------------------------------

UPSTREAM_PASSWORD = "Upstream-Pa55-never-shown"
SIDECAR_NOTE = (
    "The run goes through a local sidecar (socks5://127.0.0.1:<sidecar>, CORRAL_PROXY_URL) "
    "on a port picked at start; it forwards to proxy 'exit' (chain: sidecar → 'entry' → 'exit')."
)


async def proxied_profile(gql: GraphQLClient) -> str:
    """A profile whose default proxy 'exit' (with credentials) is dialed through 'entry'."""
    create = """mutation($input: CreateProxyInput!) {
      createProxy(input: $input) { proxy { id } userErrors { field message } } }"""
    via: str | None = None
    for name, port in (("entry", 1081), ("exit", 3128)):
        values = {"name": name, "protocol": "http", "host": "192.0.2.10", "port": port}
        values |= {"username": f"{name}-user", "password": UPSTREAM_PASSWORD}
        data = await gql(create, input=values | ({"viaId": via} if via else {}))
        assert data["createProxy"]["userErrors"] == []
        via = data["createProxy"]["proxy"]["id"]
    profile = await gql('mutation { createProfile(input: {name: "p"}) { profile { id } } }')
    profile_id = str(profile["createProfile"]["profile"]["id"])
    attached = await gql(
        """mutation($p: ID!, $x: ID!) { attachProxy(input: {profileId: $p, proxyId: $x,
        isDefault: true}) { userErrors { message } } }""",
        p=profile_id,
        x=via,
    )
    assert attached["attachProxy"]["userErrors"] == []
    return profile_id


async def test_preview_shows_the_sidecar_the_run_uses_and_says_so(gql: GraphQLClient) -> None:
    profile_id = await proxied_profile(gql)
    query = "query($input: RunCommandInput!) { composeCommand(input: $input) { argv env note errors { message } } }"
    command = "curl --proxy {{ proxy.url }} --url https://example.org/{{ proxy.name }}"

    data = await gql(query, input={"commandString": command, "profileId": profile_id})

    composed = data["composeCommand"]
    assert composed["errors"] == []
    assert composed["argv"] == [
        "curl",
        "--proxy",
        "socks5://127.0.0.1:<sidecar>",
        "--url",
        "https://example.org/exit",
    ]
    assert composed["env"] == ["CORRAL_PROXY_URL"]
    assert composed["note"] == SIDECAR_NOTE
    answer = json.dumps(data)
    for upstream in (UPSTREAM_PASSWORD, "exit-user", "192.0.2.10"):
        assert upstream not in answer
    # Without a proxy there is nothing to say.
    plain = await gql(query, input={"commandString": "echo hi"})
    assert plain["composeCommand"]["note"] is None
