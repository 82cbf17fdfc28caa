"""Issue 10, items 4 and 8: templates render off the event loop within a time and memory
limit, the sandbox refuses unbounded operators before they allocate, and a placeholder
inside the template's own quotes is refused when the template is saved or run."""

from __future__ import annotations

import asyncio
import os
import random
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import update
from starlette.applications import Starlette

from runner import renderpool
from runner.compose import literal_argv, render_argv
from runner.process import use_pidfd_child_watcher
from runner.renderpool import RenderPool
from runner.template_checks import SAFE_FORM, quoted_placeholder_problem
from runner.template_env import MAX_RENDERED, CompositionError
from server.app_services import AppServices
from server.models import Command
from server.settings import Settings
from tests.conftest import GraphQLClient
from tests.fixtures.auth import admin_client
from tests.fixtures.commands import run, wait_final, wait_status
from tests.fixtures.servers import running_server

RENDER_TIMEOUT = 1.0
MIB = 1024 * 1024
# Generous: the machine is shared and noisy. A render on the loop stalls it for seconds.
HEALTHZ_MAX_SECONDS = 0.75
REFUSED_WITHIN = RENDER_TIMEOUT + 4.0

COMPOSE = """
query($input: RunCommandInput!) {
  composeCommand(input: $input) { argv errors { field message code } }
}"""
RUN = """
mutation($input: RunCommandInput!) {
  runCommand(input: $input) { command { id } userErrors { field message code } }
}"""
CREATE_TEMPLATE = """
mutation($input: CreateCommandTemplateInput!) {
  createCommandTemplate(input: $input) {
    commandTemplate { id template } userErrors { field message code }
  }
}"""
UPDATE_TEMPLATE = """
mutation($input: UpdateCommandTemplateInput!) {
  updateCommandTemplate(input: $input) {
    commandTemplate { id template } userErrors { field message code }
  }
}"""


# --- the sandbox refuses unbounded operators before they run ----------------------------
# Sizes just over the limits: the old code built them (harmlessly small here) and the
# real bombs further down go through the worker, never this test process.


@pytest.mark.parametrize(
    "source",
    [
        "{{ ('a' * 300000)|length }}",
        "{{ (300000 * 'a')|length }}",
        "{{ ([1] * 300000)|length }}",
        "{{ ('a' * 200000 + 'b' * 200000)|length }}",
        "{{ (2 ** 70000) % 10 }}",
        "{{ (((2 ** 64) ** 64) ** 64) % 10 }}",  # the old exponent cap let chains grow
        "{{ ((2 ** 40000) * (2 ** 40000)) % 10 }}",
    ],
)
def test_unbounded_operators_are_refused_before_they_allocate(source: str) -> None:
    with pytest.raises(CompositionError, match=r"refused by the sandbox: .*(limit is|bits)"):
        render_argv(source, {})


@pytest.mark.parametrize(
    ("source", "argv"),
    [
        (
            "echo {{ 'ab' * 3 }} {{ 2 ** 10 }} {{ 6 * 7 }} {{ [1, 2] * 2 }}",
            ["echo", "ababab", "1024", "42", "[1, 2, 1, 2]"],
        ),
        ("echo {{ 'a' + 'b' }} {{ 1 + 2 }} {{ (2 ** 64) * 2 }}", ["echo", "ab", "3", str(2**65)]),
    ],
)
def test_ordinary_arithmetic_still_renders(source: str, argv: list[str]) -> None:
    assert render_argv(source, {}) == argv


def test_output_is_cut_off_while_it_is_generated() -> None:
    # Each piece is small; together they pass the cap: stopped at the cap, not built whole.
    source = "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}"
    with pytest.raises(CompositionError, match=f"longer than {MAX_RENDERED:,} characters"):
        render_argv(source, {})


# --- a source without template syntax is split without a worker ------------------------

