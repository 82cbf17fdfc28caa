"""Templates render off the event loop, in a few warm worker processes with limits.

A template is code its author controls: a nested loop can run for hours, a filter can ask
for gigabytes (issue 10, item 4). So the server never renders one itself: each render
goes to an idle worker (runner/renderworker.py) over a pipe, with a time limit; a worker
that overruns is killed and a fresh one takes its place, and the caller gets a
CompositionError that says which limit was hit. Workers start on first use and stay warm
(a render costs a pipe round trip, not a process), and `close` kills them all. A source
with no template syntax at all (`/bin/true`) is only split, right here: that round trip
was a third of a short command's time on a busy runner.

Why not a library: concurrent.futures cannot stop a running task, and `pebble`'s pool,
which can, answers through threads and pickles results, which a template that escaped
the sandbox could forge. Here the event loop waits on the pipe itself and the answer is
JSON.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import sys
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from runner.compose import literal_argv
from runner.oskit.subreaper import SPAWNED, starting_own_child
from runner.template_env import CompositionError
from server.settings import Settings

WORKER_MODULE = "runner.renderworker"
PACKAGE_ROOT = Path(__file__).resolve().parent.parent
START_TIMEOUT_SECONDS = 30.0  # a cold interpreter on a busy host; a start is rare
READ_LIMIT = 16 * 1024 * 1024  # an answer is at most MAX_RENDERED characters, JSON-escaped


def _mib(memory_bytes: int) -> str:
    return f"{memory_bytes / (1024 * 1024):g} MiB"


KILL_WAIT_SECONDS = 5.0  # a killed worker's exit is reported well within this


class _Worker:
    """One worker process and its pipes; it renders one template at a time."""

    def __init__(self, process: asyncio.subprocess.Process) -> None:
        self.process = process

    @classmethod
    async def start(cls, memory_bytes: int) -> _Worker:
        # Its own session, like a command's: a subreaper runner must know it started it,
        # or it would take the worker for a command's escaped process (runner/oskit/subreaper.py).
        with starting_own_child():
            process = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                WORKER_MODULE,
                str(memory_bytes),
                str(os.getpid()),
                stdin=asyncio.subprocess.PIPE,
                stdout=asyncio.subprocess.PIPE,
                # Nothing of the server's environment (keys, URLs): only what imports need.
                env={"PYTHONPATH": str(PACKAGE_ROOT), "LANG": "C.UTF-8", "PATH": os.defpath},
                cwd="/",
                start_new_session=True,  # a ^C in the terminal is the server's to handle
                limit=READ_LIMIT,
            )
            SPAWNED.add(process.pid)
        worker = cls(process)
        try:
            async with asyncio.timeout(START_TIMEOUT_SECONDS):
                ready = await worker._read()
        except BaseException:
            await worker.kill()
            raise
        if ready != {"ready": True}:
            await worker.kill()
            raise ConnectionError("the render worker did not start")
        return worker

    async def _read(self) -> Any:
        assert self.process.stdout is not None
        line = await self.process.stdout.readline()
        if not line:
            raise ConnectionError("the render worker stopped")
        return json.loads(line)

    async def render(self, request: bytes) -> Any:
        assert self.process.stdin is not None
        self.process.stdin.write(request)
        await self.process.stdin.drain()
        return await self._read()

    async def kill(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        try:
            async with asyncio.timeout(KILL_WAIT_SECONDS):
                await self.process.wait()
        except TimeoutError:
            # Its exit was never reported (a child watcher replaced after it started drops
            # its handlers): reap it here rather than hold its slot in the pool forever.
            with contextlib.suppress(ChildProcessError):
                os.waitpid(self.process.pid, os.WNOHANG)  # noqa: ASYNC222 - WNOHANG: no wait
            # Its transport still counts it as running: closed here, not left to warn
            # (ResourceWarning) when collected.
            transport = getattr(self.process, "_transport", None)
            if transport is not None:
                transport.close()
        SPAWNED.discard(self.process.pid)


def _argv_of(answer: Any) -> list[str]:
    """The worker's answer as an argv, or the CompositionError it reported."""
    if isinstance(answer, dict):
        error, argv = answer.get("error"), answer.get("argv")
        if isinstance(error, str):
            raise CompositionError(error)
        if isinstance(argv, list) and argv and all(isinstance(arg, str) for arg in argv):
            return argv
    raise ConnectionError("the render worker answered nonsense")


