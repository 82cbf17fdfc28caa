"""Runners as first-class objects (issue 14): registration, heartbeats, `runners`, the
dashboard's Runners section, and profile affinity by runner name or label."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from sqlalchemy import select
from starlette.applications import Starlette

from runner.supervisor import Supervisor
from server import __version__
from server.app import create_app
from server.app_services import AppServices
from server.models import Runner
from server.runners import no_runner_reason
from server.settings import Settings
from tests.conftest import GraphQLClient
from tests.fixtures.auth import admin_client, bearer, issue_api_token
from tests.fixtures.commands import command, logs_of, run, texts, wait_final, wait_status
from tests.fixtures.runners import ROOT, runner_process

LEASE = 0.6  # heartbeat every 0.2 s; alive while the last one is within 1.8 s
RUNNERS = """query($all: Boolean! = false) { runners(includeStopped: $all) {
  name labels version host maxConcurrency startedAt lastHeartbeatAt stoppedAt running alive
} }"""
PROFILE = """mutation($name: String!, $affinity: String) {
  createProfile(input: {name: $name, runnerAffinity: $affinity}) { profile { id } }
}"""
ON_POSTGRES = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"lease_seconds": LEASE, "runner_name": "main-box"})


def extra_runner(app: Starlette, settings: Settings, **update: Any) -> Supervisor:
    """A second supervisor in this process, on the app's database and broker."""
    services: AppServices = app.state.services
    return Supervisor(
        settings.model_copy(update=update),
        services.sessionmaker,
        services.secret_box,
        services.broker,
    )


async def eventually(check: Callable[[], Awaitable[Any]], timeout: float = 15.0) -> Any:
    """`check()`'s first truthy value (polled: the test's own watch)."""
    deadline = time.monotonic() + timeout
    while not (value := await check()):
        assert time.monotonic() < deadline, "never happened"
        await asyncio.sleep(0.05)
    return value


async def runners_of(gql: GraphQLClient, everyone: bool = False) -> dict[str, dict[str, Any]]:
    data = await gql(RUNNERS, all=everyone)
    return {runner["name"]: runner for runner in data["runners"]}


async def pinned_profile(gql: GraphQLClient, name: str, affinity: str) -> str:
    data = await gql(PROFILE, name=name, affinity=affinity)
    return str(data["createProfile"]["profile"]["id"])


# -- pure ------------------------------------------------------------------------------------


def test_the_reason_names_the_runner_or_the_label_and_none_when_one_is_alive() -> None:
    alive = [("box-a", ["eu"]), ("box-b", ["gpu", "eu"])]
    assert no_runner_reason("box-b", alive) is None
    assert no_runner_reason("label:gpu", alive) is None
    assert no_runner_reason("box-c", alive) == "waiting for a runner named 'box-c' (none alive)"
    assert (
        no_runner_reason("label:arm", alive) == "waiting for a runner labelled 'arm' (none alive)"
    )
    assert no_runner_reason("gpu", alive) is not None  # a label is not a name


def test_labels_come_comma_separated_without_blanks_or_repeats() -> None:
    settings = Settings(runner_labels=" gpu, eu,,gpu ")
    assert settings.resolved_runner_labels == ["gpu", "eu"]
    assert Settings().resolved_runner_labels == []


# -- in one process, both databases ------------------------------------------------------------


async def test_a_runner_registers_heartbeats_and_is_flagged_once_its_heartbeat_stops(
    app: Starlette, gql: GraphQLClient, settings: Settings
) -> None:
    second = extra_runner(app, settings, runner_name="gpu-box", runner_labels="gpu,eu")
    await second.start()
    try:
        runners = await runners_of(gql)
        assert set(runners) == {"main-box", "gpu-box"}
        gpu = runners["gpu-box"]
        assert gpu["labels"] == ["gpu", "eu"]
        assert gpu["version"] == __version__
        assert gpu["maxConcurrency"] == settings.max_concurrency
        assert gpu["alive"] is True
        assert gpu["stoppedAt"] is None
        assert gpu["running"] == 0
        first_beat = gpu["lastHeartbeatAt"]

        async def beat_again() -> bool:
            return bool((await runners_of(gql))["gpu-box"]["lastHeartbeatAt"] != first_beat)

        await eventually(beat_again)
        # Its lease loop goes (the process paused, or cut off): it stops heartbeating.
        assert second._task is not None
        second._task.cancel()

        async def flagged() -> bool:
            return (await runners_of(gql))["gpu-box"]["alive"] is False

        await eventually(flagged)
        assert (await runners_of(gql))["main-box"]["alive"] is True
        # The dashboard flags it.
        page = (await gql.http.get("/")).text
        assert 'id="runners-h"' in page
        row = page[page.index('class="runner-lost"') :]
        assert "gpu-box" in row[: row.index("</tr>")]
        assert "heartbeat stopped" in row[: row.index("</tr>")]
    finally:
        await second.stop()
    # A clean stop: out of the list, shown with its stop when asked for.
    assert set(await runners_of(gql)) == {"main-box"}
    stopped = (await runners_of(gql, everyone=True))["gpu-box"]
    assert stopped["stoppedAt"] is not None
    assert stopped["alive"] is False


