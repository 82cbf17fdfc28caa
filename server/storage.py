"""Where Corral keeps files: its private data dir, and the workspace commands may touch.

The data dir (0700) holds the embedded database and the secret key (0600 each): nothing a
command runs with may read them. Commands' working directories and profiles' default
user-data-dirs live in the workspace, beside it (`<data dir>-work` unless set), so a
sandbox can show a command its own folders without the private ones.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path

from server.settings import Settings

log = logging.getLogger("corral.storage")

PRIVATE_DIR_MODE = 0o700
PRIVATE_FILE_MODE = 0o600
WORKSPACE_MODE = 0o711  # a run-as user reaches its own folders, but lists nobody's
SQLITE_SIDE_FILES = ("-wal", "-shm", "-journal")


def tighten(path: Path, mode: int) -> bool:
    """Take away every permission `mode` does not give (an INFO line says so); False when
    the path does not exist."""
    try:
        current = path.stat().st_mode & 0o777
    except FileNotFoundError:
        return False
    if current & ~mode:
        os.chmod(path, current & mode)
        log.info("tightened %s from mode %o to %o", path, current, current & mode)
    return True


def secure_data_dir(data_dir: Path) -> None:
    """Make the data dir (0700), or tighten it if it exists with looser modes."""
    if not tighten(data_dir, PRIVATE_DIR_MODE):
        data_dir.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)


def secure_sqlite_file(path: Path) -> None:
    """Create the SQLite file 0600 before SQLite does (it would follow the umask; its -wal
    and -shm files copy the database's mode), or tighten it and its side files. Its folder
    is made 0700 when missing; an existing one is left as it is (a database named outside
    the data dir, in /tmp say, must not take the folder's modes away from everyone else)."""
    if not path.parent.exists():
        path.parent.mkdir(mode=PRIVATE_DIR_MODE, parents=True, exist_ok=True)
    try:
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE))
    except FileExistsError:
        tighten(path, PRIVATE_FILE_MODE)
    for suffix in SQLITE_SIDE_FILES:
        tighten(path.with_name(path.name + suffix), PRIVATE_FILE_MODE)


def prepare_workspace(settings: Settings) -> None:
    """Make the workspace and its two folders; move profiles' dirs an older Corral kept in
    the data dir (`<data dir>/profiles/<id>`) to their new default place."""
    for folder in (settings.resolved_workspace_dir, settings.commands_dir, settings.profiles_dir):
        folder.mkdir(mode=WORKSPACE_MODE, parents=True, exist_ok=True)
    legacy = settings.data_dir.resolve() / "profiles"
    if not legacy.is_dir():
        return
    for entry in sorted(legacy.iterdir()):
        target = settings.profiles_dir / entry.name
        if target.exists() or not entry.is_dir() or _in_use(entry):
            continue
        try:
            entry.rename(target)
        except OSError as exc:  # another file system, ...: the profile starts afresh
            log.warning("could not move the profile dir %s to %s: %s", entry, target, exc)
            continue
        log.info("moved the profile dir %s to %s (out of the private data dir)", entry, target)


def _in_use(profile_dir: Path) -> bool:
    """Whether a Chromium on this host holds the profile (its SingletonLock names a live PID)."""
    try:
        target = os.readlink(profile_dir / "SingletonLock")
    except OSError:
        return False
    host, _, pid = target.rpartition("-")
    if host != socket.gethostname() or not pid.isdigit():
        return True  # another host's, or not a lock we understand: leave it where it is
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


# A profile's own user-data-dir is bound read-write into its commands' sandbox (and, with
# CORRAL_RUN_AS, handed to that user): it must not open up Corral's private files, other
# commands' folders or the system.
_SYSTEM_TREES = (
    "/usr",
    "/etc",
    "/bin",
    "/sbin",
    "/lib",
    "/lib32",
    "/lib64",
    "/libx32",
    "/boot",
    "/proc",
    "/sys",
    "/dev",
    "/run",
)
_SHARED_ROOTS = ("/", "/home", "/root", "/var", "/tmp", "/opt", "/srv", "/mnt", "/media")  # noqa: S108


def profile_dir_problem(path: str, settings: Settings) -> str | None:
    """Why `path` cannot be a profile's own user-data-dir, or None when it can: not in or
    above Corral's data dir or workspace (the default profile dirs live there already), not
    a system folder, not `/`."""
    real = Path(os.path.realpath(path))
    private = {
        "Corral's data dir": Path(os.path.realpath(settings.data_dir)),
        "Corral's workspace": Path(os.path.realpath(settings.resolved_workspace_dir)),
    }
    for name, root in private.items():
        if real == root or root in real.parents:
            return f"userDataDir must not be inside {name} ({root})"
        if real in root.parents:
            return f"userDataDir must not contain {name} ({root})"
    if str(real) in _SHARED_ROOTS or any(
        real == Path(tree) or Path(tree) in real.parents for tree in _SYSTEM_TREES
    ):
        return f"userDataDir must not be a system folder ({real})"
    return None
