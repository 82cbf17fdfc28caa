"""The commands' working directories (`<workspace>/commands/<id>`, 0700, the run-as user's)
and the profiles' user-data-dirs, made as the runner needs them."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from runner.sandbox import RunAs

WORKDIR_MODE = 0o700
WORKDIRS_REMEMBERED = 10_000


class Workdirs:
    """Working directories: the claimed commands' now (unless made ahead), the next ones'
    ahead of time in a thread of their own."""

    def __init__(self, commands_dir: Path) -> None:
        self.commands_dir = commands_dir
        self._files: ThreadPoolExecutor | None = None
        self._made: set[int] = set()  # working directories made ahead of their claim
        self._making: set[int] = set()  # the thread's still to make (or making)

    def start(self) -> None:
        self._files = ThreadPoolExecutor(1, thread_name_prefix="corral-files")

    def stop(self) -> None:
        if self._files is not None:
            self._files.shutdown(wait=False)

    def path(self, command_id: int) -> str:
        """The command's working directory."""
        return f"{self.commands_dir}/{command_id}"

    def prepare(self, claimed: list[int], upcoming: list[int], run_as: RunAs | None) -> None:
        """Working directories: the claimed commands' now (unless made ahead), the next
        ones' ahead of time in a thread (mkdir costs up to a millisecond on a busy disk)."""
        if len(self._made) > WORKDIRS_REMEMBERED:
            self._made.clear()
        # One the thread has not made yet is made here too (mkdir takes an existing one): on
        # a loaded host the thread can lag a claim, and a child cannot start in a missing
        # directory (its command failed as if its program were missing).
        missing = [command_id for command_id in claimed if command_id not in self._made]
        if missing:
            make_workdirs(self.commands_dir, missing, run_as)
        ahead = [
            command_id
            for command_id in upcoming
            if command_id not in self._made and command_id not in self._making
        ]
        if not ahead or self._files is None:
            return
        self._making.update(ahead)
        made = asyncio.get_running_loop().run_in_executor(
            self._files, make_workdirs, self.commands_dir, ahead, run_as
        )
        made.add_done_callback(functools.partial(self._made_ahead, ahead))

    def _made_ahead(self, ahead: list[int], made: asyncio.Future[None]) -> None:
        self._making.difference_update(ahead)
        if not made.cancelled() and made.exception() is None:  # else made when claimed
            self._made.update(ahead)


def profile_dir(path: str, run_as: RunAs | None) -> str:
    """The profile's user-data-dir, made (0700) if missing and the run-as user's (all of it,
    when an earlier run left files of another owner)."""
    os.makedirs(path, WORKDIR_MODE, exist_ok=True)
    if run_as is not None and os.stat(path).st_uid != run_as.uid:
        for root, dirs, files in os.walk(path):
            for name in (root, *(os.path.join(root, entry) for entry in dirs + files)):
                with contextlib.suppress(FileNotFoundError):
                    os.chown(name, run_as.uid, run_as.gid, follow_symlinks=False)
    return path


def make_workdirs(commands_dir: Path, command_ids: list[int], run_as: RunAs | None) -> None:
    """The working directory of each command: `<workspace>/commands/<id>` (0700, the
    run-as user's when there is one)."""
    for command_id in command_ids:
        path = f"{commands_dir}/{command_id}"
        try:
            os.mkdir(path, WORKDIR_MODE)
        except FileExistsError:
            pass
        except FileNotFoundError:
            os.makedirs(path, WORKDIR_MODE, exist_ok=True)
        if run_as is not None:
            os.chown(path, run_as.uid, run_as.gid)