LITERAL_ALPHABET = " \t\nab'\"\\{}%#$;\x00"
LITERAL_EDGES = [
    "",
    " ",
    "\n",
    "/bin/true",
    "/bin/true\n",
    "echo \\\n",  # ends in an escaped newline: Jinja drops the newline, so must this
    "echo 'a\n'\n\n",
    "echo 'open",
    'echo "a\\"b" c\\ d',
    "echo {a,b} } }} %} #} {",
    "echo \x00",
    "x" * MAX_RENDERED,
    "x" * (MAX_RENDERED + 1),
    "x" * MAX_RENDERED + "\n",
]


def _outcome(split: Any, source: str) -> Any:
    try:
        return split(source)
    except CompositionError as exc:
        return f"error: {exc}"


@pytest.mark.parametrize("source", LITERAL_EDGES)
def test_a_literal_source_splits_as_its_render_would(source: str) -> None:
    assert _outcome(literal_argv, source) == _outcome(lambda s: render_argv(s, {}), source)


def test_random_literal_sources_split_as_their_render_would() -> None:
    rng = random.Random(10)
    for _ in range(2000):
        source = "".join(rng.choices(LITERAL_ALPHABET, k=rng.randrange(12)))
        if any(opener in source for opener in ("{{", "{%", "{#")):
            assert literal_argv(source) is None, repr(source)
        else:
            rendered = _outcome(lambda s: render_argv(s, {}), source)
            assert _outcome(literal_argv, source) == rendered, repr(source)


@pytest.mark.parametrize(
    "source", ["echo {{ 1 }}", "echo {% if 1 %}x{% endif %}", "echo {# c #}x", "a\r\nb"]
)
def test_a_source_with_template_syntax_is_not_literal(source: str) -> None:
    assert literal_argv(source) is None


async def test_a_literal_source_needs_no_worker_a_template_does(pool: RenderPool) -> None:
    assert await pool.render("/bin/echo 'a b' c", {"params": {}}) == ["/bin/echo", "a b", "c"]
    with pytest.raises(CompositionError, match="does not split"):
        await pool.render("echo 'open", {})
    assert pool.pids == []
    assert await pool.render("echo {{ 'a b' }}", {}) == ["echo", "a b"]
    assert len(pool.pids) == 1
    # A template that never ends still meets the time limit in its worker.
    with pytest.raises(CompositionError, match=r"took longer than 1 s to render"):
        await pool.render(
            "{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}", {}
        )


# --- the pool: limits, replacement, overhead, shutdown ----------------------------------


@pytest.fixture
async def pool() -> AsyncIterator[RenderPool]:
    render_pool = RenderPool(2, RENDER_TIMEOUT, 256 * MIB)
    try:
        yield render_pool
    finally:
        await render_pool.close()


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            return stat.read().split(") ")[1][0] != "Z"
    except FileNotFoundError:
        return False


async def test_a_worker_that_overruns_is_killed_and_replaced(pool: RenderPool) -> None:
    assert await pool.render("echo {{ params.v }}", {"params": {"v": "a b"}}) == ["echo", "a b"]
    first = set(pool.pids)
    started = time.monotonic()
    with pytest.raises(CompositionError, match=r"took longer than 1 s to render"):
        await pool.render(
            "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}", {}
        )
    assert time.monotonic() - started < REFUSED_WITHIN
    assert not any(_alive(pid) for pid in first)
    assert await pool.render("echo {{ params.v }}", {"params": {"v": "c"}}) == ["echo", "c"]


async def test_memory_limit_refuses_what_the_sandbox_cannot_foresee(pool: RenderPool) -> None:
    with pytest.raises(CompositionError, match="used more than 256 MiB"):
        await pool.render("{{ 'a'|center(2000000000) }}", {})
    assert await pool.render("echo ok", {}) == ["echo", "ok"]


