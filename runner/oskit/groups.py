"""Process groups: whether one is alive, and stopping one as a whole (TERM, grace, KILL),
its leader always reaped."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal

from runner.oskit.exits import Exits, leader_exit, wait_exits
from runner.oskit.subreaper import is_subreaper, reap_adopted


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
    if not is_subreaper():
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
