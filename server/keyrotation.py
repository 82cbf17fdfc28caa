"""`corral rotate-key`: re-encrypt every stored secret under a new key, batch by batch.

As the key is given:
- `CORRAL_SECRET_KEY=<new>,<old>[,...]`: every secret is re-encrypted under the first key
  (MultiFernet.rotate); afterwards the others can be removed from the variable.
- the key file `secret.key` (the embedded default): a new key is made in `secret.key.new`
  (kept when it exists, so an interrupted rotation resumes with the same key), every secret
  readable by the old or the new key is re-encrypted under the new one, then the new file
  replaces `secret.key` and the old key stays in `secret.key.old-<UTC time>`.

Each batch is a transaction of its own: an interruption loses at most one batch, which the
next run does again along with the rest (re-encrypting a secret twice is harmless, so a
second run simply rotates once more). A row is written only if it still holds what was read:
a secret a server wrote meanwhile (under the new key) is left as it is.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy import Column, ColumnElement, Select, Table, select, tuple_, update
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from server import migrate
from server.db import create_engine, create_sessionmaker
from server.models import Base
from server.secretbox import (
    SecretBox,
    SecretKeyError,
    configured_keys,
    generate_key,
    new_key_file,
    read_key_file,
    verify_secret_box,
)
from server.settings import SQLITE_FILENAME, Settings
from server.storage import PRIVATE_FILE_MODE

log = logging.getLogger("corral.keyrotation")

# corral_meta rows that hold ciphertext (absent ones are skipped); every other row is plain.
ENCRYPTED_META_KEYS = frozenset({"secret_check", "api_token_key"})
DEFAULT_BATCH_SIZE = 500

OnBatch = Callable[[str, int], None]  # (kind, rows in the batch just committed)


class KeyRotationError(SecretKeyError):
    """The rotation cannot start or go on; what is done so far stays readable."""


@dataclass(frozen=True)
class SecretColumn:
    """Where one kind of secret is stored."""

    kind: str  # as the report names them
    one: str  # and one of them
    table: str
    column: str
    only_keys: frozenset[str] = frozenset()  # rows whose primary key is one of these (or all)


SECRET_COLUMNS = (
    SecretColumn("service tokens", "service token", "services", "token_encrypted"),
    SecretColumn("profile tokens", "profile token", "profile_services", "token_encrypted"),
    SecretColumn("proxy credentials", "proxy credentials", "proxies", "credentials_encrypted"),
    SecretColumn("settings", "setting", "corral_meta", "value", only_keys=ENCRYPTED_META_KEYS),
)


@dataclass
class RotationReport:
    """What a rotation did, and where the keys now are."""

    counts: dict[str, int] = field(default_factory=dict)
    key_file: Path | None = None  # the key file now in use (key-file rotation only)
    old_key_file: Path | None = None  # where the old key is kept

    def summary(self) -> str:
        """`re-encrypted 3 service tokens, 2 profile tokens, ...`."""
        named = {spec.kind: spec.one for spec in SECRET_COLUMNS}
        done = [f"{n} {named[kind] if n == 1 else kind}" for kind, n in self.counts.items()]
        return "re-encrypted " + ", ".join(done)

    def lines(self) -> list[str]:
        """The report as the command prints it (never a key)."""
        if self.key_file is None:
            return [
                f"{self.summary()} under the first key of CORRAL_SECRET_KEY",
                "the other key(s) can now be removed from CORRAL_SECRET_KEY, once every Corral "
                "process runs with the new first key and no backup from before now needs them",
            ]
        return [
            f"{self.summary()} under a new key, now in {self.key_file}",
            f"the old key is kept in {self.old_key_file}: delete it once no backup of the "
            "database from before now needs it",
        ]


async def rotate_key(
    settings: Settings, *, batch_size: int = DEFAULT_BATCH_SIZE, on_batch: OnBatch | None = None
) -> RotationReport:
    """Re-encrypt every stored secret under the new key (see the module's docstring)."""
    keys = configured_keys(settings)
    if keys is None:
        return await _rotate_key_file(settings, batch_size, on_batch)
    if len(keys) < 2:
        raise KeyRotationError(
            "CORRAL_SECRET_KEY holds one key: there is nothing to rotate to. Put a new key "
            "first (`corral genkey`) and keep the old one after a comma: "
            "CORRAL_SECRET_KEY=<new key>,<old key>"
        )
    refuse_if_served(settings)
    box = SecretBox(keys)
    counts = await rotate_secrets(settings, box, batch_size=batch_size, on_batch=on_batch)
    return RotationReport(counts)


async def _rotate_key_file(
    settings: Settings, batch_size: int, on_batch: OnBatch | None
) -> RotationReport:
    path = settings.secret_key_file.resolve()
    if not path.exists():
        raise KeyRotationError(
            f"there is no key to rotate: CORRAL_SECRET_KEY is unset and {path} does not exist"
        )
    refuse_if_served(settings)
    old = read_key_file(path)
    pending = new_key_file(path)
    if not pending.exists():
        _write_private(pending, generate_key())
    new = read_key_file(pending)
    try:
        box = SecretBox([new, old])
    except SecretKeyError as exc:
        raise KeyRotationError(f"{path} or {pending} does not hold a valid key") from exc
    counts = await rotate_secrets(settings, box, batch_size=batch_size, on_batch=on_batch)
    backup = _keep_old_key(path, old)
    os.replace(pending, path)
    _sync_folder(path.parent)
    log.info("the new key is in %s, the old one in %s", path, backup)
    return RotationReport(counts, key_file=path, old_key_file=backup)


async def rotate_secrets(
    settings: Settings, box: SecretBox, *, batch_size: int, on_batch: OnBatch | None = None
) -> dict[str, int]:
    """Re-encrypt every secret under the box's first key; how many of each kind."""
    engine = create_engine(settings)
    try:
        await _check_database(engine, box, settings)
        counts = {}
        for spec in SECRET_COLUMNS:
            counts[spec.kind] = await _rotate_column(engine, box, spec, batch_size, on_batch)
        return counts
    finally:
        await engine.dispose()


async def _check_database(engine: AsyncEngine, box: SecretBox, settings: Settings) -> None:
    try:
        current = await migrate.is_up_to_date(engine)
    except OSError as exc:
        raise KeyRotationError(f"cannot reach the database: {exc}") from exc
    if not current:
        raise KeyRotationError("the database is not migrated to this version: run `corral migrate`")
    async with create_sessionmaker(engine)() as session:
        try:
            await verify_secret_box(session, box)
        except SecretKeyError as exc:
            if settings.secret_key is not None:
                raise
            path = settings.secret_key_file.resolve()
            raise KeyRotationError(
                f"neither {path} nor {new_key_file(path)} holds the key this database's "
                "secrets were encrypted with"
            ) from exc
        await session.commit()


async def _rotate_column(
    engine: AsyncEngine,
    box: SecretBox,
    spec: SecretColumn,
    batch_size: int,
    on_batch: OnBatch | None,
) -> int:
    table = Base.metadata.tables[spec.table]
    done = 0
    after: Sequence[Any] | None = None
    while True:
        async with engine.begin() as connection:
            rows = (await connection.execute(_next_batch(table, spec, batch_size, after))).all()
            for row in rows:
                done += await _rotate_row(connection, box, table, spec, tuple(row))
        if not rows:
            return done
        after = tuple(rows[-1])[:-1]
        log.info("re-encrypted a batch of %d %s", len(rows), spec.kind)
        if on_batch is not None:
            on_batch(spec.kind, len(rows))
        if len(rows) < batch_size:
            return done


def _next_batch(
    table: Table, spec: SecretColumn, batch_size: int, after: Sequence[Any] | None
) -> Select[Any]:
    keys = list(table.primary_key.columns)
    value = table.c[spec.column]
    query = select(*keys, value).where(value.is_not(None)).order_by(*keys).limit(batch_size)
    if spec.only_keys:
        query = query.where(keys[0].in_(sorted(spec.only_keys)))
    if after is not None:
        query = query.where(_beyond(keys, after))
    return query


def _beyond(keys: list[Column[Any]], after: Sequence[Any]) -> ColumnElement[bool]:
    """Rows after `after` in primary-key order: `id > x`, or `(a, b) > (x, y)`."""
    one = len(keys) == 1
    beyond: ColumnElement[bool] = keys[0] > after[0] if one else tuple_(*keys) > tuple_(*after)
    return beyond


async def _rotate_row(
    connection: AsyncConnection,
    box: SecretBox,
    table: Table,
    spec: SecretColumn,
    row: tuple[Any, ...],
) -> int:
    """Re-encrypt one row's secret; 1, or 0 when the row changed since it was read."""
    *key_values, stored = row
    keys = list(zip(table.primary_key.columns, key_values, strict=True))
    as_text = isinstance(stored, str)
    try:
        rotated = box.rotate(stored.encode() if as_text else stored)
    except SecretKeyError as exc:
        where = ", ".join(f"{column.name} {key}" for column, key in keys)
        raise KeyRotationError(
            f"the secret in {spec.table}.{spec.column} of the row with {where} does not "
            "decrypt with any key given; its batch was left as it was and the rest stays "
            "readable: clear or replace that secret, then run `corral rotate-key` again"
        ) from exc
    value = table.c[spec.column]
    matches = [column == key for column, key in keys]
    result = await connection.execute(
        update(table)
        .where(*matches, value == stored)
        .values({spec.column: rotated.decode() if as_text else rotated})
    )
    return result.rowcount


def refuse_if_served(settings: Settings) -> None:
    """Refuse while another process has the embedded database open (a `corral serve` would
    go on with the old key); a cheap look at /proc, so Linux only."""
    if not settings.is_embedded:
        return
    database = (settings.data_dir / SQLITE_FILENAME).resolve()
    pid = _holder_of(database)
    if pid is not None:
        raise KeyRotationError(
            f"process {pid} has the embedded database {database} open: stop `corral serve` "
            "(and any other Corral on it) first"
        )


def _holder_of(path: Path) -> int | None:
    target = str(path)
    try:
        pids = [int(name) for name in os.listdir("/proc") if name.isdigit()]
    except OSError:
        return None
    for pid in pids:
        if pid == os.getpid():
            continue
        folder = f"/proc/{pid}/fd"
        try:
            fds = os.listdir(folder)
        except OSError:  # gone, or another user's
            continue
        for fd in fds:
            try:
                if os.readlink(f"{folder}/{fd}") == target:
                    return pid
            except OSError:
                continue
    return None


def _keep_old_key(path: Path, key: bytes) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%dT%H%M%SZ")
    backup = path.with_name(f"{path.name}.old-{stamp}")
    number = 1
    while backup.exists():
        number += 1
        backup = path.with_name(f"{path.name}.old-{stamp}-{number}")
    _write_private(backup, key.decode())
    return backup


def _write_private(path: Path, text: str) -> None:
    """Write a 0600 file whole or not at all: a temporary file, synced, renamed."""
    partial = path.with_name(path.name + ".partial")
    fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, PRIVATE_FILE_MODE)
    with os.fdopen(fd, "w") as handle:
        handle.write(text + "\n")
        handle.flush()
        os.fsync(handle.fileno())
    os.chmod(partial, PRIVATE_FILE_MODE)  # a leftover partial file may have had another mode
    os.replace(partial, path)
    _sync_folder(path.parent)


def _sync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
