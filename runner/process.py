"""Child processes in their own process group, stopped as a group: TERM, grace, KILL."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from pathlib import Path


def group_alive(pgid: int) -> bool:
    """Whether any process of the group still exists."""
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _signal_group(pgid: int, sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pgid, sig)


async def stop_group(pgid: int, process: asyncio.subprocess.Process | None, grace: float) -> None:
    """SIGTERM the whole group, wait up to `grace` seconds, then SIGKILL what is left.

    Always reaps the leader (`process`) so no zombie stays behind.
    """
    if group_alive(pgid):
        _signal_group(pgid, signal.SIGTERM)
        deadline = asyncio.get_running_loop().time() + grace
        while group_alive(pgid) and asyncio.get_running_loop().time() < deadline:
            if process is not None and process.returncode is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(process.wait(), 0.05)
            else:
                await asyncio.sleep(0.02)
        if group_alive(pgid):
            _signal_group(pgid, signal.SIGKILL)
    if process is not None:
        await process.wait()
    # Members re-parented elsewhere may take a moment to vanish after SIGKILL.
    for _ in range(100):
        if not group_alive(pgid):
            return
        _signal_group(pgid, signal.SIGKILL)
        await asyncio.sleep(0.01)


RUN_MARKER = "CORRAL_RUN"  # in the environment of a command's processes
SIDECAR_MARKER = "CORRAL_SIDECAR_OF"  # in the environment of its proxy sidecar


def run_marker(runner_id: str, command_id: int) -> str:
    """The marker value of one command run by one runner: unique across Corral instances
    on a host (command ids alone are not: two databases both have a command 1)."""
    return f"{runner_id}/{command_id}"


def last_pid() -> int:
    """The PID the kernel handed out last (/proc/loadavg), 0 when unknown."""
    try:
        return int(Path("/proc/loadavg").read_text().split()[-1])
    except (OSError, ValueError, IndexError):
        return 0


def marked_processes(name: str, value: str, min_pid: int = 0) -> list[int]:
    """Live PIDs on this host whose environment has `name=value` (zombies are left out:
    they are dead, only waiting to be reaped). `min_pid`: only look at PIDs above it
    (descendants of a process are younger than it), unless PIDs have wrapped around."""
    if min_pid and last_pid() < min_pid:
        min_pid = 0  # the PID counter wrapped: younger processes may have smaller PIDs
    marker = f"{name}={value}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) <= min_pid:
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0") and not _is_zombie(entry):
            found.append(int(entry.name))
    return found


def _is_zombie(entry: Path) -> bool:
    try:
        return (entry / "stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


async def sweep_run(marker: str, leader_pid: int = 0, timeout: float = 2.0) -> int:
    """SIGKILL what is left of a run outside its process group (e.g. a crash handler that
    called setsid) and wait until it is gone. Returns how many were found."""
    # Reading /proc/*/environ is blocking I/O: off the event loop; only PIDs younger than
    # the run's first process can belong to it.
    found = pids = await asyncio.to_thread(marked_processes, RUN_MARKER, marker, leader_pid - 1)
    _kill_all(pids)
    deadline = asyncio.get_running_loop().time() + timeout
    while pids and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.02)
        pids = await asyncio.to_thread(marked_processes, RUN_MARKER, marker, leader_pid - 1)
    return len(found)


def kill_leftovers(marker: str) -> int:
    """SIGKILL every process of a run and of its sidecar (after its runner died)."""
    pids = marked_processes(RUN_MARKER, marker) + marked_processes(SIDECAR_MARKER, marker)
    _kill_all(pids)
    return len(pids)
