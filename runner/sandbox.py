"""The wall between a command and Corral's own files: a bubblewrap sandbox, another user,
or none (and a warning). Chosen once when a runner starts (`choose_sandbox`).

- `bwrap`: the child sees read-only system paths and Corral's own code, its working
  directory and its profile's dir read-write, a private /tmp and /dev/shm, and a /proc of
  its own PID namespace. The data dir, other commands' and other profiles' folders and the
  server's /proc/<pid>/environ are not there. When the command's first process ends, the
  namespace's init (bwrap) ends and the kernel kills whatever is left in it, wherever it
  went (setsid, a cleared environment): nothing escapes. The network is shared: commands
  need it, and their proxy sidecar listens on 127.0.0.1.
- `user`: the child runs as an unprivileged user (CORRAL_RUN_AS) when Corral runs as root;
  the data dir (0700) and its files (0600) are the server's.
- `none`: the child runs as the server's user and can read what it can.
"""

from __future__ import annotations

import errno
import functools
import logging
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from server.settings import Settings

log = logging.getLogger("corral.sandbox")

# Top-level system folders a program may need, bound read-only (as the symlinks they are
# on merged-/usr systems). /root, /home, /srv, /var, /work ... stay out.
SYSTEM_DIRS = ("/usr", "/etc", "/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32")
PRIVATE_SCRATCH = ("/dev/shm", "/tmp")  # noqa: S108 - fresh tmpfs mounts in the sandbox
PROBE_TIMEOUT = 10.0
BWRAP = "bwrap"
USER = "user"
NONE = "none"


class SandboxError(Exception):
    """The protection asked for cannot be had here (message for the admin)."""


@dataclass(frozen=True)
class RunAs:
    """The unprivileged user commands run as."""

    name: str
    uid: int
    gid: int


@dataclass(frozen=True)
class Sandbox:
    """How commands are started: `wrap` their argv, spawn with `popen_options`."""

    mode: str
    run_as: RunAs | None = None
    bwrap: str | None = None
    read_only: tuple[str, ...] = ()
    hidden: tuple[str, ...] = ()  # private folders under a read-only one: covered up
    note: str = ""

    @property
    def protected(self) -> bool:
        """Whether commands are kept from Corral's private files."""
        return self.mode != NONE

    @property
    def contains_processes(self) -> bool:
        """Whether nothing of a command outlives its process group: its processes live in a
        PID namespace (--unshare-pid) whose init is in the group, and the kernel kills what
        is left in a namespace when its init ends, wherever it went (setsid ...)."""
        return self.mode == BWRAP and self.bwrap is not None

    def wrap(self, argv: Sequence[str], workdir: str, writable: Iterable[str] = ()) -> list[str]:
        """The argv that runs `argv` in the sandbox, in `workdir`, with `writable` folders
        (which must exist) read-write."""
        if self.mode != BWRAP or self.bwrap is None:
            return list(argv)
        # --unshare-pid: what `contains_processes` stands on.
        args = [self.bwrap, "--unshare-pid", "--unshare-ipc", "--unshare-uts"]
        args += _system_binds()
        args += ["--proc", "/proc", "--dev", "/dev"]
        # The private scratch folders first: what is bound below may live under /tmp (Corral
        # itself, a clone in /tmp, or its data dir and workspace), and a later tmpfs would
        # cover it up.
        for scratch in PRIVATE_SCRATCH:  # empty, the command's own, gone with it
            args += ["--perms", "1777", "--tmpfs", scratch]
        for path in self.read_only:
            args += ["--ro-bind-try", path, path]
        for path in self.hidden:
            args += ["--tmpfs", path]
        for path in (workdir, *writable):
            args += ["--bind", path, path]
        # No --die-with-parent: it ties the sandbox to bwrap's own monitor process, which
        # the group's SIGTERM kills at once; the command would lose its grace period.
        # The group's SIGKILL, or the end of the command, ends the namespace anyway.
        args += ["--chdir", workdir, "--", *argv]
        return args

    def check_program(self, program: str, path: str, cwd: str) -> None:
        """Raise OSError, as exec would, when `program` cannot be found or run: inside
        bwrap the failure would only be bwrap's exit status 1 and a line on stderr."""
        if self.mode != BWRAP:
            return
        if "/" in program:
            found: str | None = os.path.join(cwd, program)
            if not os.path.exists(found or ""):
                found = None
        else:
            found = shutil.which(program, mode=os.F_OK, path=path)
        if found is None:
            raise FileNotFoundError(errno.ENOENT, os.strerror(errno.ENOENT), program)
        if os.path.isdir(found) or not os.access(found, os.X_OK):
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), program)

    def popen_options(self) -> dict[str, Any]:
        """Keyword arguments for subprocess.Popen: the run-as user, when there is one."""
        if self.run_as is None:
            return {}
        return {"user": self.run_as.uid, "group": self.run_as.gid, "extra_groups": []}

    def describe(self) -> str:
        """One line: which protection is in force."""
        who = f" as user {self.run_as.name!r} (uid {self.run_as.uid})" if self.run_as else ""
        if self.mode == BWRAP:
            text = (
                f"commands run in a bubblewrap sandbox{who}: read-only system paths, their "
                "working directory and their profile's dir; not Corral's data dir"
            )
        elif self.mode == USER:
            text = f"commands run{who}, which cannot read Corral's data dir"
        else:
            text = (
                "NO protection: commands run as this server's user and can read its database "
                "and secret key (install bubblewrap, or run as root with CORRAL_RUN_AS)"
            )
        return text + (f" ({self.note})" if self.note else "")


