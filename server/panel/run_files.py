"""The files in a run's working directory (`<workspace>/commands/<id>`): the run page's
listing and `GET /runs/{id}/files/{path}`, a download (issue #17).

A command is untrusted code and its working directory is its own: whatever it leaves there
(symlinks to /etc/passwd, FIFOs, hard links) must not make the panel read outside it. So a
path is opened one component at a time from the directory's own descriptor with
O_NOFOLLOW (no symlink is followed, at any depth, and nothing can be swapped in between a
check and the open), and only a regular file with one link is sent. Absolute paths, `..`
and empty components are refused before anything is opened.

Downloads are for admins: unlike the log, the files are not redacted, and a command may
write the tokens it was handed into one. Viewers see the listing (names and sizes).
"""

from __future__ import annotations

import os
import stat
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from itertools import islice
from pathlib import Path
from urllib.parse import quote

import anyio
from sqlalchemy import select
from starlette.requests import Request
from starlette.responses import Response, StreamingResponse

from server.access import principal_of
from server.models import Command
from server.panel.common import app_services, error_page, not_found, path_id, reading

FILES_SHOWN = 200  # the run page lists at most this many files
ENTRIES_READ = 5_000  # a listing reads at most this many directory entries in all
CHUNK_BYTES = 64 * 1024
_DIR_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_DIRECTORY | os.O_CLOEXEC
_FILE_FLAGS = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC


@dataclass(frozen=True)
class RunFile:
    """A regular file of the run's directory, as the run page lists it."""

    path: str  # relative to the run's directory, "/"-separated
    size: int
    modified: datetime


@dataclass(frozen=True)
class RunFiles:
    files: list[RunFile]
    more: bool  # the listing stopped at FILES_SHOWN


def run_dir(request: Request, command_id: int) -> Path:
    return app_services(request).settings.commands_dir / str(command_id)


def list_files(root: Path, limit: int = FILES_SHOWN) -> RunFiles:
    """Regular files under `root` (symlinks neither listed nor followed), by path, at most
    `limit`; `more` when there are others, or when the walk stopped at ENTRIES_READ."""
    found: list[RunFile] = []
    for item in _walk(root):
        if item is None or len(found) == limit:
            return RunFiles(found, more=True)
        relative, info = item
        modified = datetime.fromtimestamp(info.st_mtime, UTC)
        found.append(RunFile(relative, info.st_size, modified))
    return RunFiles(found, more=False)


def _walk(root: Path) -> Iterator[tuple[str, os.stat_result] | None]:
    """The regular files under `root`, each folder's by name; None (and no more) once
    ENTRIES_READ entries were read with some left (a command may leave millions of files:
    the page of such a run took seconds and tens of MB on every view)."""
    budget = ENTRIES_READ
    pending = [""]
    while pending:
        folder = pending.pop()
        try:
            with os.scandir(root / folder) as scan:
                entries = list(islice(scan, budget + 1))
        except OSError:  # gone, or not ours to read
            continue
        cut, entries = len(entries) > budget, entries[:budget]
        budget -= len(entries)
        subfolders = []
        for entry in sorted(entries, key=lambda entry: entry.name):
            relative = f"{folder}/{entry.name}" if folder else entry.name
            if entry.is_dir(follow_symlinks=False):
                subfolders.append(relative)
            elif entry.is_file(follow_symlinks=False):
                info = entry.stat(follow_symlinks=False)
                if info.st_nlink == 1:  # as open_inside: a hard link is not the run's own
                    yield relative, info
        pending.extend(reversed(subfolders))
        if cut or (budget <= 0 and pending):
            yield None
            return


def safe_parts(path: str) -> list[str] | None:
    """The components of a relative path inside the run's directory; None for an absolute
    path, `..`, `.`, an empty component or a NUL."""
    if not path or path.startswith("/") or "\x00" in path or "\\" in path:
        return None
    parts = path.split("/")
    if any(part in ("", ".", "..") for part in parts):
        return None
    return parts


def open_inside(root: Path, parts: list[str]) -> int | None:
    """A descriptor of the regular file `parts` under `root`, never leaving it; None when
    there is no such file (or it is a symlink, a folder, a device, a FIFO, a hard link)."""
    try:
        folder = os.open(root, _DIR_FLAGS)
    except OSError:
        return None
    try:
        for part in parts[:-1]:
            inner = os.open(part, _DIR_FLAGS, dir_fd=folder)
            os.close(folder)
            folder = inner
        fd = os.open(parts[-1], _FILE_FLAGS, dir_fd=folder)
    except OSError:  # ELOOP for a symlink, ENOENT, ENOTDIR, EACCES
        return None
    finally:
        os.close(folder)
    info = os.fstat(fd)
    if not stat.S_ISREG(info.st_mode) or info.st_nlink != 1:
        os.close(fd)
        return None
    return fd


def content_disposition(name: str) -> str:
    """`attachment` with the file's name: an ASCII fallback and the exact UTF-8 one."""
    fallback = "".join(
        c if c.isascii() and c.isprintable() and c not in '"\\' else "_" for c in name
    )
    return f"attachment; filename=\"{fallback}\"; filename*=UTF-8''{quote(name, safe='')}"


async def _chunks(fd: int, size: int) -> AsyncIterator[bytes]:
    """The file's first `size` bytes (its length when opened: a file still growing must
    not overrun the Content-Length sent)."""
    with os.fdopen(fd, "rb", buffering=0) as file:
        while size > 0:
            chunk = await anyio.to_thread.run_sync(file.read, min(CHUNK_BYTES, size))
            if not chunk:
                return
            size -= len(chunk)
            yield chunk


async def run_file(request: Request) -> Response:
    """A file of the run's working directory, as a download (admins only)."""
    command_id = path_id(request, "command_id")
    if command_id is None:
        return not_found(request, "run")
    principal = principal_of(request.scope)
    if principal is None or not principal.is_admin:
        return error_page(request, 403, "Not allowed", "Only an admin can download a run's files.")
    async with reading(request) as session:
        if await session.scalar(select(Command.id).where(Command.id == command_id)) is None:
            return not_found(request, "run")
    parts = safe_parts(str(request.path_params["path"]))
    if parts is None:
        return not_found(request, "file")
    fd = await anyio.to_thread.run_sync(open_inside, run_dir(request, command_id), parts)
    if fd is None:
        return not_found(request, "file")
    size = os.fstat(fd).st_size
    headers = {
        "content-disposition": content_disposition(parts[-1]),
        "content-length": str(size),
        "x-content-type-options": "nosniff",
        "cache-control": "no-store",
    }
    return StreamingResponse(
        _chunks(fd, size), media_type="application/octet-stream", headers=headers
    )
