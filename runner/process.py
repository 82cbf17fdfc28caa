"""Child processes in their own process group, stopped as a group: TERM, grace, KILL."""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import AsyncGenerator, Callable, Collection, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any, Protocol


class Exits(Protocol):
    """A started process as `stop_group` and `leader_exit` see it (an asyncio Process or a
    Child); `returncode` is None until it has exited and been reaped."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...


class Child:
    """A command's process, started without asyncio's subprocess transports.

    `subprocess.Popen` forks (vfork) and execs right here; the pipes are read through the
    loop's reader callbacks (`pipe_chunks`), the exit is seen through a pidfd. asyncio's
    `create_subprocess_exec` takes several rounds of the event loop to connect its pipe
    transports before it returns: on a busy runner of short commands that was a third of
    each slot's cycle (4 ms of 13).
    """

    def __init__(self, popen: subprocess.Popen[bytes], started_at: int) -> None:
        self._popen = popen
        assert popen.stdout is not None
        assert popen.stderr is not None
        self.stdout: IO[bytes] = popen.stdout
        self.stderr: IO[bytes] = popen.stderr
        SPAWNED.add(popen.pid)
        self.started_at = started_at  # clock ticks after boot, at most the process's start

    @classmethod
    def start(cls, argv: list[str], env: dict[str, str], cwd: str, **options: Any) -> Child:
        """Start `argv` in a session (and process group) of its own; stdin is /dev/null.
        `options` go to Popen (e.g. user, group). Raises OSError when it cannot be started
        (nothing is left behind then)."""
        # Read before the fork, not from the child's /proc/<pid>/stat after it: that read
        # waits while the child execs (0.3 ms on average, 1 ms at p90 on a busy host).
        started_at = boot_ticks()
        return cls(
            subprocess.Popen(  # an argv list, no shell
                argv,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                env=env,
                cwd=cwd,
                start_new_session=True,
                **options,
            ),
            started_at,
        )

    @property
    def pid(self) -> int:
        return self._popen.pid

    @property
    def returncode(self) -> int | None:
        """The exit status once the process has exited (it is reaped on the first look
        after its exit, as asyncio's child watcher would)."""
        return self._popen.poll()

    def release(self) -> None:
        """Once its group is stopped: its session is no longer a live command's, and what
        is left of it counts as escaped. (Not at its exit: the rest of its group, bwrap's
        namespace init say, is being stopped then, and another command's end took it for
        escaped, killed it and waited for it.)"""
        SPAWNED.discard(self._popen.pid)


async def pipe_chunks(pipe: IO[bytes], size: int) -> AsyncGenerator[bytes, None]:
    """What a child writes to `pipe`, chunk by chunk, until every writer has closed it;
    the pipe is closed after. The loop gets a turn after each chunk: a child that writes
    without a pause (full chunks, or a stream of small ones) must not keep the runner from
    everything else."""
    fd = pipe.fileno()
    os.set_blocking(fd, False)
    try:
        while True:
            try:
                chunk = os.read(fd, size)
            except BlockingIOError:
                await _readable(fd)
                continue
            if not chunk:
                return
            yield chunk
            await asyncio.sleep(0)
    finally:
        pipe.close()


async def _readable(fd: int) -> None:
    """Return once `fd` is readable (a pipe with data or at its end, a pidfd whose process
    has exited)."""
    loop = asyncio.get_running_loop()
    readable: asyncio.Future[None] = loop.create_future()
    loop.add_reader(fd, _set_result, readable)
    try:
        await readable
    finally:
        loop.remove_reader(fd)


def _set_result(future: asyncio.Future[None]) -> None:
    if not future.done():
        future.set_result(None)


async def wait_exits(pids: Collection[int], timeout: float) -> None:
    """Return once every process of `pids` has exited (seen through pidfds, not polled), or
    after `timeout`: at once when they are gone, the whole of it when `pids` is empty."""
    if not pids:
        await asyncio.sleep(timeout)
        return
    loop = asyncio.get_running_loop()
    exits: dict[int, asyncio.Future[None]] = {}
    try:
        for pid in pids:
            try:
                pidfd = os.pidfd_open(pid)
            except ProcessLookupError:
                continue  # gone already
            except (AttributeError, OSError):  # no pidfds here: wait out the time
                await asyncio.sleep(timeout)
                return
            exits[pidfd] = loop.create_future()
            loop.add_reader(pidfd, _set_result, exits[pidfd])
        if exits:
            await asyncio.wait(exits.values(), timeout=timeout)
    finally:
        for pidfd in exits:
            loop.remove_reader(pidfd)
            os.close(pidfd)


def group_alive(pgid: int) -> bool:
    """Whether any process of the group still exists (a subreaper reaps the group's members
    it adopted: their zombies would count as alive)."""
    return _adopted_alive(pgid) is not None


def _adopted_alive(pgid: int) -> list[int] | None:
    """None when nothing of the group is left; else its living members that this process
    adopted (those it can wait for), after reaping the adopted zombies. The adopted are
    only looked for when something of the group answers: a gone group has no zombies."""
    if not _group_answers(pgid):
        return None
    if not _subreaper:
        return []
    alive = reap_adopted(lambda stat: stat.pgrp == pgid)
    return alive if _group_answers(pgid) else None


def _group_answers(pgid: int) -> bool:
    """Whether a signal to the group would reach a process (a zombie counts)."""
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


async def stop_group(pgid: int, process: Exits | None, grace: float) -> bool:
    """SIGTERM the whole group, wait up to `grace` seconds, then SIGKILL what is left.
    Returns whether the group is gone (False: a member outlived even the SIGKILL's wait).

    Always reaps the leader (`process`) so no zombie stays behind.
    """
    loop = asyncio.get_running_loop()
    if group_alive(pgid):
        _signal_group(pgid, signal.SIGTERM)
        deadline = loop.time() + grace
        while (adopted := _adopted_alive(pgid)) is not None and loop.time() < deadline:
            if process is not None and process.returncode is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(leader_exit(process), 0.05)
            else:  # e.g. bwrap's namespace init, still being torn down after its monitor
                await wait_exits(adopted, 0.02)
        if group_alive(pgid):
            _signal_group(pgid, signal.SIGKILL)
    if process is not None:
        await leader_exit(process)
    # Members re-parented elsewhere may take a moment to vanish after SIGKILL.
    deadline = loop.time() + 1.0
    while (adopted := _adopted_alive(pgid)) is not None:
        if loop.time() >= deadline:
            return False
        _signal_group(pgid, signal.SIGKILL)
        await wait_exits(adopted, 0.01)
    return True


async def leader_exit(process: Exits) -> int:
    """The process's exit status as soon as it has exited, whatever holds its pipes (asyncio's
    wait() also waits for them to close: a process that left the group with our stdout
    would make it wait forever)."""
    if process.returncode is not None:
        return process.returncode
    try:
        pidfd = os.pidfd_open(process.pid)
    except (AttributeError, OSError):
        pidfd = None  # no pidfds here, or reaped a moment ago: the status comes at once
    if pidfd is not None:
        try:
            await _readable(pidfd)
        finally:
            os.close(pidfd)
    # The child watcher reaps it and sets the status a moment after the exit (no event);
    # a Child is reaped by the first look at its status.
    while (code := process.returncode) is None:  # noqa: ASYNC110
        await asyncio.sleep(0.002)
    return code


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


def _kill_all(pids: list[int]) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)


