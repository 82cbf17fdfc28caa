"""After `kill -9` of `corral serve` and a restart, no command stays RUNNING or leaves processes."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from typing import Any

import httpx
import pytest

from server.settings import Settings
from tests.conftest import TEST_KEY
from tests.fixtures.processes import CORRAL_BIN, cli_token, free_port, stop, wait_for_http
from tests.test_supervisor import SLEEPERS, alive, wait_processes

RUN = """mutation($input: RunCommandInput!) { runCommand(input: $input) {
  command { id } userErrors { message } } }"""
NODE = """query($id: ID!) { node(id: $id) { ... on Command {
  status attempts maxAttempts uncountedAttempts error logs { text } } } }"""


class Server:
    """A real `corral serve` process on the test's database."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.process: subprocess.Popen[str] | None = None
        self.token: str | None = None
        self.extra_env: dict[str, str] = {}

    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
        env.update(
            CORRAL_DATA_DIR=str(self.settings.data_dir),
            CORRAL_SECRET_KEY=TEST_KEY,
            CORRAL_KILL_GRACE_SECONDS="0.5",
            CORRAL_LEASE_SECONDS="2",
            CORRAL_LOG_LEVEL="warning",
        )
        env.update(self.extra_env)
        if not self.settings.is_embedded:
            env["CORRAL_DATABASE_URL"] = self.settings.resolved_database_url
        return env

    def start(self) -> None:
        if self.token is None:  # made as an operator would, before the first start
            self.token = cli_token(self.settings.data_dir, self.env())
        self.process = subprocess.Popen(
            [str(CORRAL_BIN), "serve", "--port", str(self.port)],
            env=self.env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        wait_for_http(f"{self.base}/readyz", self.process)

    def kill9(self) -> None:
        assert self.process is not None
        os.kill(self.process.pid, signal.SIGKILL)
        self.process.communicate(timeout=10)

    def gql(self, query: str, **variables: Any) -> dict[str, Any]:
        response = httpx.post(
            f"{self.base}/graphql",
            json={"query": query, "variables": variables},
            headers={"Authorization": f"Bearer {self.token}"},
            timeout=10,
        )
        body: dict[str, Any] = response.json()
        assert "errors" not in body, body
        data: dict[str, Any] = body["data"]
        return data

    def node(self, command_id: str) -> dict[str, Any]:
        node: dict[str, Any] = self.gql(NODE, id=command_id)["node"]
        return node


@pytest.fixture
def server(settings: Settings) -> Iterator[Server]:
    instance = Server(settings)
    yield instance
    if instance.process is not None:
        stop(instance.process)


def wait_until(predicate: Any, what: str, timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


@pytest.mark.parametrize(
    ("max_attempts", "runner_losses", "after"),
    [(1, 2, "RUNNING"), (1, 0, "FAILED"), (2, 0, "RUNNING")],
)
async def test_kill9_then_restart_recovers_the_command(
    server: Server, max_attempts: int, runner_losses: int, after: str
) -> None:
    # A runner's death is not the command's fault: up to CORRAL_MAX_RUNNER_LOSSES times it
    # is queued again without the attempt counting; after that, the attempt counts.
    server.extra_env["CORRAL_MAX_RUNNER_LOSSES"] = str(runner_losses)
    server.start()
    data = server.gql(RUN, input={"commandString": SLEEPERS, "maxAttempts": max_attempts})
    command_id = data["runCommand"]["command"]["id"]
    assert server.process is not None
    pids = await wait_processes(command_id, runner_pid=server.process.pid)

    server.kill9()
    await asyncio.sleep(0.2)
    orphans = [pid for pid in pids if alive(pid)]
    assert orphans, "the children outlive a kill -9 of their runner (so recovery must act)"

    server.start()
    node = wait_until(
        lambda: (
            (n := server.node(command_id))["status"] == after
            and n["attempts"] == (1 if after == "FAILED" else 2)
            and n
        ),
        f"the command to be {after} after the restart",
    )
    assert [pid for pid in orphans if alive(pid)] == []
    texts = [line["text"] for line in node["logs"]]
    assert any("stopped renewing its lease" in t and "killed" in t for t in texts), texts
    assert node["maxAttempts"] == max_attempts  # what was asked for stays
    assert node["uncountedAttempts"] == (1 if runner_losses else 0)
    if after == "FAILED":
        assert node["error"] == "its runner died during the last attempt"
    else:
        if runner_losses:
            assert any(t.startswith("attempt 2 of 2 (1 earlier not counted): ") for t in texts)
        server.gql(
            "mutation($id: ID!) { cancelCommand(id: $id) { command { id } } }", id=command_id
        )
        wait_until(lambda: server.node(command_id)["status"] == "CANCELLED", "the cancel")