async def test_a_viewer_reads_the_runners(app: Starlette) -> None:
    token = await issue_api_token(app, role="viewer")
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(
        transport=transport, base_url="http://localhost", headers=bearer(token)
    ) as http:
        runners = await runners_of(GraphQLClient(http))
    assert runners["main-box"]["alive"] is True


async def test_a_restart_replaces_the_stopped_row_of_the_same_runner(
    app: Starlette, settings: Settings
) -> None:
    for _ in range(2):
        again = extra_runner(app, settings, runner_name="again")
        await again.start()
        await again.stop()
    async with app.state.services.sessionmaker() as session:
        rows = list(await session.scalars(select(Runner).where(Runner.name == "again")))
    assert len(rows) == 1
    assert rows[0].stopped_at is not None


async def test_a_pinned_command_waits_with_the_reason_then_runs_on_the_matching_runner(
    app: Starlette, gql: GraphQLClient, settings: Settings, tmp_path: Path
) -> None:
    by_label = await pinned_profile(gql, "needs-gpu", "label:gpu")
    by_name = await pinned_profile(gql, "on-gpu-box", "gpu-box")
    anywhere = await run(gql, commandString="true")
    labelled = await run(gql, commandString="pwd", profileId=by_label)
    named = await run(gql, commandString="pwd", profileId=by_name)
    assert (await wait_final(gql, anywhere))["status"] == "SUCCEEDED"
    waiting = await wait_status(gql, labelled, {"WAITING"})
    assert waiting["waitReason"] == "waiting for a runner labelled 'gpu' (none alive)"
    waiting = await wait_status(gql, named, {"WAITING"})
    assert waiting["waitReason"] == "waiting for a runner named 'gpu-box' (none alive)"
    await asyncio.sleep(LEASE)  # a few lease passes: main-box still leaves them alone
    assert (await command(gql, labelled))["status"] == "WAITING"

    workspace = tmp_path / "gpu-work"
    second = extra_runner(
        app, settings, runner_name="gpu-box", runner_labels="gpu", workspace_dir=workspace
    )
    await second.start()
    try:
        for command_id in (labelled, named):
            final = await wait_final(gql, command_id)
            assert final["status"] == "SUCCEEDED", final
            assert final["waitReason"] is None
            # It ran in gpu-box's workspace: gpu-box ran it.
            (cwd,) = texts(await logs_of(gql, command_id))
            assert Path(cwd).is_relative_to(workspace), cwd
    finally:
        await second.stop()


async def test_a_pinned_command_hears_why_it_waits_before_the_next_lease_pass(
    settings: Settings,
) -> None:
    slow = settings.model_copy(update={"lease_seconds": 30.0})  # first lease pass at 10 s
    application = create_app(slow)
    async with application.router.lifespan_context(application), admin_client(application) as http:
        gql = GraphQLClient(http)
        profile = await pinned_profile(gql, "on-other", "other-box")
        command_id = await run(gql, commandString="true", profileId=profile)
        waiting = await wait_status(gql, command_id, {"WAITING"}, timeout=3)
        assert waiting["waitReason"] == "waiting for a runner named 'other-box' (none alive)"


# -- processes (PostgreSQL) ----------------------------------------------------------------------


@ON_POSTGRES
async def test_a_runner_process_runs_its_label_and_is_flagged_when_killed(
    app: Starlette, gql: GraphQLClient, settings: Settings, tmp_path: Path
) -> None:
    profile = await pinned_profile(gql, "needs-gpu", "label:gpu")
    async with runner_process(
        settings,
        tmp_path,
        "--name",
        "gpu-proc",
        "--label",
        "gpu",
        "--label",
        "eu",
        exits=(-signal.SIGKILL,),
        lease_seconds=str(LEASE),
    ) as process:
        runner = (await runners_of(gql))["gpu-proc"]
        assert runner["labels"] == ["gpu", "eu"]
        assert runner["alive"] is True
        first = await run(gql, commandString="pwd", profileId=profile)
        assert (await wait_final(gql, first))["status"] == "SUCCEEDED"
        (cwd,) = texts(await logs_of(gql, first))
        assert Path(cwd).is_relative_to(tmp_path / "runner-work"), cwd
        process.kill()
        await process.wait()

        async def flagged() -> bool:
            return (await runners_of(gql))["gpu-proc"]["alive"] is False

        await eventually(flagged)
        second = await run(gql, commandString="pwd", profileId=profile)
        waiting = await wait_status(gql, second, {"WAITING"})
        assert waiting["waitReason"] == "waiting for a runner labelled 'gpu' (none alive)"


# -- bad input -----------------------------------------------------------------------------------


async def test_an_affinity_of_a_bare_label_prefix_is_a_user_error(gql: GraphQLClient) -> None:
    data = await gql(
        """mutation { createProfile(input: {name: "p", runnerAffinity: "label: "}) {
          profile { id } userErrors { field message } } }"""
    )
    payload = data["createProfile"]
    assert payload["profile"] is None
    (error,) = payload["userErrors"]
    assert error["field"] == ["runnerAffinity"]
    assert "names no label" in error["message"]


def test_a_too_long_label_is_a_one_line_cli_error(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "runner", "--label", "x" * 300],
        cwd=tmp_path,
        env={**env, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.returncode != 0
    assert done.stderr.strip().splitlines() == [
        "corral: error: invalid setting CORRAL_RUNNER_LABELS: Value error, a label is at most 194 "
        "characters"
    ], done.stderr
