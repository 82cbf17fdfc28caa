"""The runner's store on PostgreSQL: one connection of its own (a pool checkout per flush
cost more than a short command's flush itself), replaced when it breaks and when old.

Lines go in through one statement per flush, whatever their number: a COPY (foreign key
checks make INSERT ... SELECT FROM unnest() slower), or for a few lines an INSERT from
arrays that is one statement with the flush's command updates (a flush of that statement
alone is one round trip). Claims go through the driver (asyncpg) itself: on a runner of
short commands, SQLAlchemy's share of the claim was the biggest.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Generator, Sequence
from datetime import datetime
from itertools import chain
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncConnection

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
from runner.store_errors import UNIQUE_VIOLATION, ConnectionLost, JobFailed
from server.models import utcnow
from server.proxy_health import FlaggedProxy, held_proxies

if TYPE_CHECKING:
    from runner.logwriter import Share
    from server.messages import LineRun

CONNECTION_MAX_AGE_SECONDS = 1800.0
COPY_MIN_LINES = 200  # fewer lines go in with the flush's one INSERT: a COPY costs more trips


class PostgresStore(SessionOperations):
    """RunnerStore on PostgreSQL."""

    dialect = "postgresql"
    # A busy command's backlog goes in fewer, larger COPYs: each flush's round trips
    # (BEGIN, fence check, COPY, values, COMMIT) leave PostgreSQL idle while the event loop
    # is busy elsewhere (streaming the lines to followers), and a flush costs the server
    # a commit. Its lines are still published in batches of FLUSH_LINES (LogStore).
    flush_lines = 4 * FLUSH_LINES
    skip_locked = True
    _connection: AsyncConnection | None = None
    _driver: Any = None  # its driver (asyncpg) connection
    _connected_at = 0.0

    def start(self) -> None:
        pass  # connected by `connect`, else at the first flush

    async def connect(self) -> None:
        await self._pg_connection()

    async def close(self) -> None:
        await self._drop_connection(broken=False)

    def build_batch(self, shares: Sequence[Share]) -> WriteBatch:
        batch = WriteBatch()
        self.group_updates(shares, batch)
        use_copy = sum(share.lines for share in shares) >= COPY_MIN_LINES
        for share in shares:
            command_id = share.writer.command_id
            if not use_copy:
                batch.pg_rows.extend((command_id, run) for run in share.runs)
                continue
            copy = "".join([_copy_rows(command_id, run) for run in share.runs])
            batch.pg_copy.append((command_id, copy))
        return batch

    async def claim(self, request: ClaimRequest) -> ClaimResult:
        written = await self.write_batch(WriteBatch(), [request])
        result: ClaimResult = written.results[0]
        return result

    async def write_batch(self, batch: WriteBatch, jobs: Sequence[StoreJob]) -> Written:
        connection, driver = await self._pg_connection()
        try:
            # One transaction of the driver's own; lines and command values go through the
            # driver itself (SQLAlchemy's share of a short command's flush was most of it).
            # SQLAlchemy runs the events and jobs in that same transaction: with AUTOCOMMIT
            # it begins none of its own. The fence check rides in the statement of lines and
            # values (no round trip of its own), unless a COPY or events are written too:
            # then it is a statement of its own, first.
            apart = bool(batch.fences) and bool(batch.pg_copy or batch.events)
            write = pg_write(batch, None if apart else batch.fences)
            if write is not None and not (batch.pg_copy or batch.events or jobs):
                refused = await driver.fetchval(write[0], *write[1])  # its own transaction
                return Written([], list(refused) if batch.fences else [])
            async with driver.transaction():
                refused = []
                if apart:
                    refused = await _refused_fences(driver, batch.fences)
                    if refused:
                        batch = batch.without(refused)
                        write = pg_write(batch)
                if batch.pg_copy:  # COPY: the fastest way in (foreign key checks included)
                    text = "".join(copy for _, copy in batch.pg_copy)
                    await driver.copy_to_table(
                        "log_lines",
                        source=_one_chunk(text.encode()),
                        columns=sql.LINE_COLUMNS,
                        format="text",
                    )
                if write is not None:
                    found = await driver.fetchval(write[0], *write[1])
                    if batch.fences and not apart:
                        refused = list(found)
                if batch.events:
                    await connection.run_sync(write_events, batch.events)
                results = [
                    await self._run_job(index, job, connection, driver)
                    for index, job in enumerate(jobs)
                ]
                return Written(results, refused)
        except JobFailed as failed:
            if driver.is_closed():  # the connection broke during the job
                await self._drop_connection(broken=True)
                raise ConnectionLost(repr(failed.error)) from failed.error
            raise  # rolled back; the connection is fine
        except Exception as exc:
            if driver.is_closed():
                await self._drop_connection(broken=True)
                raise ConnectionLost(repr(exc)) from exc
            raise
        except BaseException:  # cancelled mid-statement: its state is unknown
            await self._drop_connection(broken=True)
            raise

    @staticmethod
    async def _run_job(index: int, job: StoreJob, connection: AsyncConnection, driver: Any) -> Any:
        """A claim runs on the driver; a function job through SQLAlchemy."""
        try:
            if isinstance(job, ClaimRequest):
                return await claim_on_driver(job, driver)
            return await connection.run_sync(run_function_job, job)
        except Exception as exc:
            raise JobFailed(index, exc) from exc

    async def _pg_connection(self) -> tuple[AsyncConnection, Any]:
        """The store's own connection (AUTOCOMMIT: transactions are the driver's) and its
        driver connection; a new one when there is none, it broke, or it is old."""
        if self._connection is not None and (
            self._driver.is_closed()
            or time.monotonic() - self._connected_at > CONNECTION_MAX_AGE_SECONDS
        ):
            await self._drop_connection(broken=self._driver.is_closed())
        if self._connection is None:
            connection = await self.engine.connect()
            try:
                connection = await connection.execution_options(isolation_level="AUTOCOMMIT")
                raw = await connection.get_raw_connection()
            except BaseException:
                await connection.close()
                raise
            self._connection, self._driver = connection, raw.driver_connection
            self._connected_at = time.monotonic()
        return self._connection, self._driver

    async def _drop_connection(self, broken: bool) -> None:
        connection, self._connection, self._driver = self._connection, None, None
        if connection is None:
            return
        with contextlib.suppress(Exception):
            if broken:
                await connection.invalidate()
            await connection.close()


async def claim_on_driver(request: ClaimRequest, driver: Any) -> ClaimResult:
    """The claim (see runner/store_sqlite.py's) through asyncpg. The gate's decisions on a
    service are serialized across runners by an advisory lock."""
    free, terms = request.begin(), request.terms
    now = utcnow()
    limit = first_window(free)
    for _ in range(CLAIM_ROUNDS):
        candidates = await driver.fetch(sql.PG_CANDIDATES, now, terms.affinities, limit)
        if not candidates:
            return ClaimResult([])
        busy: dict[int, int] = {}
        if needs_busy(candidates):
            busy = {row[0]: row[1] for row in await driver.fetch(sql.BUSY_PROFILES)}
        held: dict[int, str] = {}
        if needs_held(terms, candidates):
            flagged = await driver.fetch(sql.PG_FLAGGED, terms.proxy_flag_after)
            if flagged:
                links = [(row[0], row[1]) for row in await driver.fetch(sql.VIA_LINKS)]
                held = held_proxies((FlaggedProxy(*row) for row in flagged), links)
        gate = None
        if any(row[8] for row in candidates):
            gate = await _drive_gate(driver, gate_reads(gated(candidates), now, lock=True))
        choice = choose(candidates, busy, request.slots(free), gate, held)
        if not look_further(choice, candidates, free, limit):
            break
        limit *= 4
    if choice.waiting:
        await driver.executemany(sql.PG_MARK_WAITING, choice.waiting)
    for command_id, error in choice.failed:
        await _fail_at_gate(driver, command_id, error, now)
    if not choice.chosen:
        return choice.result([])
    try:
        rows = await driver.fetch(
            sql.PG_CLAIM, list(choice.chosen), terms.runner_id, terms.host, terms.lease(now), now
        )
    except Exception as exc:
        if getattr(exc, "sqlstate", None) == UNIQUE_VIOLATION:  # say it as SQLAlchemy does
            raise IntegrityError("claim", None, exc) from exc
        raise
    if choice.gate is not None:
        spends = spend_rows(choice.gate, [row[0] for row in rows], now)
        if spends:
            await driver.executemany(sql.PG_SPEND, spends)
    return choice.result(rows)


async def _drive_gate(driver: Any, reads: Generator[Read, Any, Gate]) -> Gate:
    """Run the gate's reads through asyncpg."""
    try:
        name, params = next(reads)
        while True:
            rows = await driver.fetch(sql.PG_GATE[name], *params)
            name, params = reads.send(rows)
    except StopIteration as done:
        gate: Gate = done.value
        return gate


async def _fail_at_gate(driver: Any, command_id: int, error: str, now: datetime) -> None:
    row = await driver.fetchrow(sql.PG_FAIL_AT_GATE, error, now, command_id)
    if row is not None:
        line = (command_id, row[1], row[2], now, f"not started: {error}")
        await driver.execute(sql.PG_FAIL_LINE, *line)


def pg_write(
    batch: WriteBatch, fences: dict[int, int] | None = None
) -> tuple[str, list[Any]] | None:
    """The batch's few lines and all its command updates as one statement, or None; with
    `fences`, the statement checks them first (see statements.pg_lines_and_updates)."""
    arrays = _pg_arrays(batch.pg_rows) if batch.pg_rows else None
    return sql.pg_lines_and_updates(arrays, batch.updates, fences)


async def _refused_fences(driver: Any, fences: dict[int, int]) -> list[int]:
    """The commands whose token is not the one their share carries (rows locked till the
    transaction ends)."""
    held = dict(await driver.fetch(sql.PG_FENCES, list(fences)))
    return refused_fences(fences, held)


def _pg_arrays(rows: list[tuple[int, LineRun]]) -> list[list[Any]]:
    """The lines as one array per column (NUL, which PostgreSQL text cannot hold, replaced)."""
    arrays: list[list[Any]] = [[], [], [], [], [], []]
    ids, seqs, attempts, streams, stamps, texts = arrays
    for command_id, run in rows:
        count = len(run.texts)
        ids += [command_id] * count
        seqs += range(run.first_seq, run.first_seq + count)
        attempts += [run.attempt] * count
        streams += [run.stream] * count
        stamps += [run.ts] * count
        texts += [t.replace("\x00", "\ufffd") if "\x00" in t else t for t in run.texts]
    return arrays


def _copy_rows(command_id: int, run: LineRun) -> str:
    """A run's rows in COPY's text format, written here (asyncpg's per-row encoder costs
    more): the row as a %-format repeated, applied to the seqs and texts interleaved, so
    that no Python code runs per line (a str.format call per line cost twice as much)."""
    attempt, stream, ts, first, texts = run
    # Written into the format: numbers, a stream name, an ISO timestamp (no `%` in any).
    row = f"{command_id}\t%d\t{attempt}\t{stream}\t{ts.isoformat()}\t%s\n"
    seqs = range(first, first + len(texts))
    values = chain.from_iterable(zip(seqs, _copy_escape(texts), strict=True))
    return (row * len(texts)) % tuple(values)


def _copy_escape(texts: list[str]) -> list[str]:
    """Texts as COPY's text format wants them (backslash, tab, CR, LF escaped; NUL, which
    PostgreSQL text cannot hold, replaced)."""
    joined = "".join(texts)
    if not any(special in joined for special in _COPY_SPECIALS):
        return texts
    return [
        t.replace("\\", "\\\\")
        .replace("\t", "\\t")
        .replace("\r", "\\r")
        .replace("\n", "\\n")
        .replace("\x00", "\ufffd")
        for t in texts
    ]


_COPY_SPECIALS = ("\\", "\t", "\r", "\n", "\x00")


async def _one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data