def _system_binds() -> list[str]:
    return list(_system_binds_cached())


@functools.cache
def _system_binds_cached() -> tuple[str, ...]:
    args: list[str] = []
    for path in SYSTEM_DIRS:
        if os.path.islink(path):
            args += ["--symlink", os.readlink(path), path]
        elif os.path.isdir(path):
            args += ["--ro-bind", path, path]
    return tuple(args)


def choose_sandbox(settings: Settings, code_dirs: Iterable[Path] = ()) -> Sandbox:
    """The protection CORRAL_SANDBOX asks for, checked here (bwrap is tried once);
    SandboxError when an explicit choice cannot be had."""
    run_as = _run_as(settings)
    mode = settings.sandbox
    if mode in (BWRAP, "auto"):
        binary = shutil.which(BWRAP)
        reason = "bubblewrap (bwrap) is not installed" if binary is None else None
        if binary is not None:
            readable = _read_only(settings, code_dirs)
            if run_as is not None:  # what it could not reach anyway (bwrap would fail)
                readable = [p for p in readable if _barrier(Path(p), run_as) is None]
            sandbox = Sandbox(
                BWRAP,
                run_as=run_as,
                bwrap=binary,
                read_only=tuple(readable),
                hidden=tuple(_hidden(settings, code_dirs)),
            )
            reason = probe(sandbox)
            if reason is None:
                return sandbox
        if mode == BWRAP:
            raise SandboxError(f"CORRAL_SANDBOX=bwrap, but {reason}")
        note = f"bwrap: {reason}"
        if run_as is not None:
            return Sandbox(USER, run_as=run_as, note=note)
        return Sandbox(NONE, note=note)
    if mode == USER:
        if run_as is None:
            raise SandboxError("CORRAL_SANDBOX=user needs CORRAL_RUN_AS and Corral running as root")
        return Sandbox(USER, run_as=run_as)
    return Sandbox(NONE)


def check_reachable(path: Path, run_as: RunAs) -> None:
    """SandboxError unless the run-as user may pass through every folder down to `path`
    (e.g. a workspace under /root, which is 0700, is out of its reach)."""
    barrier = _barrier(path, run_as)
    if barrier is not None:
        raise SandboxError(
            f"the workspace {path} is out of reach of CORRAL_RUN_AS={run_as.name} "
            f"({barrier} is mode {barrier.stat().st_mode & 0o777:o}): set "
            "CORRAL_WORKSPACE_DIR to a folder it can reach"
        )


