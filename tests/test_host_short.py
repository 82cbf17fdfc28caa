"""A child the host has no resources for is started later, without the attempt counting:
a real `corral serve` whose file descriptor limit is lowered (prlimit) until starting a
child's pipes fails with EMFILE, then raised again."""

from __future__ import annotations

import os
import resource

from tests.test_recovery import RUN, Server, server, wait_until

__all__ = ["server"]  # the fixture, used by name

# Descriptors left free under the lowered limit: an HTTP request and the database still get
# theirs, a child's start (/dev/null, two pipes, Popen's error pipe: 7) does not.
FREE_DESCRIPTORS = 4
SHORT = "cannot start 'echo': the host is out of resources (Too many open files)"


def texts(node: dict[str, object]) -> list[str]:
    logs = node["logs"]
    assert isinstance(logs, list)
    return [line["text"] for line in logs]


def run(server: Server, command: str) -> str:
    data = server.gql(RUN, input={"commandString": command, "maxAttempts": 1})
    command_id: str = data["runCommand"]["command"]["id"]
    return command_id


def test_a_child_the_host_has_no_descriptors_for_starts_on_a_later_attempt(
    server: Server,
) -> None:
    server.extra_env.update(CORRAL_BACKOFF_MAX_SECONDS="0.3", CORRAL_MAX_HOST_SHORTAGES="50")
    server.start()
    assert server.process is not None
    pid = server.process.pid
    # A first command opens what running one takes (database connections, threads).
    warm = run(server, "true")
    wait_until(lambda: server.node(warm)["status"] == "SUCCEEDED", "the first command")

    limits = resource.prlimit(pid, resource.RLIMIT_NOFILE)
    open_now = len(os.listdir(f"/proc/{pid}/fd"))
    resource.prlimit(pid, resource.RLIMIT_NOFILE, (open_now + FREE_DESCRIPTORS, limits[1]))
    try:
        command_id = run(server, "echo started")
        node = wait_until(
            lambda: (n := server.node(command_id)) and any(SHORT in t for t in texts(n)) and n,
            "a start refused for want of descriptors",
        )
        assert node["status"] in ("QUEUED", "RUNNING")  # not failed for good
    finally:
        resource.prlimit(pid, resource.RLIMIT_NOFILE, limits)

    node = wait_until(
        lambda: (n := server.node(command_id))["status"] not in ("QUEUED", "RUNNING") and n,
        "the command to end once the limit is back",
    )
    lines = texts(node)
    assert (node["status"], node["error"]) == ("SUCCEEDED", None), lines
    assert "started" in lines
    # Every refused start was put back without counting: the last attempt is its only one.
    assert node["attempts"] >= 2
    assert node["uncountedAttempts"] == node["attempts"] - 1
    assert node["maxAttempts"] == 1
    assert any(SHORT in t and "; tried again in 0.3s (not counted" in t for t in lines), lines
