"""The runner's log store: one transaction per flush for every attempt's lines, state and the
runner's claims; a failing claim loses no line; writers hear before claims; order is kept
while one flush commits and the next is built; readers do not hold up the writer."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Any

import pytest
from sqlalchemy import Connection, select, text, update
from sqlalchemy.ext.asyncio import AsyncEngine

from runner.lines import Redactor
from runner.logstore import LogStore, published_batches
from runner.logwriter import FLUSH_LINES
from runner.store import WriteBatch
from runner.store_postgres import COPY_MIN_LINES, pg_write
from server.broker import Broker, command_topic
from server.db import READ_ONLY, create_engine, create_sessionmaker
from server.messages import LineRun
from server.models import Command, LogLine, LogStream
from server.settings import Settings


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(settings)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
def broker() -> Broker:
    # Room for every batch these tests publish: a subscriber past its bound would be told it
    # lagged (and re-read from the database), and the order test reads the queue itself.
    return Broker(subscriber_max_bytes=256 * 1024 * 1024)


@pytest.fixture
async def store(engine: AsyncEngine, broker: Broker) -> AsyncIterator[LogStore]:
    store = LogStore(engine, broker, runner_id="runner-1")
    store.start()
    try:
        yield store
    finally:
        await store.close()


async def new_command(engine: AsyncEngine) -> int:
    async with create_sessionmaker(engine)() as session, session.begin():
        command = Command(source="x", argv=["x"], status="RUNNING", runner_id="runner-1")
        session.add(command)
        await session.flush()
        return command.id


async def stored(engine: AsyncEngine, command_id: int) -> list[tuple[int, str, str]]:
    async with engine.connect() as connection:
        rows = await connection.execute(
            select(LogLine.seq, LogLine.stream, LogLine.text)
            .where(LogLine.command_id == command_id)
            .order_by(LogLine.seq)
        )
        return [(seq, stream, line) for seq, stream, line in rows.all()]


async def last_seq(engine: AsyncEngine, command_id: int) -> int:
    async with engine.connect() as connection:
        value = await connection.scalar(select(Command.last_seq).where(Command.id == command_id))
        return int(value or 0)


async def test_a_failing_claim_loses_no_line_and_its_caller_hears(
    engine: AsyncEngine, store: LogStore
) -> None:
    command_id = await new_command(engine)
    writer = store.writer(command_id, 1, 0, Redactor(["s3cret-token"]))

    def failing_claim(connection: Connection) -> None:
        connection.execute(text("SELECT 1"))
        raise LookupError("no such thing")

    def claim(connection: Connection) -> int:
        last_seq = connection.scalar(select(Command.last_seq).where(Command.id == command_id))
        assert last_seq is not None
        return last_seq

    await writer.add_lines(LogStream.STDOUT, ["one", "two with s3cret-token"])
    results = await asyncio.gather(
        store.submit(failing_claim), store.submit(claim), writer.close(), return_exceptions=True
    )
    assert isinstance(results[0], LookupError)
    # The other claim ran in the same transaction, after the writes: it saw them.
    assert results[1] == 2
    assert await stored(engine, command_id) == [
        (1, "stdout", "one"),
        (2, "stdout", "two with [redacted]"),
    ]
    assert await last_seq(engine, command_id) == 2


async def test_writers_hear_before_the_claims_of_the_same_flush(
    engine: AsyncEngine, store: LogStore
) -> None:
    command_id = await new_command(engine)
    writer = store.writer(command_id, 1, 0)
    heard: list[str] = []

    async def close() -> None:
        await writer.add(LogStream.SYSTEM, "finished", command_values={"status": "SUCCEEDED"})
        await writer.close()
        heard.append("writer")

    async def claim() -> None:
        await store.submit(lambda connection: None)
        heard.append("claim")

    await asyncio.gather(claim(), close())
    # A command's final state is announced before the claim that took its slot.
    assert heard == ["writer", "claim"]
    async with engine.connect() as connection:
        status = await connection.scalar(select(Command.status).where(Command.id == command_id))
    assert status == "SUCCEEDED"


async def test_lines_keep_their_order_across_flushes_in_flight(
    engine: AsyncEngine, store: LogStore, broker: Broker
) -> None:
    broker_batches: list[tuple[int, int]] = []
    command_id = await new_command(engine)
    writer = store.writer(command_id, 1, 0)
    total = FLUSH_LINES * 3 + 17
    async with broker.subscribe(command_topic(command_id)) as subscription:
        sent = 0
        while sent < total:  # reads of uneven size, some while a flush commits
            size = min(total - sent, 1 + (sent * 7919) % 3001)
            await writer.add_lines(LogStream.STDOUT, [f"line {sent + i}" for i in range(size)])
            sent += size
            if sent % 3 == 0:
                await asyncio.sleep(0)
        await writer.close()
        assert not subscription.lagged
        for batch in subscription.waiting():
            broker_batches.append((batch.runs[0].first_seq, batch.runs[-1].last_seq))
    rows = await stored(engine, command_id)
    assert [seq for seq, _, _ in rows] == list(range(1, total + 1))
    assert [line for _, _, line in rows] == [f"line {i}" for i in range(total)]
    assert await last_seq(engine, command_id) == total
    # Published in order, each batch consecutive, none bigger than a flush.
    assert broker_batches[0][0] == 1
    assert broker_batches[-1][1] == total
    for (_, end), (start, _) in itertools.pairwise(broker_batches):
        assert start == end + 1
    assert all(last - first < FLUSH_LINES for first, last in broker_batches)


async def test_a_backlog_goes_in_flushes_of_the_stores_size_published_in_small_batches(
    engine: AsyncEngine, store: LogStore, broker: Broker, backend: str
) -> None:
    flushed: list[int] = []
    write_batch = store.gateway.write_batch

    async def counted(batch: WriteBatch, jobs: Any) -> Any:
        flushed.append(sum(len(copy.split("\n")) - 1 for _, copy in batch.pg_copy))
        flushed[-1] += sum(len(chunk[5]) for chunk in batch.sqlite_chunks)
        return await write_batch(batch, jobs)

    store.gateway.write_batch = counted  # type: ignore[method-assign]
    command_id = await new_command(engine)
    writer = store.writer(command_id, 1, 0)
    total = 3 * FLUSH_LINES + 17
    async with broker.subscribe(command_topic(command_id)) as subscription:
        for start in range(0, total, 1000):  # queued before the store's task has a turn
            size = min(1000, total - start)
            await writer.add_lines(LogStream.STDOUT, [f"l{start + i}" for i in range(size)])
        await writer.close()
        published = [batch.weight for batch in subscription.waiting()]
    # PostgreSQL takes the whole backlog in one flush (one COPY), SQLite in FLUSH_LINES.
    assert store.gateway.flush_lines == (
        4 * FLUSH_LINES if backend == "postgresql" else FLUSH_LINES
    )
    if backend == "postgresql":
        assert flushed == [total]
    else:
        assert flushed == [FLUSH_LINES] * 3 + [17]
    assert published == [FLUSH_LINES] * 3 + [17]
    assert [line for _, _, line in await stored(engine, command_id)] == [
        f"l{i}" for i in range(total)
    ]


def test_a_share_is_published_in_batches_of_flush_lines_at_most() -> None:
    ts = datetime.now(UTC)
    sizes = [3, FLUSH_LINES - 3, FLUSH_LINES + 1, 2 * FLUSH_LINES, 5]
    runs, seq = [], 1
    for size in sizes:
        runs.append(LineRun(1, "stdout", ts, seq, [str(n) for n in range(seq, seq + size)]))
        seq += size
    batches = list(published_batches(9, runs))
    assert [batch.weight for batch in batches] == [FLUSH_LINES] * 4 + [6]
    lines = [
        (seq, text)
        for batch in batches
        for run in batch.runs
        for seq, text in enumerate(run.texts, run.first_seq)
    ]
    assert lines == [(n, str(n)) for n in range(1, seq)]
    assert batches[0].runs[0] is runs[0]  # a run that fits is not copied
    assert all(run.texts for batch in batches for run in batch.runs)


# What COPY's text format and its row template must carry through unchanged (no NUL: the
# pipe's splitter replaces it before a line reaches a writer).
COPY_AWKWARD = [
    "tab\tin",
    "back\\slash \\N",
    "new\nline",
    "cr\rhere",
    "%s %d %% %(x)s {}",
]


async def test_awkward_lines_in_a_big_flush_are_stored_exactly(
    engine: AsyncEngine, store: LogStore
) -> None:
    command_id = await new_command(engine)
    writer = store.writer(command_id, 1, 0)
    lines = [COPY_AWKWARD[i % len(COPY_AWKWARD)] + str(i) for i in range(COPY_MIN_LINES * 2)]
    await writer.add_lines(LogStream.STDOUT, lines)  # enough for a COPY on PostgreSQL
    await writer.close()
    assert [line for _, _, line in await stored(engine, command_id)] == lines


@pytest.mark.parametrize("backend", ["sqlite"])  # about SQLite's one write lock
async def test_a_reading_follower_does_not_hold_up_the_writer(
    engine: AsyncEngine, store: LogStore
) -> None:
    command_id = await new_command(engine)
    writer = store.writer(command_id, 1, 0)
    sessionmaker = create_sessionmaker(engine)
    async with sessionmaker() as session:
        connection = await session.connection(execution_options=READ_ONLY)
        await connection.execute(select(Command.id))  # a read transaction stays open
        started = time.monotonic()
        await writer.add_lines(LogStream.STDOUT, ["while someone reads"])
        await writer.close()
        waited = time.monotonic() - started
    # Before, readers began IMMEDIATE too, and the writer waited for them to finish.
    assert waited < 2.0
    assert await stored(engine, command_id) == [(1, "stdout", "while someone reads")]


@pytest.mark.parametrize("backend", ["postgresql"])  # the store's own PostgreSQL connection
async def test_the_store_replaces_its_connection_when_the_server_drops_it(
    engine: AsyncEngine, store: LogStore, caplog: pytest.LogCaptureFixture
) -> None:
    command_id = await new_command(engine)
    writer = store.writer(command_id, 1, 0)
    killed = []
    for round_ in range(3):
        await writer.add_lines(LogStream.STDOUT, [f"before kill {round_}"])
        await writer.close()
        # The server ends the store's session (a restart, an idle timeout, an admin)...
        async with engine.connect() as connection:
            pids = (
                await connection.execute(
                    text(
                        "SELECT pg_terminate_backend(pid), pid FROM pg_stat_activity "
                        "WHERE datname = current_database() AND pid <> pg_backend_pid() "
                        "AND application_name = '' AND state = 'idle' "
                        "AND backend_type = 'client backend'"
                    )
                )
            ).all()
        killed += [pid for ok, pid in pids if ok]
        if round_ == 1:
            await asyncio.sleep(0.2)  # ...noticed before the next flush, or only by it
    # ...and the lines after it are stored all the same, by a new connection.
    await writer.add_lines(LogStream.STDOUT, ["after the last kill"])
    await writer.close()
    assert killed
    assert [line for _, _, line in await stored(engine, command_id)] == [
        "before kill 0",
        "before kill 1",
        "before kill 2",
        "after the last kill",
    ]
    assert await last_seq(engine, command_id) == 4
    assert "dropped" not in caplog.text


async def test_one_flush_writes_each_commands_values_only_where_this_runner_holds_it(
    engine: AsyncEngine, store: LogStore
) -> None:
    started, finished, taken = [await new_command(engine) for _ in range(3)]
    async with engine.begin() as connection:  # another runner took this one meanwhile
        await connection.execute(
            update(Command).where(Command.id == taken).values(runner_id="runner-2")
        )
    at = datetime(2026, 11, 30, 1, 2, 3, 456789, tzinfo=UTC)
    writers = [store.writer(command_id, 1, 0) for command_id in (started, finished, taken)]
    # Different column sets (JSON and timestamps among them), all in one flush.
    await writers[0].add(LogStream.SYSTEM, "a", command_values={"pgid": 11, "argv": ["x", "y"]})
    await writers[1].add(
        LogStream.SYSTEM,
        "b",
        command_values={"status": "SUCCEEDED", "exit_code": 0, "finished_at": at},
    )
    await writers[2].add(LogStream.SYSTEM, "c", command_values={"status": "FAILED"})
    await asyncio.gather(*(writer.close() for writer in writers))
    async with engine.connect() as connection:
        rows = {
            row.id: row
            for row in await connection.execute(
                select(
                    Command.id,
                    Command.status,
                    Command.pgid,
                    Command.argv,
                    Command.exit_code,
                    Command.finished_at,
                    Command.last_seq,
                ).where(Command.id.in_([started, finished, taken]))
            )
        }
    assert (rows[started].pgid, rows[started].argv, rows[started].last_seq) == (11, ["x", "y"], 1)
    assert rows[started].status == "RUNNING"
    assert (rows[finished].status, rows[finished].exit_code) == ("SUCCEEDED", 0)
    assert rows[finished].finished_at.replace(tzinfo=UTC) == at
    assert (rows[taken].status, rows[taken].last_seq) == ("RUNNING", 0)  # not ours any more
    assert [line for _, _, line in await stored(engine, taken)] == ["c"]


@pytest.mark.parametrize("backend", ["postgresql"])  # the statement built for PostgreSQL
async def test_a_value_too_long_for_its_column_is_refused_not_cut(engine: AsyncEngine) -> None:
    # The values travel as arrays; a cast to VARCHAR(16)[] would cut them without a word.
    command_id = await new_command(engine)
    too_long = "SUCCEEDED-AND-MORE"
    payload = WriteBatch(
        updates={
            (("status",), True): [{"status": too_long, "_id": command_id, "_runner": "runner-1"}]
        }
    )
    write = pg_write(payload)
    assert write is not None
    async with engine.connect() as connection:
        raw = await connection.get_raw_connection()
        assert raw.driver_connection is not None
        with pytest.raises(Exception, match="too long"):
            await raw.driver_connection.execute(write[0], *write[1])
    async with engine.connect() as connection:
        status = await connection.scalar(select(Command.status).where(Command.id == command_id))
    assert status == "RUNNING"


def test_the_same_column_sets_make_the_same_statement_whatever_their_order() -> None:
    # The driver caches prepared statements by text: an order of its own for each flush
    # would prepare (a round trip more) nearly every time.
    start = {"pgid": 7, "argv": ["x"], "_id": 1, "_runner": "r"}
    seq = {"last_seq": 3, "_id": 2, "_runner": "r"}
    one = WriteBatch(updates={(("argv", "pgid"), True): [start], (("last_seq",), True): [seq]})
    other = WriteBatch(updates={(("last_seq",), True): [seq], (("argv", "pgid"), True): [start]})
    first, second = pg_write(one), pg_write(other)
    assert first is not None
    assert second is not None
    assert first[0] == second[0]
    assert first[1] == second[1]


async def test_the_store_connects_before_its_first_flush(store: LogStore) -> None:
    """A starting runner's store opens its connection while the runner registers and
    recovers: the first claim's flush does not wait for it."""
    gateway: Any = store.gateway
    deadline = time.monotonic() + 5
    while not (
        gateway._sync_engine.pool.checkedin() == 1
        if gateway.dialect == "sqlite"
        else gateway._connection is not None
    ):
        assert time.monotonic() < deadline, "nothing was flushed, and no connection opened"
        await asyncio.sleep(0.01)
