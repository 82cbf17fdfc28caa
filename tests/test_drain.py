"""Graceful drain (issue 14): SIGTERM to `corral runner` (or `corral serve`), and
`corral runner --drain` from anywhere, stop the claims at once, let running commands finish
up to CORRAL_DRAIN_SECONDS, then stop the rest (their process groups) and put them back
without the attempt counting; another runner hears the re-queue by NOTIFY."""

from __future__ import annotations

import asyncio
import os
import signal
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pytest

from server.app import create_app
from server.settings import Settings
from tests.conftest import TEST_KEY, GraphQLClient
from tests.fixtures.auth import admin_client
from tests.fixtures.commands import command, logs_of, run, texts, wait_final
from tests.fixtures.processes import CORRAL_BIN, free_port, stop, wait_for_http
from tests.fixtures.runners import ROOT, runner_process
from tests.test_runners import eventually
from tests.test_supervisor import alive

ON_POSTGRES = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
# The runners' safety-net look at the queue is out of reach: only a NOTIFY wakes them.
NO_POLL = "600"  # claim_poll_seconds: the runner never polls; NOTIFY alone wakes it
RUNNERS = """query { runners(includeStopped: true) { name alive draining stoppedAt } }"""


@pytest.fixture
def settings(settings: Settings) -> Settings:
    """No embedded runner: the test's `corral runner` processes run the commands."""
    return settings.model_copy(update={"embedded_runner": False})


async def runners_of(gql: GraphQLClient) -> dict[str, dict[str, Any]]:
    return {runner["name"]: runner for runner in (await gql(RUNNERS))["runners"]}


async def wait_line(gql: GraphQLClient, command_id: str, text: str) -> None:
    async def printed() -> bool:
        return text in texts(await logs_of(gql, command_id))

    await eventually(printed, timeout=30)