async def sweep_run(marker: str, leader_pid: int = 0, timeout: float = 2.0) -> int:
    """SIGKILL what is left of a run outside its process group (e.g. a crash handler that
    called setsid) and wait until it is gone. Returns how many were found."""
    found = pids = await SWEEPER.find(marker, leader_pid - 1)
    _kill_all(pids)
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

# -- a subreaper: what leaves a command's session still ends up here -------------------------
#
# Without a sandbox's PID namespace, a process that calls setsid and clears its environment
# has nothing left that ties it to its command. As a child subreaper, this process becomes
# its parent once the command's processes above it are gone: then it is found among this
# process's children, told apart from the children it started itself (SPAWNED) and from the
# orphans of commands still running (their session is a live leader's), and killed.

PR_SET_CHILD_SUBREAPER = 36
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
SPAWNED: set[int] = set()  # session leaders this process started and will reap itself
_starting = 0  # children in a session of their own being started, not yet in SPAWNED


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
    if _subreaper and not _starting:
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
        if _starting:  # an own child is being started: not yet told apart
            await asyncio.sleep(0.01)
            continue
        alive = reap_adopted(escaped)
        if not alive:
            break
        _kill_all(alive)  # their children come up to this process as they die: again
        killed.update(alive)
        await wait_exits(alive, 0.01)
    return len(killed)


