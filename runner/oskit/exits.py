"""Waiting for processes to exit, and for file descriptors to be readable, through the
event loop and pidfds (no polling, no thread)."""

from __future__ import annotations

import asyncio
import os
from collections.abc import Collection
from typing import Protocol


class Exits(Protocol):
    """A started process as `stop_group` and `leader_exit` see it (an asyncio Process or a
    Child); `returncode` is None until it has exited and been reaped."""

    @property
    def pid(self) -> int: ...

    @property
    def returncode(self) -> int | None: ...


async def wait_readable(fd: int) -> None:
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
            await wait_readable(pidfd)
        finally:
            os.close(pidfd)
    # The child watcher reaps it and sets the status a moment after the exit (no event);
    # a Child is reaped by the first look at its status.
    while (code := process.returncode) is None:  # noqa: ASYNC110
        await asyncio.sleep(0.002)
    return code