def _barrier(path: Path, run_as: RunAs) -> Path | None:
    """The first folder on the way to `path` that the user may not pass through."""
    groups = {run_as.gid, *os.getgrouplist(run_as.name, run_as.gid)}
    for folder in [*reversed(path.parents), path]:
        try:
            info = folder.stat()
        except FileNotFoundError:
            return None  # made later, by Corral, for the user
        if info.st_uid == run_as.uid:
            bit = 0o100
        elif info.st_gid in groups:
            bit = 0o010
        else:
            bit = 0o001
        if not info.st_mode & bit:
            return folder
    return None


def _run_as(settings: Settings) -> RunAs | None:
    if not settings.run_as:
        return None
    if os.geteuid() != 0:
        raise SandboxError(
            f"CORRAL_RUN_AS={settings.run_as} needs Corral to run as root (it runs as uid "
            f"{os.geteuid()}): unset it, or start Corral as root"
        )
    try:
        entry = pwd.getpwnam(settings.run_as)
    except KeyError:
        raise SandboxError(f"CORRAL_RUN_AS: no user {settings.run_as!r} on this host") from None
    if entry.pw_uid == 0:
        raise SandboxError("CORRAL_RUN_AS must name an unprivileged user, not root")
    return RunAs(entry.pw_name, entry.pw_uid, entry.pw_gid)


def _read_only(settings: Settings, code_dirs: Iterable[Path]) -> list[str]:
    """Folders a sandboxed command may read besides the system: Corral's code (the runner's
    tools and its Node modules wherever they really are), the Python running Corral, the
    scripts dir, Chromium's folder and the admin's extra paths."""
    wanted: list[Path] = [*code_dirs, Path(sys.prefix), Path(sys.base_prefix)]
    if settings.scripts_dir is not None:
        wanted.append(settings.scripts_dir)
    wanted.append(Path(os.path.realpath(settings.chromium_path)).parent)
    wanted += settings.sandbox_paths
    paths: list[str] = []
    for path in wanted:
        for candidate in {os.path.abspath(path), os.path.realpath(path)}:
            if os.path.exists(candidate) and not _covered(candidate, [*paths, "/usr", "/etc"]):
                paths = [p for p in paths if not _under(p, candidate)] + [candidate]
    return sorted(paths)


def _hidden(settings: Settings, code_dirs: Iterable[Path]) -> list[str]:
    """Corral's data dir and the workspace, when a readable folder contains them (e.g. the
    scripts dir is the project that holds `.corral`): an empty tmpfs covers them."""
    readable = _read_only(settings, code_dirs)
    private = [settings.data_dir.resolve(), settings.resolved_workspace_dir]
    return [str(path) for path in private if _covered(str(path), readable)]


def _under(path: str, parent: str) -> bool:
    return path == parent or path.startswith(parent.rstrip("/") + "/")


def _covered(path: str, parents: Iterable[str]) -> bool:
    return any(_under(path, parent) for parent in parents)


def probe(sandbox: Sandbox) -> str | None:
    """Start `true` in the sandbox once: None when it works, else why not."""
    return _probe(sandbox.bwrap or "", sandbox.run_as, sandbox.read_only, sandbox.hidden)


@functools.cache
def _probe(
    binary: str, run_as: RunAs | None, read_only: tuple[str, ...], hidden: tuple[str, ...]
) -> str | None:
    sandbox = Sandbox(BWRAP, run_as=run_as, bwrap=binary, read_only=read_only, hidden=hidden)
    with tempfile.TemporaryDirectory(prefix="corral-probe-") as folder:
        if run_as is not None:
            os.chown(folder, run_as.uid, run_as.gid)
        try:
            done = subprocess.run(
                sandbox.wrap(["true"], folder),
                capture_output=True,
                timeout=PROBE_TIMEOUT,
                check=False,
                env={"PATH": "/usr/bin:/bin"},
                **sandbox.popen_options(),
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            return f"it cannot run here ({exc})"
    if done.returncode != 0:
        error = done.stderr.decode(errors="replace").strip().splitlines()
        return f"it does not work here ({error[-1] if error else f'status {done.returncode}'})"
    return None