async def corral(settings: Settings, tmp_path: Path, *args: str) -> tuple[int, str]:
    """`corral ARGS` on the test's database: its exit status and what it printed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env |= {
        "PYTHONPATH": str(ROOT),
        "CORRAL_DATABASE_URL": str(settings.database_url),
        "CORRAL_SECRET_KEY": TEST_KEY,
        "CORRAL_DATA_DIR": str(tmp_path / "cli"),
    }
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "server.cli", *args),
        env=env,
        cwd=tmp_path,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)
    assert process.returncode is not None
    return process.returncode, output.decode()


@ON_POSTGRES
async def test_sigterm_lets_a_running_command_finish_and_claims_nothing_more(
    app: Any, gql: GraphQLClient, settings: Settings, tmp_path: Path
) -> None:
    async with runner_process(
        settings, tmp_path, "--name", "drain-a", drain_seconds="30", claim_poll_seconds=NO_POLL
    ) as runner:
        first = await run(gql, commandString="sh -c 'echo begun; sleep 3; echo done'")
        await wait_line(gql, first, "begun")
        runner.send_signal(signal.SIGTERM)

        async def draining() -> bool:
            return bool((await runners_of(gql))["drain-a"]["draining"])

        await eventually(draining)
        # Queued while it drains: a runner that still claimed would take it at once.
        second = await run(gql, commandString="echo never")
        assert (await wait_final(gql, first))["status"] == "SUCCEEDED"
        await asyncio.wait_for(runner.wait(), 30)
    assert texts(await logs_of(gql, first)) == ["begun", "done"]
    left = await command(gql, second)
    assert (left["status"], left["attempts"]) == ("QUEUED", 0)
    stopped = (await runners_of(gql))["drain-a"]
    assert stopped["stoppedAt"] is not None
    assert stopped["alive"] is False


@ON_POSTGRES
async def test_a_command_past_the_deadline_is_stopped_and_put_back_uncounted_for_another_runner(
    app: Any, gql: GraphQLClient, settings: Settings, tmp_path: Path
) -> None:
    marker, pids = tmp_path / "ran-once", tmp_path / "pids"
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    script = (
        f"if [ -e {marker} ]; then echo second; exit 0; fi; touch {marker}; "
        f"sleep 60 & echo $$ $! > {pids}; echo begun; wait"
    )
    async with runner_process(
        settings, tmp_path / "a", "--name", "drain-a", drain_seconds="1", claim_poll_seconds=NO_POLL
    ) as first_runner:
        command_id = await run(gql, commandString=f"sh -c '{script}'", maxAttempts=1)
        await wait_line(gql, command_id, "begun")
        group = [int(pid) for pid in pids.read_text().split()]
        # Another runner, idle: nothing is queued as it starts, and it never polls.
        async with runner_process(
            settings, tmp_path / "b", "--name", "drain-b", claim_poll_seconds=NO_POLL
        ) as second_runner:
            first_runner.send_signal(signal.SIGTERM)
            await asyncio.wait_for(first_runner.wait(), 30)
            assert not [pid for pid in group if alive(pid)]  # the group is gone, no orphan
            done = await wait_final(gql, command_id)
            assert second_runner.returncode is None
    assert (done["status"], done["attempts"], done["uncountedAttempts"]) == ("SUCCEEDED", 2, 1)
    assert done["maxAttempts"] == 1  # what the user asked for is unchanged
    lines = await logs_of(gql, command_id)
    assert texts(lines) == ["begun", "second"]
    system = texts(lines, "SYSTEM")
    assert "the runner is shutting down: stopping the process group" in system
    assert any("not counted against it" in line for line in system), system
    runners = await runners_of(gql)
    assert runners["drain-a"]["stoppedAt"] is not None


@ON_POSTGRES
async def test_corral_runner_drain_asks_a_runner_elsewhere_by_name(
    app: Any, gql: GraphQLClient, settings: Settings, tmp_path: Path
) -> None:
    async with runner_process(
        settings, tmp_path, "--name", "drain-c", drain_seconds="30", claim_poll_seconds=NO_POLL
    ) as runner:
        command_id = await run(gql, commandString="sh -c 'echo begun; sleep 2; echo done'")
        await wait_line(gql, command_id, "begun")
        code, output = await corral(settings, tmp_path, "runner", "--drain", "--name", "drain-c")
        assert code == 0, output
        assert (await command(gql, command_id))["status"] == "SUCCEEDED"  # it waited
        await asyncio.wait_for(runner.wait(), 30)
    assert "asked 1 runner(s) named 'drain-c' to drain" in output
    assert "has stopped" in output
    assert (await runners_of(gql))["drain-c"]["stoppedAt"] is not None


@ON_POSTGRES
async def test_draining_an_unknown_runner_is_a_one_line_error(
    app: Any, settings: Settings, tmp_path: Path
) -> None:
    code, output = await corral(settings, tmp_path, "runner", "--drain", "--name", "nobody")
    assert code == 1
    assert output.strip().splitlines()[-1] == (
        "corral: error: no runner named 'nobody' is alive (see GraphQL `runners`)"
    )


async def test_a_second_signal_stops_the_drain_at_once_and_puts_the_command_back(
    settings: Settings,
) -> None:
    application = create_app(
        settings.model_copy(update={"embedded_runner": True, "drain_seconds": 600})
    )
    async with (
        application.router.lifespan_context(application),
        admin_client(application) as http,
    ):
        gql = GraphQLClient(http)
        command_id = await run(gql, commandString="sh -c 'echo begun; sleep 600'")
        await wait_line(gql, command_id, "begun")
        supervisor = application.state.supervisor
        supervisor.on_shutdown_signal()

        async def draining() -> bool:
            return bool((await runners_of(gql))[supervisor.name]["draining"])

        await eventually(draining)
        assert (await command(gql, command_id))["status"] == "RUNNING"  # still let run
        supervisor.on_shutdown_signal()
        await asyncio.wait_for(supervisor.stopped.wait(), 60)  # not the drain's 600 s
        node = await command(gql, command_id)
    assert (node["status"], node["attempts"], node["uncountedAttempts"]) == ("QUEUED", 1, 1)
    assert "interrupted by a runner shutdown" in node["waitReason"]


def test_serve_drains_its_embedded_runner_on_sigterm(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env |= {"PYTHONPATH": str(ROOT), "CORRAL_SANDBOX": "none", "CORRAL_SCHEDULES": "false"}
    token = subprocess.run(
        [str(CORRAL_BIN), "token", "create", "--name", "t", "--role", "admin"],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.strip()
    port = free_port()
    serve = subprocess.Popen(
        [str(CORRAL_BIN), "serve", "--port", str(port)],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        wait_for_http(f"{base}/healthz", serve)
        query = """mutation { runCommand(input: {commandString:
          "sh -c 'echo begun; sleep 2; echo done'"}) { command { id } } }"""
        headers = {"Authorization": f"Bearer {token}"}
        body = httpx.post(f"{base}/graphql", json={"query": query}, headers=headers).json()
        assert body["data"]["runCommand"]["command"]["id"], body
        database = tmp_path / ".corral" / "corral.db"
        _wait_for_row(database, "SELECT 1 FROM log_lines WHERE text = 'begun'")
        serve.send_signal(signal.SIGTERM)  # one: a second would stop the command at once
        output, _ = serve.communicate(timeout=30)
        code = serve.returncode
    finally:
        stop(serve)
    assert code in (0, -signal.SIGTERM), output
    with sqlite3.connect(database) as connection:
        status = connection.execute("SELECT status FROM commands").fetchone()[0]
        lines = [row[0] for row in connection.execute("SELECT text FROM log_lines")]
    assert status == "SUCCEEDED", output
    assert "done" in lines


def _wait_for_row(database: Path, query: str, timeout: float = 30.0) -> None:
    async def found() -> bool:
        with sqlite3.connect(database) as connection:
            return connection.execute(query).fetchone() is not None

    asyncio.run(eventually(found, timeout))
