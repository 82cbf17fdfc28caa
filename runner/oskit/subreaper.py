"""A subreaper: what leaves a command's session still ends up here.

Without a sandbox's PID namespace, a process that calls setsid and clears its environment
has nothing left that ties it to its command. As a child subreaper, this process becomes
its parent once the command's processes above it are gone: then it is found among this
process's children, told apart from the children it started itself (SPAWNED) and from the
orphans of commands still running (their session is a live leader's), and killed.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

from runner.oskit.exits import wait_exits

PR_SET_CHILD_SUBREAPER = 36
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SPAWNED: set[int] = set()  # session leaders this process started and will reap itself
_starting = 0  # children in a session of their own being started, not yet in SPAWNED
_starting_in_threads = 0  # the same, started by another thread (runner/process.Spawner)


@contextlib.contextmanager
def starting_own_child() -> Iterator[None]:
    """Wrap the start of a child in a session of its own that this process reaps itself (a
    sidecar, a render worker) and its SPAWNED.add: meanwhile it is an unknown child in
    another session, and the sweep below waits rather than take it for an escaped one."""
    global _starting
    _starting += 1
    try:
        yield
    finally:
        _starting -= 1


@contextlib.contextmanager
def starting_in_thread() -> Iterator[None]:
    """The same for a child that another thread starts (a command's, by
    runner/process.Spawner). It is that thread's child, not one of the threads' that
    orphans come to: only a look at every thread's children could meet it, and only those
    wait for it (an end's sweep of escapees goes on meanwhile)."""
    global _starting_in_threads
    _starting_in_threads += 1
    try:
        yield
    finally:
        _starting_in_threads -= 1


def _unsure(every_thread: bool) -> bool:
    """Whether a child being started may show among the children looked at: they are
    every thread's when asked, or when the main thread is gone (_adoptive_threads)."""
    if _starting:
        return True
    return bool(_starting_in_threads) and (every_thread or not threading.main_thread().is_alive())


_subreaper = False


def become_subreaper() -> bool:
    """Make this process the child subreaper of its descendants (prctl); False if refused."""
    global _subreaper
    if _subreaper:
        return True
    libc = ctypes.CDLL(None, use_errno=True)
    _subreaper = bool(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0)
    return _subreaper


def is_subreaper() -> bool:
    """Whether become_subreaper succeeded in this process."""
    return _subreaper


@dataclass(frozen=True, slots=True)
class ProcStat:
    """What /proc/<pid>/stat says about a process that matters here."""

    state: str
    pgrp: int
    session: int
    started_at: int  # clock ticks after boot


def proc_stat(pid: int) -> ProcStat | None:
    """The process's state, group, session and start time; None when it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as file:
            text = file.read()
    except OSError:
        return None
    fields = text[text.rindex(")") + 2 :].split()  # the name may hold spaces and ')'
    return ProcStat(fields[0], int(fields[2]), int(fields[3]), int(fields[19]))


def boot_ticks() -> int:
    """Now, as /proc/<pid>/stat gives a process's start: clock ticks since boot, rounded
    down as the kernel rounds."""
    return time.clock_gettime_ns(time.CLOCK_BOOTTIME) // (1_000_000_000 // CLOCK_TICKS)


def _adoptive_threads() -> list[str]:
    """The threads of this process whose children are read for adopted ones: orphans come
    to a subreaper's first live thread, the main one (Linux 3.19 on); before, to the thread
    that started their ancestor, the event loop's, which is the one asking. Every thread
    once the main one is gone. (Reading each thread's list cost 20 us a thread.)"""
    if not threading.main_thread().is_alive():
        return os.listdir("/proc/self/task")
    return list({str(os.getpid()), str(threading.get_native_id())})


def adopted_children(every_thread: bool = False) -> dict[int, ProcStat]:
    """This process's children that it did not start itself, with their stat (those of
    the threads orphans come to, or of `every_thread`)."""
    pids: list[int] = []
    tasks = os.listdir("/proc/self/task") if every_thread else _adoptive_threads()
    for task in tasks:
        try:
            with open(f"/proc/self/task/{task}/children") as file:
                pids += map(int, file.read().split())
        except OSError:
            continue
    own_session = os.getsid(0)
    found = {}
    for pid in pids:
        if pid in SPAWNED:
            continue
        stat = proc_stat(pid)
        # Children of this process's own session were started here (without a session of
        # their own) by some library, which waits for them itself.
        if stat is not None and stat.session != own_session:
            found[pid] = stat
    return found


def reap_adopted(belongs: Callable[[ProcStat], bool], every_thread: bool = False) -> list[int]:
    """Reap the adopted zombies that `belongs` picks (nobody else waits for them); the
    living ones it picks are returned."""
    alive = []
    for pid, stat in adopted_children(every_thread).items():
        if not belongs(stat):
            continue
        if stat.state == "Z":
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, os.WNOHANG)
        else:
            alive.append(pid)
    return alive


def reap_orphans() -> None:
    """Reap the adopted zombies nobody waits for: a subreaper inherits every orphan below
    it (a browser's helpers whose parent died, say), not only a command's escaped ones."""
    if _subreaper and not _unsure(every_thread=True):
        reap_adopted(lambda _stat: True, every_thread=True)


async def kill_adopted_escapees(started_at: int, timeout: float = 2.0) -> int:
    """SIGKILL what a command that just ended left behind outside its process group (and
    reap it): adopted processes younger than its first one, in no live command's session.
    Returns how many were killed. Only a subreaper adopts them: 0 otherwise."""
    if not _subreaper:
        return 0

    def escaped(stat: ProcStat) -> bool:
        return stat.started_at >= started_at and stat.session not in SPAWNED

    killed: set[int] = set()
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if _unsure(every_thread=False):  # an own child is being started: not yet told apart
            await asyncio.sleep(0.01)
            continue
        alive = reap_adopted(escaped)
        if not alive:
            break
        kill_all(alive)  # their children come up to this process as they die: again
        killed.update(alive)
        await wait_exits(alive, 0.01)
    return len(killed)


def kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
