"""Children started by runner.process.Child: their pipes are read without keeping the
event loop from everything else; what a child leaves behind comes back to a subreaper."""

from __future__ import annotations

import asyncio
import contextlib
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from runner.oskit.exits import leader_exit, wait_exits
from runner.oskit.groups import group_alive, stop_group
from runner.oskit.subreaper import (
    CLOCK_TICKS,
    become_subreaper,
    kill_adopted_escapees,
    proc_stat,
    reap_orphans,
    starting_in_thread,
)
from runner.process import Child, Spawner, pipe_chunks

ENV = {"PATH": "/usr/bin:/bin"}

CHATTY = (
    "import os, time\n"
    "end = time.monotonic() + 1.5\n"
    "while time.monotonic() < end:\n"
    "    os.write(1, b'x\\n')\n"
)


@pytest.mark.usefixtures("steady_heap")
async def test_a_child_writing_without_a_pause_does_not_stall_the_loop(tmp_path: Path) -> None:
    # Many small writes keep the pipe readable but never fill a chunk: the reader must
    # still let the loop run between reads (the loop serves requests, leases, timeouts).
    child = Child.start([sys.executable, "-c", CHATTY], {}, str(tmp_path))
    gaps: list[float] = []
    done = asyncio.Event()

    async def ticker() -> None:
        last = time.monotonic()
        while not done.is_set():
            await asyncio.sleep(0.001)
            now = time.monotonic()
            gaps.append(now - last)
            last = now

    ticking = asyncio.create_task(ticker())
    received = 0
    async for chunk in pipe_chunks(child.stdout, 64 * 1024):
        received += len(chunk)
        sum(range(5_000))  # what a reader does with a chunk (split, redact ...) takes time
    done.set()
    await ticking
    child.stderr.close()
    assert await leader_exit(child) == 0
    assert received > 10_000
    assert len(gaps) > 100
    assert max(gaps) < 0.5  # without a turn between reads: the whole 1.5 s at once


async def _exited(child: Child) -> int:
    child.stdout.close()
    child.stderr.close()
    return await leader_exit(child)


async def test_a_child_counts_as_started_no_later_than_it_did(tmp_path: Path) -> None:
    # What a command leaves behind is told apart by its start: not before its first process.
    child = Child.start(["sleep", "0.2"], ENV, str(tmp_path))
    stat = proc_stat(child.pid)
    assert stat is not None
    assert child.started_at <= stat.started_at <= child.started_at + CLOCK_TICKS
    assert await _exited(child) == 0


async def test_a_group_is_alive_until_its_adopted_member_is_gone_and_reaped(
    tmp_path: Path,
) -> None:
    # The leader goes first: its group's other member comes to this process (a subreaper),
    # and its zombie must not keep the group alive.
    assert become_subreaper()
    child = Child.start(["sh", "-c", "sleep 0.3 & exit 0"], ENV, str(tmp_path))
    assert await _exited(child) == 0
    assert group_alive(child.pid)
    deadline = time.monotonic() + 10
    while group_alive(child.pid):
        assert time.monotonic() < deadline
        await asyncio.sleep(0.02)
    assert not Path(f"/proc/{child.pid}").exists()  # nothing left, not even a zombie


def _sleeping(tag: str) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        if argv[:2] == [b"sleep", tag.encode()] and state != "Z":
            found.append(int(entry.name))
    return found


def test_an_escapee_is_killed_when_the_loop_runs_off_the_main_thread(tmp_path: Path) -> None:
    # Orphans come to the main thread of a subreaper (the kernel picks its first live
    # thread), not to the thread that started their ancestor: a runner whose loop runs on
    # another thread must still find them.
    assert become_subreaper()
    tag = f"300.{uuid.uuid4().int % 10**6}"
    script = f"setsid env -i sleep {tag} </dev/null >/dev/null 2>&1 & exit 0"
    killed: list[int] = []

    async def command() -> None:
        child = Child.start(["sh", "-c", script], ENV, str(tmp_path))
        assert await _exited(child) == 0
        child.release()
        killed.append(await kill_adopted_escapees(child.started_at))

    runner = threading.Thread(target=asyncio.run, args=(command(),))
    runner.start()
    runner.join(30)
    assert threading.get_native_id() != runner.native_id
    assert killed == [1]
    assert _sleeping(tag) == []


async def test_waiting_for_exits_ends_when_they_exit_not_at_the_timeout(tmp_path: Path) -> None:
    children = [Child.start(["sleep", "0.2"], ENV, str(tmp_path)) for _ in range(2)]
    started = time.monotonic()
    await wait_exits([child.pid for child in children], 10)
    assert 0.15 < time.monotonic() - started < 5
    for child in children:
        assert await _exited(child) == 0
    started = time.monotonic()
    await wait_exits([child.pid for child in children], 10)  # gone: at once
    await wait_exits([], 0.1)  # nothing to watch: the whole timeout
    assert 0.1 <= time.monotonic() - started < 5