def kill_leftovers(marker: str) -> int:
    """SIGKILL every process of a run and of its sidecar (after its runner died)."""
    pids = marked_processes(RUN_MARKER, marker) + marked_processes(SIDECAR_MARKER, marker)
    _kill_all(pids)
    return len(pids)


def use_pidfd_child_watcher() -> None:
    """On Python 3.11, have the running loop watch children through pidfds, as 3.12 and
    later do by default. 3.11's default starts a thread per child that waits for it, and
    that thread then waits for the GIL (up to the switch interval, 5 ms) to report the
    exit whenever the event loop is busy: a runner full of short commands pays it on each.
    """
    if sys.version_info >= (3, 12) or not hasattr(os, "pidfd_open"):
        return
    policy = asyncio.get_event_loop_policy()
    if not isinstance(policy, asyncio.DefaultEventLoopPolicy):
        return  # someone else's policy (uvloop ...): leave it alone
    if isinstance(getattr(policy, "_watcher", None), _LoopPidfdChildWatcher):
        return
    policy.set_child_watcher(_LoopPidfdChildWatcher())


# asyncio's child watchers are deprecated from 3.12 (defining a subclass warns) and gone in
# 3.14; 3.12 and later watch children through pidfds on their own, so the class exists only
# where it is used.
if sys.version_info < (3, 12):

    class _LoopPidfdChildWatcher(asyncio.AbstractChildWatcher):
        """Child exits seen by whichever loop is running when the child starts (no thread)."""

        def __init__(self) -> None:
            self._watched: dict[int, tuple[asyncio.AbstractEventLoop, int]] = {}

        def add_child_handler(  # type: ignore[override]
            self, pid: int, callback: Callable[..., object], *args: Any
        ) -> None:
            loop = asyncio.get_running_loop()
            pidfd = os.pidfd_open(pid)
            self._watched[pid] = (loop, pidfd)
            loop.add_reader(pidfd, self._exited, pid, callback, args)

        def _exited(self, pid: int, callback: Callable[..., object], args: Any) -> None:
            if not self.remove_child_handler(pid):
                return
            try:
                _, status = os.waitpid(pid, 0)
                code = os.waitstatus_to_exitcode(status)
            except ChildProcessError:  # reaped elsewhere already
                code = 255
            callback(pid, code, *args)

        def remove_child_handler(self, pid: int) -> bool:
            watched = self._watched.pop(pid, None)
            if watched is None:
                return False
            loop, pidfd = watched
            if not loop.is_closed():
                loop.remove_reader(pidfd)
            os.close(pidfd)
            return True

        def attach_loop(self, loop: asyncio.AbstractEventLoop | None) -> None:
            pass

        def close(self) -> None:
            pass

        def is_active(self) -> bool:
            return True

        def __enter__(self) -> _LoopPidfdChildWatcher:
            return self

        def __exit__(self, *exc_info: object) -> None:
            pass
