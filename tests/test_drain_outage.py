"""A drain while the database is away (issue 14, tried as an outage would): the runner stops
in bounded time, its child's process group is gone, and once the database is back the
command, still RUNNING under a dead lease, is recovered and finishes; no line is lost."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from pathlib import Path

import pytest
from sqlalchemy.engine import make_url

from server.settings import Settings
from tests.fixtures.commands import logs_of, run, texts, wait_final, wait_status
from tests.test_walls_logstore import Forwarder, pk, running_app

ON_POSTGRES = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)
# The first attempt writes its pid and sleeps; an attempt that finds the pid file ends.
CHILD = (
    "import os, sys, time\n"
    "if os.path.exists('pid'):\n"
    "    print('second attempt'); sys.exit(0)\n"
    "open('pid', 'w').write(str(os.getpid()))\n"
    "print('first attempt', flush=True)\n"
    "time.sleep(120)\n"
)
STOP_BOUND_SECONDS = 40.0  # drain 1 s, kill grace, the store trying 15 s more (seen: 17.6 s)


def running_with(marker: str) -> list[int]:
    """The pids of this host's processes whose command line holds `marker` (the child runs
    in a PID namespace of its own: the pid it sees of itself is not the host's)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if marker.encode() in (entry / "cmdline").read_bytes():
                found.append(int(entry.name))
        except OSError:
            continue
    return found


@ON_POSTGRES
async def test_a_drain_during_a_database_outage_stops_in_time_and_loses_nothing(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    url = make_url(settings.database_url or "")
    forwarder = Forwarder(url.host or "127.0.0.1", url.port or 5432)
    await forwarder.start()
    proxied = url.set(host="127.0.0.1", port=forwarder.port).render_as_string(hide_password=False)
    away = settings.model_copy(
        update={
            "database_url": proxied,
            "drain_seconds": 1.0,
            "kill_grace_seconds": 0.5,
            "lease_seconds": 3.0,
        }
    )
    marker = f"# drain-outage {uuid.uuid4().hex}"
    try:
        async with running_app(away) as (_, gql):
            command_id = await run(
                gql,
                commandString="python3 -c {{ params.code }}",
                params={"code": CHILD + marker},
            )
            await wait_status(gql, command_id, {"RUNNING"})
            pid_file = settings.commands_dir / str(pk(command_id)) / "pid"
            deadline = time.monotonic() + 20
            while not pid_file.exists() or not pid_file.read_text():
                assert time.monotonic() < deadline, "the child never started"
                await asyncio.sleep(0.05)
            assert running_with(marker)
            # Its line stored before the cut, as the check below assumes (cutting as soon as
            # the pid file showed, the line was sometimes still in the store's next flush).
            while "first attempt" not in texts(await logs_of(gql, command_id)):
                assert time.monotonic() < deadline, "the child's line was never stored"
                await asyncio.sleep(0.05)
            forwarder.cut()
            stopping = time.monotonic()
        stopped_in = time.monotonic() - stopping  # the lifespan's end: the runner's drain
        assert stopped_in < STOP_BOUND_SECONDS, stopped_in
        assert running_with(marker) == [], "the child outlived its runner"
        # What the runner could not store as it stopped is said, as an ERROR: here only its
        # own notes (the child printed nothing after the cut; its line was stored before).
        gave_up = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
        assert gave_up, "the runner stopped without saying what it could not store"
        for message in gave_up:
            assert message.startswith(
                "the database stayed unreachable as the runner stopped: gave up 1 log lines "
                f"of command(s) {pk(command_id)} ("
            ), message
        caplog.clear()  # the autouse check fails a test on any ERROR record
        forwarder.restore()
        # A runner again (the database is back): the command is recovered and finishes.
        async with running_app(settings.model_copy(update={"lease_seconds": 3.0})) as (_, gql):
            final = await wait_final(gql, command_id, timeout=60)
            assert final["status"] == "SUCCEEDED", final
            out = texts(await logs_of(gql, command_id))
    finally:
        await forwarder.close()
    assert out.count("first attempt") == 1
    assert out[-1] == "second attempt"
