"""A run's processes found by the marker in their environment: what a command leaves
outside its process group is swept when it ends, and what a dead runner left is killed."""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

from runner.oskit.exits import wait_exits
from runner.oskit.subreaper import kill_all

RUN_MARKER = "CORRAL_RUN"  # in the environment of a command's processes
SIDECAR_MARKER = "CORRAL_SIDECAR_OF"  # in the environment of its proxy sidecar
INLINE_SWEEP_PIDS = 64
PROBE_PIDS = 128


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


def candidate_pids(min_pid: int = 0) -> list[int]:
    """PIDs on this host above `min_pid` (all of them if PIDs have wrapped around since).

    When few PIDs were handed out since `min_pid`, these are the candidates themselves
    (some may be gone, or threads): that is cheaper than listing /proc, which costs up to
    a millisecond while processes come and go.
    """
    last = last_pid()
    if min_pid and last < min_pid:
        min_pid = 0  # the PID counter wrapped: younger processes may have smaller PIDs
    if min_pid and last - min_pid <= PROBE_PIDS:
        return list(range(min_pid + 1, last + 1))
    return [pid for pid in map(int, filter(str.isdigit, os.listdir("/proc"))) if pid > min_pid]


def marked_processes(name: str, value: str, min_pid: int = 0) -> list[int]:
    """Live PIDs on this host whose environment has `name=value` (zombies are left out:
    they are dead, only waiting to be reaped). `min_pid`: only look at PIDs above it
    (descendants of a process are younger than it), unless PIDs have wrapped around."""
    return _marked(candidate_pids(min_pid), f"{name}={value}".encode())


def _marked(pids: list[int], marker: bytes) -> list[int]:
    return [pid for pid, env in _environs(pids).items() if marker in env]


async def sweep_run(marker: str, leader_pid: int = 0, timeout: float = 2.0) -> int:
    """SIGKILL what is left of a run outside its process group (e.g. a crash handler that
    called setsid) and wait until it is gone. Returns how many were found."""
    found = pids = await SWEEPER.find(marker, leader_pid - 1)
    kill_all(pids)
    deadline = asyncio.get_running_loop().time() + timeout
    while pids and asyncio.get_running_loop().time() < deadline:
        await wait_exits(pids, 0.02)
        pids = await SWEEPER.find(marker, leader_pid - 1)
    return len(found)


class Sweeper:
    """Finds runs' processes by marker: one look at /proc for all the runs that ask at
    about the same moment (a runner of short commands finishes several at once).

    Only PIDs younger than a run's first process can be its own. A few are read right
    here; many in a thread (a thread would wait for the GIL at each read while the event
    loop is busy, so it is only worth it for a long list).
    """

    def __init__(self) -> None:
        self._requests: list[tuple[bytes, int, asyncio.Future[list[int]]]] = []
        self._scan_task: asyncio.Task[None] | None = None

    async def find(self, marker: str, min_pid: int) -> list[int]:
        future: asyncio.Future[list[int]] = asyncio.get_running_loop().create_future()
        if not self._requests:  # the scan starts with the loop's next round: others join
            self._scan_task = asyncio.get_running_loop().create_task(self._scan())
        self._requests.append((f"{RUN_MARKER}={marker}".encode(), min_pid, future))
        return await future

    async def _scan(self) -> None:
        requests, self._requests = self._requests, []
        try:
            pids = candidate_pids(min(min_pid for _, min_pid, _ in requests))
            if len(pids) <= INLINE_SWEEP_PIDS:
                environs = _environs(pids)
            else:
                environs = await asyncio.to_thread(_environs, pids)
        except Exception as exc:
            for _, _, future in requests:
                if not future.done():
                    future.set_exception(exc)
            return
        for marker, min_pid, future in requests:
            if not future.done():
                future.set_result(
                    [pid for pid, env in environs.items() if pid > min_pid and marker in env]
                )


def _environs(pids: list[int]) -> dict[int, list[bytes]]:
    """The environment entries of each process of `pids` (a zombie's reads as empty: it is
    dead, only waiting to be reaped)."""
    found = {}
    for pid in pids:
        try:
            with open(f"/proc/{pid}/environ", "rb") as file:
                environ = file.read()
        except OSError:
            continue
        if environ:
            found[pid] = environ.split(b"\0")
    return found


SWEEPER = Sweeper()


def kill_leftovers(marker: str) -> int:
    """SIGKILL every process of a run and of its sidecar (after its runner died)."""
    pids = marked_processes(RUN_MARKER, marker) + marked_processes(SIDECAR_MARKER, marker)
    kill_all(pids)
    return len(pids)


def kill_runs_of(runner_id: str) -> int:
    """SIGKILL every process of every run (and sidecar) of a runner that is gone: what a
    runner killed outright left, found by its run markers."""
    prefixes = tuple(f"{name}={runner_id}/".encode() for name in (RUN_MARKER, SIDECAR_MARKER))
    environs = _environs(candidate_pids())
    pids = [pid for pid, env in environs.items() if any(e.startswith(prefixes) for e in env)]
    kill_all(pids)
    return len(pids)
