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


def processes_of_command(command_id: int) -> list[int]:
    """PIDs on this host whose environment marks them as started for `command_id`."""
    marker = f"CORRAL_COMMAND_ID={command_id}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if marker in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def kill_leftovers(command_id: int, pgid: int | None) -> int:
    """SIGKILL what survives of a command's processes (after its runner died). Returns count."""
    pids = processes_of_command(command_id)
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGKILL)
    if pgid is not None and pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
    return len(pids)
