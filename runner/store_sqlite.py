"""The runner's store on SQLite: a connection and a thread of its own for the flushes.

A flush runs in the store's thread: a single statement keeps the thread out of the
interpreter while SQLite works (executemany would take and give back the GIL once per row,
and wait up to the switch interval each time the event loop is busy). Claims go through
the sqlite3 connection itself (SQLAlchemy's share of a claim was most of a short command's
flush).
"""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import Generator, Sequence
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Connection, Engine
from sqlalchemy.exc import IntegrityError

from runner import statements as sql
from runner.claims import (
    CLAIM_ROUNDS,
    ClaimRequest,
    ClaimResult,
    choose,
    first_window,
    gated,
    look_further,
    needs_busy,
    needs_held,
)
from runner.gate import Gate, Read, gate_reads, spend_rows
from runner.logwriter import FLUSH_LINES
from runner.store import (
    SessionOperations,
    StoreJob,
    WriteBatch,
    Written,
    refused_fences,
    run_function_job,
    write_events,
)
from runner.store_errors import JobFailed
from server.db import create_sync_engine, sqlite_timestamp
from server.models import utcnow
from server.proxy_health import FlaggedProxy, held_proxies

if TYPE_CHECKING:
    from runner.logwriter import Share


class SqliteStore(SessionOperations):
    """RunnerStore on SQLite."""

    dialect = "sqlite"
    # The JSON text of a flush is made in the store's thread, holding the GIL (and the event
    # loop) meanwhile, and the flush holds SQLite's one write lock: flushes stay small.
    flush_lines = FLUSH_LINES
    _sync_engine: Engine | None = None
    _executor: ThreadPoolExecutor | None = None

    def start(self) -> None:
        self._sync_engine = create_sync_engine(self.engine.url)
        self._executor = ThreadPoolExecutor(1, thread_name_prefix="corral-logstore")

    async def connect(self) -> None:
        assert self._executor is not None
        await asyncio.get_running_loop().run_in_executor(self._executor, self._connect)

    def _connect(self) -> None:
        assert self._sync_engine is not None
        self._sync_engine.connect().close()  # the pool keeps it (its one connection)

    async def close(self) -> None:
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
        if self._sync_engine is not None:
            self._sync_engine.dispose()
            self._sync_engine = None

    def build_batch(self, shares: Sequence[Share]) -> WriteBatch:
        batch = WriteBatch()
        self.group_updates(shares, batch)
        for share in shares:
            command_id = share.writer.command_id
            batch.sqlite_chunks.extend(
                [command_id, attempt, stream, sqlite_timestamp(ts), first, texts]
                for attempt, stream, ts, first, texts in share.runs
            )
        return batch

    async def write_batch(self, batch: WriteBatch, jobs: Sequence[StoreJob]) -> Written:
        assert self._executor is not None
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, self._transact, batch, jobs)

    async def claim(self, request: ClaimRequest) -> ClaimResult:
        written = await self.write_batch(WriteBatch(), [request])
        result: ClaimResult = written.results[0]
        return result

    def _transact(self, batch: WriteBatch, jobs: Sequence[StoreJob]) -> Written:
        """The whole flush, in the store's thread (BEGIN IMMEDIATE: the fence check and the
        writes see the same rows)."""
        assert self._sync_engine is not None
        with self._sync_engine.begin() as connection:
            refused = []
            if batch.fences:
                refused = _refused_fences(connection.connection.driver_connection, batch.fences)
                if refused:
                    batch = batch.without(refused)
            if batch.sqlite_chunks:
                text = json.dumps(batch.sqlite_chunks, ensure_ascii=False, separators=(",", ":"))
                connection.exec_driver_sql(sql.SQLITE_INSERT_LINES, (text,))
            for (columns, guarded), params in batch.updates.items():
                connection.execute(sql.command_update(columns, guarded), params)
            write_events(connection, batch.events)
            results = []
            for index, job in enumerate(jobs):
                try:
                    results.append(self._run_job(job, connection))
                except Exception as exc:
                    raise JobFailed(index, exc) from exc
            return Written(results, refused)

    def _run_job(self, job: StoreJob, connection: Connection) -> Any:
        if isinstance(job, ClaimRequest):
            return claim_on_sqlite(job, connection.connection.driver_connection)
        return run_function_job(connection, job)


