"""A command's child process: started in a process group of its own (stopped as a group by
runner/oskit/groups.py), its pipes read through the event loop, its exit seen by a pidfd."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import subprocess
import sys
from collections.abc import AsyncGenerator, Callable
from concurrent.futures import ThreadPoolExecutor
from typing import IO, Any

from runner.oskit.exits import wait_readable
from runner.oskit.subreaper import SPAWNED, boot_ticks, starting_in_thread

# Threads that start children: a start holds its thread until the child has exec'd (vfork),
# 1-4 ms of a loaded host for bwrap, and the threads start that many at once.
SPAWN_THREADS = 2
UNWANTED_WAIT_SECONDS = 1.0


class Child:
    """A command's process, started without asyncio's subprocess transports.

    `subprocess.Popen` forks (vfork) and execs right here (or in a `Spawner` thread); the
    pipes are read through the loop's reader callbacks (`pipe_chunks`), the exit is seen
    through a pidfd. asyncio's `create_subprocess_exec` takes several rounds of the event
    loop to connect its pipe transports before it returns: on a busy runner of short
    commands that was a third of each slot's cycle (4 ms of 13).
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
        return cls(*_popen(argv, env, cwd, options))

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


def _popen(
    argv: list[str], env: dict[str, str], cwd: str, options: dict[str, Any]
) -> tuple[subprocess.Popen[bytes], int]:
    # Read before the fork, not from the child's /proc/<pid>/stat after it: that read
    # waits while the child execs (0.3 ms on average, 1 ms at p90 on a busy host).
    started_at = boot_ticks()
    popen = subprocess.Popen(  # an argv list, no shell
        argv,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        env=env,
        cwd=cwd,
        start_new_session=True,
        **options,
    )
    return popen, started_at


class Spawner:
    """Starts children as `Child.start` does, in threads of its own: the thread that forks
    waits until the child has exec'd (the GIL released), and on a loaded host that wait
    (for bwrap, 3.5 ms a command) was a third of the event loop's time on a runner of
    short commands, none of it work."""

    def __init__(self, threads: int = SPAWN_THREADS) -> None:
        self._size = threads
        self._threads: ThreadPoolExecutor | None = None

    def start(self) -> None:
        self._threads = ThreadPoolExecutor(self._size, thread_name_prefix="corral-spawn")

    def stop(self) -> None:
        """Once no start is under way (the children it started live on)."""
        if self._threads is not None:
            self._threads.shutdown(wait=True)
            self._threads = None

    async def child(self, argv: list[str], env: dict[str, str], cwd: str, **options: Any) -> Child:
        """`Child.start(argv, env, cwd, **options)` in a thread (at once when not started)."""
        if self._threads is None:
            return Child.start(argv, env, cwd, **options)
        loop = asyncio.get_running_loop()
        with starting_in_thread():  # until SPAWNED holds it
            started = loop.run_in_executor(self._threads, _popen, argv, env, cwd, options)
            try:
                popen, started_at = await asyncio.shield(started)
            except asyncio.CancelledError:
                started.add_done_callback(_kill_unwanted)  # nobody will stop it otherwise
                raise
            return Child(popen, started_at)


def _kill_unwanted(started: asyncio.Future[tuple[subprocess.Popen[bytes], int]]) -> None:
    """A child started for a caller that was cancelled meanwhile: its group is killed and
    it is reaped (at once: SIGKILL is not waited for long)."""
    if started.cancelled() or started.exception() is not None:
        return
    popen, _ = started.result()
    with contextlib.suppress(ProcessLookupError):
        os.killpg(popen.pid, signal.SIGKILL)
    for pipe in (popen.stdout, popen.stderr):
        if pipe is not None:
            pipe.close()
    with contextlib.suppress(subprocess.TimeoutExpired):
        popen.wait(UNWANTED_WAIT_SECONDS)


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
                await wait_readable(fd)
                continue
            if not chunk:
                return
            yield chunk
            await asyncio.sleep(0)
    finally:
        pipe.close()


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