class RenderPool:
    """Up to `size` worker processes that render templates with a time and memory limit."""

    def __init__(self, size: int, timeout_seconds: float, memory_bytes: int) -> None:
        self.size = size
        self.timeout_seconds = timeout_seconds
        self.memory_bytes = memory_bytes
        self._idle: list[_Worker] = []
        self._live: set[_Worker] = set()
        self._starting = 0
        self._changed = asyncio.Condition()
        self._closed = False
        self._replacing: set[asyncio.Task[None]] = set()

    @classmethod
    def from_settings(cls, settings: Settings) -> RenderPool:
        """The pool the settings describe (no process starts before the first render)."""
        return cls(
            settings.render_workers, settings.render_timeout_seconds, settings.render_memory_bytes
        )

    @property
    def closed(self) -> bool:
        """True once `close` ran: nothing renders any more."""
        return self._closed

    @property
    def pids(self) -> list[int]:
        """The worker processes alive now."""
        return [worker.process.pid for worker in self._live]

    async def render(self, source: str, context: Mapping[str, Any]) -> list[str]:
        """Render `source` with `context` into an argv in a worker (raises CompositionError).
        A source without template syntax runs no code: it is split here, with no round trip."""
        argv = literal_argv(source)
        if argv is not None:
            return argv
        request = json.dumps({"source": source, "context": context}).encode() + b"\n"
        worker = await self._acquire()
        try:
            async with asyncio.timeout(self.timeout_seconds):
                answer = await worker.render(request)
            argv = _argv_of(answer)
        except CompositionError:
            await self._release(worker)
            raise
        except TimeoutError:
            await self._replace(worker)
            raise CompositionError(
                f"the template took longer than {self.timeout_seconds:g} s to render"
            ) from None
        except (ConnectionError, ValueError) as exc:  # it died (out of memory?) or talked nonsense
            await self._replace(worker)
            raise CompositionError(
                "the template's render worker stopped; a template may use at most "
                f"{_mib(self.memory_bytes)} to render"
            ) from exc
        except BaseException:  # cancelled mid-render: its answer must not reach the next caller
            await self._replace(worker)
            raise
        await self._release(worker)
        return argv

    async def close(self) -> None:
        """Kill every worker and wait for it (nothing survives the server)."""
        self._closed = True
        for task in list(self._replacing):
            task.cancel()
        await asyncio.gather(*self._replacing, return_exceptions=True)
        workers = list(self._live)
        self._idle.clear()
        self._live.clear()
        await asyncio.gather(*(worker.kill() for worker in workers))
        async with self._changed:
            self._changed.notify_all()

    # -- the pool's bookkeeping ---------------------------------------------------------

    async def _acquire(self) -> _Worker:
        """An idle worker, or a slot to start one in. The wait for one is bounded like a
        render: a pool that never frees a slot (a worker whose exit was never seen, once)
        must refuse renders, not hold every caller forever."""
        try:
            async with asyncio.timeout(self.timeout_seconds), self._changed:
                while True:
                    if self._closed:
                        raise CompositionError("the server is stopping; templates no longer render")
                    if self._idle:
                        return self._idle.pop()
                    if len(self._live) + self._starting < self.size:
                        self._starting += 1
                        break
                    await self._changed.wait()
        except TimeoutError:
            raise CompositionError(
                f"no render worker was free within {self.timeout_seconds:g} s (all {self.size} "
                "busy): the template was not rendered; try again when fewer commands start"
            ) from None
        return await self._start_worker()

    async def _start_worker(self) -> _Worker:
        """Start a worker for a slot already counted in `_starting`."""
        try:
            worker = await _Worker.start(self.memory_bytes)
        except (OSError, ConnectionError, ValueError, TimeoutError) as exc:
            await self._slot_freed()
            raise CompositionError(f"cannot start a template render worker: {exc}") from exc
        except BaseException:
            await self._slot_freed()
            raise
        async with self._changed:
            self._starting -= 1
            if self._closed:
                await worker.kill()
                raise CompositionError("the server is stopping; templates no longer render")
            self._live.add(worker)
        return worker

    async def _slot_freed(self) -> None:
        async with self._changed:
            self._starting -= 1
            self._changed.notify()

    async def _release(self, worker: _Worker) -> None:
        async with self._changed:
            if worker in self._live:
                self._idle.append(worker)
            self._changed.notify()

    async def _replace(self, worker: _Worker) -> None:
        """Kill a worker that overran or broke; a fresh one starts in the background."""
        self._live.discard(worker)
        await asyncio.shield(worker.kill())
        if self._closed:
            return
        async with self._changed:
            self._starting += 1
        task = asyncio.create_task(self._warm_one(), name="render-worker-start")
        self._replacing.add(task)
        task.add_done_callback(self._replacing.discard)

    async def _warm_one(self) -> None:
        with contextlib.suppress(CompositionError):
            await self._release(await self._start_worker())