def claim_on_sqlite(request: ClaimRequest, raw: Any) -> ClaimResult:
    """Claim up to `free` commands: priority then FIFO, due ones only, one running command
    per profile, none the rate-limit gate holds; also says which runnable ones come next,
    and why the others wait. Through the sqlite3 connection `raw` itself."""
    free, terms = request.begin(), request.terms
    now = utcnow()
    limit = first_window(free)
    for _ in range(CLAIM_ROUNDS):
        candidates = raw.execute(
            sql.SQLITE_CANDIDATES, (sqlite_timestamp(now), json.dumps(terms.affinities), limit)
        ).fetchall()
        if not candidates:
            return ClaimResult([])
        busy: dict[int, int] = {}
        if needs_busy(candidates):
            busy = dict(raw.execute(sql.BUSY_PROFILES).fetchall())
        held: dict[int, str] = {}
        if needs_held(terms, candidates):
            flagged = raw.execute(sql.SQLITE_FLAGGED, (terms.proxy_flag_after,)).fetchall()
            if flagged:
                held = held_proxies(
                    (FlaggedProxy(*row) for row in flagged), raw.execute(sql.VIA_LINKS)
                )
        gate = None
        if any(row[8] for row in candidates):
            gate = _drive_gate(raw, gate_reads(gated(candidates), now, lock=False))
        choice = choose(candidates, busy, request.slots(free), gate, held)
        if not look_further(choice, candidates, free, limit):
            break
        limit *= 4
    if choice.waiting:
        raw.executemany(
            sql.SQLITE_MARK_WAITING,
            [
                (status, reason, until and sqlite_timestamp(until), command_id)
                for status, reason, until, command_id in choice.waiting
            ],
        )
    for command_id, error in choice.failed:
        _fail_at_gate(raw, command_id, error, now)
    if not choice.chosen:
        return choice.result([])
    choice.chosen = {key: _sqlite_datetime(since) for key, since in choice.chosen.items()}
    try:
        rows = raw.execute(
            sql.SQLITE_CLAIM,
            (
                terms.runner_id,
                terms.host,
                sqlite_timestamp(terms.lease(now)),
                sqlite_timestamp(now),
                json.dumps(list(choice.chosen)),
            ),
        ).fetchall()
    except sqlite3.IntegrityError as exc:  # say it as SQLAlchemy does
        raise IntegrityError("claim", None, exc) from exc
    if choice.gate is not None:
        spends = spend_rows(choice.gate, [row[0] for row in rows], now)
        raw.executemany(sql.SQLITE_SPEND, [sql.sqlite_params(row) for row in spends])
    return choice.result([_decode_json_columns(row) for row in rows])


def _refused_fences(raw: Any, fences: dict[int, int]) -> list[int]:
    """The commands whose token is not the one their share carries."""
    held = dict(raw.execute(sql.SQLITE_FENCES, (json.dumps(list(fences)),)).fetchall())
    return refused_fences(fences, held)


def _drive_gate(raw: Any, reads: Generator[Read, Any, Gate]) -> Gate:
    """Run the gate's reads on a sqlite3 connection."""
    try:
        name, params = next(reads)
        while True:
            rows = raw.execute(sql.SQLITE_GATE[name], sql.sqlite_params(params)).fetchall()
            name, params = reads.send(rows)
    except StopIteration as done:
        gate: Gate = done.value
        return gate


def _fail_at_gate(raw: Any, command_id: int, error: str, now: datetime) -> None:
    """A command the gate fails (its token is invalid), with the reason in its log."""
    stamp = sqlite_timestamp(now)
    row = raw.execute(sql.SQLITE_FAIL_AT_GATE, (error, stamp, command_id)).fetchone()
    if row is not None:
        line = (command_id, row[1], row[2], stamp, f"not started: {error}")
        raw.execute(sql.SQLITE_FAIL_LINE, line)


def _decode_json_columns(row: tuple[Any, ...]) -> tuple[Any, ...]:
    """A claimed row from sqlite3: its JSON columns (params, env) are still text."""
    values = list(row)
    for index in sql.CLAIMED_JSON_FIELDS:
        if values[index] is not None:
            values[index] = json.loads(values[index])
    return tuple(values)


def _sqlite_datetime(value: str) -> datetime:
    """A timestamp as SQLite keeps it (naive UTC text), as the aware datetime it stands for."""
    return datetime.fromisoformat(value).replace(tzinfo=UTC)