async def test_a_cancelled_render_does_not_answer_the_next_caller(pool: RenderPool) -> None:
    slow = "{% for a in range(3000) %}{% for b in range(3000) %}{% endfor %}{% endfor %}slow"
    pool.timeout_seconds = 30.0
    renders = [asyncio.create_task(pool.render(slow, {})) for _ in range(2)]
    await asyncio.sleep(0.3)
    for task in renders:
        task.cancel()
    await asyncio.gather(*renders, return_exceptions=True)
    assert await pool.render("echo {{ 1 }}", {}) == ["echo", "1"]


async def test_rendering_in_the_pool_costs_little(pool: RenderPool) -> None:
    source = "tool --profile {{ profile.dir }} -- {{ params.url }} {{ params.mode }}"
    context = {"profile": {"dir": "/p/1"}, "params": {"url": "https://x/?a b", "mode": "m"}}
    await pool.render(source, context)  # the first render starts a worker
    timings = []
    for _ in range(50):
        started = time.perf_counter()
        assert await pool.render(source, context) == render_argv(source, context)
        timings.append(time.perf_counter() - started)
    assert sorted(timings)[len(timings) // 2] < 0.02  # a warm worker: no process start


async def test_a_killed_worker_whose_exit_is_never_reported_is_reaped(
    pool: RenderPool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A child watcher replaced after a worker started (the benchmark's, by the one the
    Supervisor installs) drops the worker's exit: killing it must neither hang nor leave
    its slot taken (every later render waited forever)."""
    monkeypatch.setattr(renderpool, "KILL_WAIT_SECONDS", 0.3)
    watcher = asyncio.PidfdChildWatcher()
    watcher.attach_loop(asyncio.get_running_loop())
    asyncio.get_event_loop_policy().set_child_watcher(watcher)
    assert await pool.render("echo {{ 1 }}", {}) == ["echo", "1"]
    (worker,) = pool.pids
    with pytest.warns(RuntimeWarning, match="pending handlers"):
        use_pidfd_child_watcher()  # closes the old watcher: the worker's exit is lost
    async with asyncio.timeout(REFUSED_WITHIN + 5):
        with pytest.raises(CompositionError, match="took longer"):
            await pool.render(
                "{% for a in range(99999) %}{% for b in range(99999) %}{% endfor %}{% endfor %}", {}
            )
        assert not Path(f"/proc/{worker}").exists()  # killed and reaped, not a zombie
        assert await pool.render("echo {{ 2 }}", {}) == ["echo", "2"]


async def test_the_wait_for_a_free_worker_is_bounded(pool: RenderPool) -> None:
    pool.timeout_seconds = 0.5
    pool._starting = pool.size  # every slot taken, and none ever frees up
    started = time.monotonic()
    async with asyncio.timeout(5):  # unbounded, it would wait here forever
        with pytest.raises(CompositionError, match=r"no render worker was free within 0.5 s"):
            await pool.render("echo {{ 1 }}", {})
    assert 0.4 < time.monotonic() - started < 3
    pool._starting = 0
    assert await pool.render("echo {{ 1 }}", {}) == ["echo", "1"]


def test_workers_die_with_a_server_that_is_killed(tmp_path: Path) -> None:
    script = (
        "import asyncio, os\n"
        "from runner.renderpool import RenderPool\n"
        "LOOP = '{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}'\n"
        "async def main():\n"
        "    pool = RenderPool(1, 600.0, 256 * 1024 * 1024)\n"
        "    await pool.render('echo {{ 1 }}', {})  # a warm worker: a literal source starts none\n"
        "    busy = asyncio.create_task(pool.render(LOOP, {}))  # the worker reads no EOF now\n"
        "    await asyncio.sleep(0.5)\n"
        "    print(*pool.pids, flush=True)\n"
        "    os._exit(0)  # as a SIGKILL would: no cleanup at all\n"
        "asyncio.run(main())\n"
    )
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    done = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=60
    )
    pids = [int(pid) for pid in done.stdout.split()]
    assert pids, done.stderr
    deadline = time.monotonic() + 10
    while any(_alive(pid) for pid in pids) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(_alive(pid) for pid in pids)


# --- through the API, on both databases --------------------------------------------------


def _render_workers_of_this_process() -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            cmdline = (entry / "cmdline").read_bytes().split(b"\0")
            ppid = int((entry / "stat").read_text().split(") ")[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if b"runner.renderworker" in cmdline and ppid == os.getpid() and _alive(int(entry.name)):
            found.append(int(entry.name))
    return found


async def test_no_render_worker_survives_app_shutdown(settings: Settings) -> None:
    from server.app import create_app

    application = create_app(settings)
    async with application.router.lifespan_context(application):
        services: AppServices = application.state.services
        async with admin_client(application) as http:
            gql = GraphQLClient(http)
            data = await asyncio.gather(
                *(gql(COMPOSE, input={"commandString": f"echo {{{{ {i} }}}}"}) for i in range(4))
            )
        assert [d["composeCommand"]["argv"] for d in data] == [["echo", str(i)] for i in range(4)]
        pids = services.render_pool.pids
        assert pids
        assert set(pids) <= set(_render_workers_of_this_process())
    assert not any(_alive(pid) for pid in pids)
    assert _render_workers_of_this_process() == []


BOMBS = {
    "string-times": ("{{ 'a' * 2000000000 }}", "the limit is 262,144"),
    "list-times": ("{{ [1] * 10**9 }}", "the limit is 262,144"),
    # Jinja's ** binds left to right: `2 ** 10 ** 9` is (2 ** 10) ** 9, a small number.
    "power": ("{{ 2 ** (10 ** 9) }}", "would build an integer over"),
    "nested-loops": (
        "{% for a in range(100000) %}{% for b in range(100000) %}{% endfor %}{% endfor %}",
        "took longer than 1 s to render",
    ),
    "huge-output": (
        "{% for i in range(100000) %}{{ 'x' * 100000 }}{% endfor %}",
        "longer than 262,144 characters",
    ),
    "filter-memory": ("{{ 'a'|center(2000000000) }}", "used more than 256 MiB"),
}


async def _probe_healthz(http: httpx.AsyncClient, work: Awaitable[Any]) -> tuple[Any, float]:
    """Await `work` while /healthz is asked every 50 ms; its result and the slowest answer."""
    task = asyncio.ensure_future(work)
    slowest = 0.0
    while not task.done():
        started = time.monotonic()
        response = await http.get("/healthz")
        assert response.status_code == 200
        slowest = max(slowest, time.monotonic() - started)
        await asyncio.sleep(0.05)
    return task.result(), slowest


@pytest.mark.usefixtures("steady_heap")
@pytest.mark.parametrize("bomb", list(BOMBS))
async def test_render_bomb_is_refused_while_healthz_stays_fast(
    settings: Settings, bomb: str
) -> None:
    source, message = BOMBS[bomb]
    async with (
        running_server(settings, render_timeout_seconds=RENDER_TIMEOUT) as live,
        httpx.AsyncClient(base_url=live.base_url, headers=live.headers, timeout=60) as http,
    ):
        gql = GraphQLClient(http)
        started = time.monotonic()
        data, slowest = await _probe_healthz(http, gql(COMPOSE, input={"commandString": source}))
        took = time.monotonic() - started
        errors = data["composeCommand"]["errors"]
        assert [e["field"] for e in errors] == [["commandString"]]
        assert message in errors[0]["message"]
        assert took < REFUSED_WITHIN
        assert slowest < HEALTHZ_MAX_SECONDS
        # runCommand refuses it the same way and stores nothing; the server renders on.
        ran = (await gql(RUN, input={"commandString": source}))["runCommand"]
        assert ran["command"] is None
        assert message in ran["userErrors"][0]["message"]
        assert (await gql("{ commands { totalCount } }"))["commands"]["totalCount"] == 0
        composed = await gql(COMPOSE, input={"commandString": "echo {{ 6 * 7 }}"})
        assert composed["composeCommand"]["argv"] == ["echo", "42"]


@pytest.mark.usefixtures("steady_heap")
async def test_a_runner_stops_a_bomb_at_claim_time_while_healthz_stays_fast(
    settings: Settings,
) -> None:
    """A command is rendered again when a runner claims it (with its sidecar's URL)."""
    from runner.supervisor import Supervisor

    # Seconds of work on the old code; stopped at the limit here.
    bomb = "echo {% for a in range(2000) %}{% for b in range(2000) %}{% set c = a ~ b %}{% endfor %}{% endfor %}x"
    async with (
        running_server(
            settings, render_timeout_seconds=RENDER_TIMEOUT, embedded_runner=False
        ) as live,
        httpx.AsyncClient(base_url=live.base_url, headers=live.headers, timeout=60) as http,
    ):
        gql = GraphQLClient(http)
        command_id = await run(gql, commandString="echo queued")
        services: AppServices = live.app.state.services
        async with services.sessionmaker() as session:
            await session.execute(update(Command).values(source=bomb))
            await session.commit()
        supervisor = Supervisor(
            services.settings, services.sessionmaker, services.secret_box, services.broker
        )
        await supervisor.start()
        try:
            final, slowest = await _probe_healthz(http, wait_final(gql, command_id, timeout=60))
        finally:
            await supervisor.stop()
    assert final["status"] == "FAILED"
    assert final["error"] == "the template took longer than 1 s to render"
    assert slowest < HEALTHZ_MAX_SECONDS


# --- placeholders inside the template's own quotes --------------------------------------

QUOTED = [
    "sh -c 'echo {{ params.x }}'",
    'echo "{{ params.x }}"',
    '--flag="{{ params.x }}"',
    'sh -c "echo {{ params.x }}; id"',
    "sh -c 'echo {% if params.x %}{{ params.x }}{% endif %}'",
    "sh -c 'for v in {% for v in params.values %}{{ v }} {% endfor %}; do echo $v; done'",
    "echo \\{{ params.x }}",
    'echo "a\\"b {{ params.x }}"',
    "run \\\n  --a 1 \\\n  'x {{ params.x }}'",
]
UNQUOTED = [
    "--flag={{ params.x }}",
    "echo {{ params.x }}",
    SAFE_FORM,
    "python3 -c 'import sys; print(sys.argv[1:])' {{ params.x }}",
    "echo 'it'\"'\"'s' {{ params.x }}",
    "echo 'a\\' {{ params.x }}",
    'echo "a\\"b" {{ params.x }}',
    "echo {% raw %}'{{ x }}'{% endraw %} {{ params.x }}",
    "echo {# '{{ x }}' #} {{ params.x }}",
    "echo 'x'{{ params.x }}'y'",
    "echo '{% if params.x %}on{% endif %}' {{ params.x }}",
]


@pytest.mark.parametrize("source", QUOTED)
def test_a_quoted_placeholder_is_found(source: str) -> None:
    problem = quoted_placeholder_problem(source)
    assert problem is not None
    assert "sh -c 'echo \"$1\"' _ {{ " in problem
    with pytest.raises(CompositionError, match="undoes that"):
        render_argv(source, {"params": {"x": "$(id)", "values": ["a"]}})


@pytest.mark.parametrize("source", UNQUOTED)
def test_an_unquoted_placeholder_is_fine(source: str) -> None:
    assert quoted_placeholder_problem(source) is None
    argv = render_argv(source, {"params": {"x": "$(id) 'q'"}})
    assert "$(id) 'q'" in " ".join(argv)


def test_the_problem_names_the_line_and_the_placeholder() -> None:
    problem = quoted_placeholder_problem("run \\\n  --url {{ params.url }} \\\n  '{{ params.x }}'")
    assert problem is not None
    assert problem.startswith("line 3: the placeholder {{ params.x }} sits inside '...' quotes")
    assert problem.endswith("sh -c 'echo \"$1\"' _ {{ params.x }}")


async def test_a_quoted_placeholder_template_is_refused_at_save_time(gql: GraphQLClient) -> None:
    source = "sh -c 'echo {{ params.x }}'"
    params = [{"name": "x", "type": "string"}]
    created = await gql(
        CREATE_TEMPLATE, input={"name": "t", "template": source, "parameters": params}
    )
    payload = created["createCommandTemplate"]
    assert payload["commandTemplate"] is None
    [error] = payload["userErrors"]
    assert error["field"] == ["template"]
    assert error["code"] == "INVALID"
    assert "inside '...' quotes" in error["message"]
    assert "sh -c 'echo \"$1\"' _ {{ params.x }}" in error["message"]
    assert (await gql("{ commandTemplates { totalCount } }"))["commandTemplates"]["totalCount"] == 0

    good = await gql(
        CREATE_TEMPLATE, input={"name": "t", "template": SAFE_FORM, "parameters": params}
    )
    template_id = good["createCommandTemplate"]["commandTemplate"]["id"]
    updated = await gql(UPDATE_TEMPLATE, input={"id": template_id, "template": source})
    assert updated["updateCommandTemplate"]["commandTemplate"] is None
    assert (
        "sh -c 'echo \"$1\"' _ {{ params.x }}"
        in (updated["updateCommandTemplate"]["userErrors"][0]["message"])
    )
    composed = await gql(COMPOSE, input={"templateId": template_id, "params": {"x": "$(id)"}})
    assert composed["composeCommand"]["argv"] == ["sh", "-c", 'echo "$1"', "_", "$(id)"]


async def test_a_quoted_placeholder_command_string_is_refused(gql: GraphQLClient) -> None:
    source = "sh -c 'echo {{ params.x }}'"
    composed = await gql(COMPOSE, input={"commandString": source, "params": {"x": "$(id)"}})
    ran = await gql(RUN, input={"commandString": source, "params": {"x": "$(id)"}})
    for errors in (composed["composeCommand"]["errors"], ran["runCommand"]["userErrors"]):
        assert [e["field"] for e in errors] == [["commandString"]]
        assert "sh -c 'echo \"$1\"' _ {{ params.x }}" in errors[0]["message"]
    assert ran["runCommand"]["command"] is None


async def test_the_safe_form_passes_the_value_literally(gql: GraphQLClient) -> None:
    from tests.fixtures.commands import logs_of, texts

    command_id = await run(gql, commandString=SAFE_FORM, params={"x": "$(echo pwned)"})
    assert (await wait_final(gql, command_id))["status"] == "SUCCEEDED"
    assert texts(await logs_of(gql, command_id)) == ["$(echo pwned)"]


async def test_app_services_carry_the_pool(app: Starlette) -> None:
    services: AppServices = app.state.services
    assert services.render_pool.timeout_seconds == services.settings.render_timeout_seconds
    assert services.render_pool.memory_bytes == services.settings.render_memory_bytes


async def test_render_workers_outlive_the_commands_they_render(
    app: Starlette, gql: GraphQLClient
) -> None:
    """The runner is a child subreaper that kills what a finished command left outside its
    group; a render worker (in a session of its own, started by the server while the
    command ran) is not that, and stays up for the next command."""
    pool = app.state.services.render_pool
    running = await run(gql, commandString="sleep 0.5")
    await wait_status(gql, running, {"RUNNING"})
    # Workers started while the command runs: younger than its first process.
    await asyncio.gather(*(pool.render("true {{ n }}", {"n": n}) for n in range(4)))
    workers = pool.pids
    assert len(workers) == app.state.services.settings.render_workers
    finished = await wait_final(gql, running)
    assert finished["status"] == "SUCCEEDED", finished
    await asyncio.sleep(0.5)
    for pid in workers:
        os.kill(pid, 0)  # alive
    assert pool.pids == workers