async def test_a_group_that_outlives_its_leader_is_stopped_as_soon_as_it_is_gone(
    tmp_path: Path,
) -> None:
    # bwrap's monitor exits before its namespace's init: the group's last member is
    # adopted, and its end is seen when it comes (not at the next poll).
    assert become_subreaper()
    for ignores_term, grace, within in ((False, 30.0, 1.0), (True, 0.5, 1.5)):
        trap = "trap '' TERM; " if ignores_term else ""
        script = f'sh -c "{trap}sleep 0.3; sleep 0.3" & exit 0'
        child = Child.start(["sh", "-c", script], ENV, str(tmp_path))
        assert await _exited(child) == 0
        await asyncio.sleep(0.1)  # the member is adopted and running its first sleep
        started = time.monotonic()
        await stop_group(child.pid, child, grace)
        assert time.monotonic() - started < within  # TERM ends it; else KILL after grace
        assert not group_alive(child.pid)
        assert not Path(f"/proc/{child.pid}").exists()


async def test_a_group_being_stopped_is_not_taken_for_another_commands_escapee(
    tmp_path: Path,
) -> None:
    # Two commands end together; the second one's group outlives its leader (bwrap's
    # namespace init does, for a moment). The first one's end must leave it to its own stop.
    assert become_subreaper()
    first = Child.start(["true"], ENV, str(tmp_path))
    second = Child.start(["sh", "-c", "sleep 5 & exit 0"], ENV, str(tmp_path))
    assert await _exited(second) == 0
    assert await _exited(first) == 0
    first.release()
    assert await kill_adopted_escapees(first.started_at) == 0
    assert group_alive(second.pid)
    assert await stop_group(second.pid, second, 0.5)
    second.release()
    assert await kill_adopted_escapees(second.started_at) == 0


async def test_a_child_a_spawner_thread_started_is_reaped_here_and_its_escapee_killed(
    tmp_path: Path,
) -> None:
    # The child is the spawner thread's; what it leaves comes to the main thread all the
    # same, and its end is seen (and reaped) from the loop.
    assert become_subreaper()
    tag = f"300.{uuid.uuid4().int % 10**6}"
    script = f"setsid env -i sleep {tag} </dev/null >/dev/null 2>&1 & exit 3"
    spawner = Spawner()
    spawner.start()
    try:
        child = await spawner.child(["sh", "-c", script], ENV, str(tmp_path))
        assert await _exited(child) == 3
        child.release()
        assert await kill_adopted_escapees(child.started_at) == 1
        assert _sleeping(tag) == []
    finally:
        spawner.stop()


def test_a_child_being_started_in_a_thread_keeps_its_exit_status_from_the_orphan_reaper(
    tmp_path: Path,
) -> None:
    # Between its fork and SPAWNED.add, a spawner thread's child that already exited is a
    # zombie of unknown kind: the reaper of orphans must leave it (its status is the
    # command's), and may reap it once the start is over and it is still nobody's.
    assert become_subreaper()
    popens: list[subprocess.Popen[bytes]] = []
    with starting_in_thread():
        thread = threading.Thread(
            target=lambda: popens.append(
                subprocess.Popen(["sh", "-c", "exit 7"], start_new_session=True)
            )
        )
        thread.start()
        thread.join(30)
        (popen,) = popens
        deadline = time.monotonic() + 10
        while (stat := proc_stat(popen.pid)) is not None and stat.state != "Z":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        reap_orphans()
        assert popen.poll() == 7
    orphan = subprocess.Popen(["sh", "-c", "exit 7"], start_new_session=True)
    while (stat := proc_stat(orphan.pid)) is not None and stat.state != "Z":
        time.sleep(0.01)
    reap_orphans()  # nothing being started: a zombie not in SPAWNED is an orphan's
    assert proc_stat(orphan.pid) is None
    orphan.returncode = 0  # (reaped above: no ResourceWarning for it)


async def test_a_child_whose_start_was_given_up_on_is_killed(tmp_path: Path) -> None:
    # The caller of a start is cancelled while its thread is still busy: the child that
    # thread starts next belongs to nobody, and must not live on.
    tag = f"300.{uuid.uuid4().int % 10**6}"
    spawner = Spawner(threads=1)
    spawner.start()
    busy = threading.Event()
    try:
        assert spawner._threads is not None
        spawner._threads.submit(busy.wait, 30)  # the one thread is taken meanwhile
        start = asyncio.create_task(spawner.child(["sleep", tag], ENV, str(tmp_path)))
        await asyncio.sleep(0.05)
        start.cancel()
        busy.set()
        with contextlib.suppress(asyncio.CancelledError):
            await start
        assert start.cancelled()
        deadline = time.monotonic() + 10
        while _sleeping(tag):
            assert time.monotonic() < deadline
            await asyncio.sleep(0.02)
    finally:
        busy.set()
        spawner.stop()
