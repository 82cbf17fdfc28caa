"""The runner's redactor of every secret Corral holds, kept fresh for every running command.

A command prints whatever it can read; its own secrets are not the only ones it might
find. Every writer masks all stored tokens and proxy passwords, the secret keys and the
database password, plus the command's own secrets (its proxy user name too).

Reloading reads the stored ciphertexts (one query) and decrypts only those not seen
before; the automaton is rebuilt only when the set changed, and then handed to every
live writer. The cache is stale when the API announces a committed secret write (in this
process) or after `refresh_seconds` (writes by other processes).
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
import weakref
from collections.abc import Callable, Iterable
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from runner.lines import Redactor, secret_forms
from runner.logwriter import LogWriter
from server.db import READ_ONLY
from server.events import log_event
from server.known_secrets import plaintexts, stored_ciphertexts
from server.secretbox import SecretBox, SecretKeyError

log = logging.getLogger("corral.runner")


@functools.lru_cache(maxsize=128)
def _own_redactor(forms: frozenset[str]) -> Redactor:
    """A command's own secrets outside the known set (a proxy user name): the same few sets
    come back claim after claim, and building an automaton costs ~50 us."""
    return Redactor.of_forms(forms)


class KnownSecrets:
    """Every secret in the database and the process, as one Redactor, reloaded when stale."""

    def __init__(
        self,
        sessionmaker: async_sessionmaker[AsyncSession],
        box: SecretBox,
        process_secrets: Iterable[str],
        refresh_seconds: float,
    ) -> None:
        self._sessionmaker = sessionmaker
        self._box = box
        self._process_secrets = list(process_secrets)
        self.refresh_seconds = refresh_seconds
        self._plain: dict[bytes, list[str]] = {}
        self.redactor = Redactor(self._process_secrets)
        self._loaded_at = -math.inf
        self._generation = 0  # bumped by `invalidate`: a reload under way may be stale
        self._lock = asyncio.Lock()
        self._failing = False  # reloading failed (the database away): said once
        self._writers: weakref.WeakKeyDictionary[LogWriter, frozenset[str]] = (
            weakref.WeakKeyDictionary()
        )
        self.reloads = 0  # how many times the database was read (for tests and metrics)

    def invalidate(self) -> None:
        """A secret changed: the next `refresh` reads the database."""
        self._generation += 1
        self._loaded_at = -math.inf

    @property
    def stale(self) -> bool:
        return time.monotonic() - self._loaded_at >= self.refresh_seconds

    async def refresh(self) -> None:
        """Reload when stale (concurrent callers share one reload)."""
        if not self.stale:
            return
        async with self._lock:
            if self.stale:
                await self._reload()

    async def refresh_or_keep(self) -> None:
        """`refresh`; while the database is away, keep masking what is known (one WARNING
        when reloading starts failing, one INFO line when it works again)."""
        try:
            await self.refresh()
        except Exception as exc:
            level = "debug" if self._failing else "warning"
            self._failing = True
            log_event("secrets_reload_failed", level=level, error=type(exc).__name__)
            return
        if self._failing:
            self._failing = False
            log_event("secrets_reloaded")

    async def watch(self, changes: Any, running: Callable[[], bool]) -> None:
        """Reload when the API announces a changed secret (`changes`, a broker
        subscription), and every refresh interval while commands run (`running()`), for
        changes made by other processes. Forever; cancel it."""
        while True:
            try:
                await asyncio.wait_for(changes.get(), self.refresh_seconds)
                changes.resync()
                self.invalidate()
            except TimeoutError:
                if not running():
                    continue
            await self.refresh_or_keep()

    def attach(self, writer: LogWriter, own: Iterable[str]) -> None:
        """Mask every known secret and the command's own in this writer's lines, from now
        on and after each reload."""
        forms = secret_forms(own)
        self._writers[writer] = forms
        writer.redactor = self._with(forms)

    def _with(self, forms: frozenset[str]) -> Redactor:
        if forms <= self.redactor.forms:  # the usual case: nothing to build
            return self.redactor
        return self.redactor.joined(_own_redactor(forms))

    async def _reload(self) -> None:
        started, generation = time.monotonic(), self._generation
        async with self._sessionmaker() as session:
            # A read that must not take SQLite's write lock from the log store's flushes.
            await session.connection(execution_options=READ_ONLY)
            stored = await stored_ciphertexts(session)
        self.reloads += 1
        new = [(kind, ciphertext) for kind, ciphertext in stored if ciphertext not in self._plain]
        # Decrypting is the costly part (Fernet, ~30 us each): off the loop, new ones only.
        decrypted = await asyncio.to_thread(self._decrypt, new) if new else {}
        plain = {c: self._plain.get(c) or decrypted.get(c, []) for _, c in stored}
        changed = plain.keys() != self._plain.keys()
        self._plain = plain
        # A change announced while this read ran may have missed it: read again next time.
        self._loaded_at = started if generation == self._generation else -math.inf
        if changed:
            values = [*self._process_secrets, *(v for vs in plain.values() for v in vs)]
            self.redactor = await asyncio.to_thread(Redactor, values)
            for writer, forms in list(self._writers.items()):
                writer.redactor = self._with(forms)

    def _decrypt(self, stored: list[tuple[str, bytes]]) -> dict[bytes, list[str]]:
        found: dict[bytes, list[str]] = {}
        for kind, ciphertext in stored:
            try:
                found[ciphertext] = plaintexts(kind, ciphertext, self._box)
            except (SecretKeyError, ValueError):
                # Unreadable with this key ring: nothing to mask (it cannot be handed out).
                log.warning("event=secret_unreadable kind=%s", kind)
                found[ciphertext] = []
        return found
