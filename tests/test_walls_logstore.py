"""Walls in the log store (issue 10): a hostile `::corral::` event only affects its own
command, a flush the database refuses is split so the others still land, and a database
outage during a flood loses nothing (the children wait; everything is written after)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator

import pytest
from sqlalchemy import Connection, func, select
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette

import runner.logstore as logstore
from runner.logstore import LogStore
from runner.store import Written
from runner.store_errors import ConnectionLost
from server.app import create_app
from server.app_services import AppServices
from server.broker import Broker
from server.db import create_engine, create_sessionmaker
from server.models import Command, CommandEvent, LogLine, LogStream, ServiceUsage
from server.settings import Settings
from tests.conftest import GraphQLClient
from tests.fixtures.auth import admin_client
from tests.fixtures.commands import logs_of, run, texts, wait_final

SERVICE = """mutation($n: String!, $e: String!) { createService(input: {name: $n, envVar: $e,
  token: "tok-0123456789abcdef"}) { service { id } userErrors { message } } }"""
LINES_LOST = """query($id: ID!) { node(id: $id) { ... on Command { status linesLost } } }"""


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"max_concurrency": 32, "kill_grace_seconds": 0.5})


# -- poison events beside healthy commands ----------------------------------------------

HEALTHY_LINES = 300
HEALTHY = (
    "sh -c 'sleep 0.3; i=0; while [ $i -lt 150 ]; do echo healthy-$i; i=$((i+1)); done;"
    " sleep 0.2; while [ $i -lt 300 ]; do echo healthy-$i; i=$((i+1)); done'"
)
# Each poison command prints a line, one bad event, another line; printed by Python (a
# huge event does not fit in one argv string).
POISON_SCRIPT = (
    "import sys, time\n"
    "time.sleep(0.3)\n"
    "print('p-before', flush=True)\n"
    "print('::corral::' + {event}, flush=True)\n"
    "print('p-after', flush=True)\n"
)
POISONS = {
    # expression of the event text: what its command's system line must say
    '\'{"type":"usage","service":"github","units":\' + \'9\' * 30 + \'}\'': "units is out of range",
    '\'{"type":"usage","service":"github","remaining":2147483648}\'': "remaining is out of range",
    "'{\"type\":\"progress\",\"deep\":' + '[' * 3000 + ']' * 3000 + '}'": "nested too deeply",
    "'{\"type\":\"progress\",\"deep\":' + '[' * 20 + ']' * 20 + '}'": "nested too deeply",
    '\'{"type":"progress","blob":"\' + \'x\' * 300000 + \'"}\'': "characters long",
    '\'{"type":"usage","service":"other","remaining":5}\'': "'other' is not one of this "
    "command's services",
    '\'{"type":"usage","service":"github","remaining":1,"ratio":NaN}\'': "ratio is not "
    "a finite number",
    '\'{"type":"usage","service":"github","resetAt":"9999-12-31T23:00:00-05:00"}\'': (
        "resetAt must be"
    ),
}
GOOD_EVENT = '::corral::{"type":"usage","service":"github","remaining":4999,"limit":5000}'


async def test_poison_events_only_touch_their_own_command(
    app: Starlette, gql: GraphQLClient
) -> None:
    github = (await gql(SERVICE, n="GitHub", e="GITHUB_TOKEN"))["createService"]["service"]["id"]
    other = (await gql(SERVICE, n="Other", e="OTHER_TOKEN"))["createService"]["service"]["id"]
    healthy = [await run(gql, commandString=HEALTHY) for _ in range(19)]
    # One more healthy command owns the service "other" and reports on its own one.
    good = await run(
        gql,
        commandString="sh -c 'sleep 0.3; echo \"$1\"; echo after' - {{ params.e }}",
        serviceIds=[github, other],
        params={"e": GOOD_EVENT},
    )
    poisoned = {
        await run(
            gql,
            commandString="python3 -c {{ params.code }}",
            serviceIds=[github],
            params={"code": POISON_SCRIPT.format(event=event)},
        ): reason
        for event, reason in POISONS.items()
    }
    everyone = [*healthy, good, *poisoned]
    finals = await asyncio.gather(*(wait_final(gql, c, timeout=90) for c in everyone))
    assert [final["status"] for final in finals] == ["SUCCEEDED"] * len(everyone)
    for command_id in healthy:
        lines = await logs_of(gql, command_id)
        assert [line["seq"] for line in lines] == list(range(1, len(lines) + 1))
        assert texts(lines) == [f"healthy-{i}" for i in range(HEALTHY_LINES)]
    assert texts(await logs_of(gql, good)) == ["after"]
    for command_id, reason in poisoned.items():
        lines = await logs_of(gql, command_id)
        assert [line["seq"] for line in lines] == list(range(1, len(lines) + 1))
        assert texts(lines) == ["p-before", "p-after"]
        notes = [t for t in texts(lines, "SYSTEM") if t.startswith("ignored ::corral:: event: ")]
        assert len(notes) == 1, texts(lines, "SYSTEM")
        assert reason in notes[0]
        assert (await gql(LINES_LOST, id=command_id))["node"]["linesLost"] == 0
    services: AppServices = app.state.services
    async with services.sessionmaker() as session:
        events = list(await session.scalars(select(CommandEvent)))
        usage = list(await session.scalars(select(ServiceUsage)))
    # Only the good event was stored: none of the poison, none about another's service.
    assert [(event.type, event.data["remaining"]) for event in events] == [("usage", 4999)]
    assert [(row.remaining, row.limit) for row in usage] == [(4999, 5000)]


# -- one refused share costs only its own command ----------------------------------------


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(settings)
    try:
        yield engine
    finally:
        await engine.dispose()


async def new_command(engine: AsyncEngine) -> int:
    async with create_sessionmaker(engine)() as session, session.begin():
        command = Command(source="x", argv=["x"], status="RUNNING", runner_id="runner-1")
        session.add(command)
        await session.flush()
        return command.id


async def test_a_share_the_database_refuses_costs_only_its_own_command(
    engine: AsyncEngine,
) -> None:
    store = LogStore(engine, Broker(), runner_id="runner-1")
    store.start()
    try:
        first, bad, last = [await new_command(engine) for _ in range(3)]
        writers = {command_id: store.writer(command_id, 1, 0) for command_id in (first, bad, last)}
        for command_id, writer in writers.items():
            lines = [f"{command_id}-{i}" for i in range(300)]
            if command_id == bad:  # text no database can hold: past every check on the way
                lines[5] = "unpaired \ud800 surrogate"
            await writer.add_lines(LogStream.STDOUT, lines)
            await writer.add(
                LogStream.SYSTEM, "finished", command_values={"status": "SUCCEEDED", "pgid": None}
            )

        def claim(connection: Connection) -> int:
            return connection.scalar(select(func.count()).select_from(Command)) or 0

        results = await asyncio.gather(
            store.submit(claim), *(writer.close() for writer in writers.values())
        )
        assert results[0] == 3  # the claim of the same flush still ran
    finally:
        await store.close()
    async with engine.connect() as connection:
        rows = {
            row.id: row
            for row in await connection.execute(
                select(Command.id, Command.status, Command.last_seq, Command.lines_lost)
            )
        }
        stored = {
            command_id: (
                await connection.execute(
                    select(LogLine.seq, LogLine.stream, LogLine.text)
                    .where(LogLine.command_id == command_id)
                    .order_by(LogLine.seq)
                )
            ).all()
            for command_id in (first, bad, last)
        }
    for command_id in (first, last):
        assert [text for _, _, text in stored[command_id]] == [
            *(f"{command_id}-{i}" for i in range(300)),
            "finished",
        ]
        assert (rows[command_id].status, rows[command_id].last_seq) == ("SUCCEEDED", 301)
        assert rows[command_id].lines_lost == 0
    # The refused command keeps its final state, and its log says what was lost.
    assert rows[bad].status == "SUCCEEDED"
    assert rows[bad].lines_lost == 301
    assert rows[bad].last_seq == 301
    assert len(stored[bad]) == 1
    seq, stream, note = stored[bad][0]
    assert (seq, stream) == (1, "system")
    assert note.startswith("301 log line(s) (seq 1 to 301) could not be stored and are lost: ")


# -- a database outage during a flood -------------------------------------------------------

FLOOD_COMMANDS = 4
# Prints numbered lines until the flag file exists, then "done N".
FLOOD = (
    "import os, sys, time\n"
    "flag, i = sys.argv[1], 0\n"
    "while not os.path.exists(flag):\n"
    "    sys.stdout.write(''.join(f'{n}\\n' for n in range(i, i + 50)))\n"
    "    sys.stdout.flush()\n"
    "    i += 50\n"
    "    time.sleep(0.02)\n"
    "print('done', i)\n"
)


class Forwarder:
    """A TCP forwarder to PostgreSQL that can be cut (connections closed, new ones
    closed at once) and restored: an outage the runner cannot tell from a real one."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.up = True
        self.links: set[asyncio.StreamWriter] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.server: asyncio.Server | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if not self.up:
            writer.transport.abort()
            return
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        self.links |= {writer, upstream_writer}
        for source, sink in ((reader, upstream_writer), (upstream_reader, writer)):
            task = asyncio.create_task(self._pipe(source, sink))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _pipe(self, source: asyncio.StreamReader, sink: asyncio.StreamWriter) -> None:
        with contextlib.suppress(OSError, ConnectionError):
            while data := await source.read(65536):
                sink.write(data)
                await sink.drain()
        sink.transport.abort()
        self.links.discard(sink)

    def cut(self) -> None:
        self.up = False
        for link in list(self.links):
            link.transport.abort()
        self.links.clear()

    def restore(self) -> None:
        self.up = True

    async def close(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
        for task in list(self.tasks):
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


@contextlib.asynccontextmanager
async def running_app(settings: Settings) -> AsyncIterator[tuple[Starlette, GraphQLClient]]:
    application = create_app(settings)
    async with (
        application.router.lifespan_context(application),
        admin_client(application) as http,
    ):
        yield application, GraphQLClient(http)


@pytest.fixture
def outage_settings(settings: Settings, backend: str, monkeypatch: pytest.MonkeyPatch) -> Settings:
    # A small bound, so the flood surely meets it: the children must wait, not the memory.
    monkeypatch.setattr(logstore, "MAX_PENDING_LINES", 5_000)
    # SQLite "unavailable": another connection holds the write lock for longer than the busy
    # timeout (5 s), so tries fail (the old store dropped lines after 5 of them). The busy
    # timeout stays as it is: the API's own reads must not fail meanwhile.
    return settings


async def stored_lines(settings: Settings, command_pk: int) -> list[tuple[int, str, str]]:
    engine = create_engine(settings)
    try:
        async with engine.connect() as connection:
            rows = await connection.execute(
                select(LogLine.seq, LogLine.stream, LogLine.text)
                .where(LogLine.command_id == command_pk)
                .order_by(LogLine.seq)
            )
            return [(seq, stream, text) for seq, stream, text in rows.all()]
    finally:
        await engine.dispose()


def pk(command_id: str) -> int:
    import base64

    return int(base64.b64decode(command_id).decode().split(":")[1])


async def test_a_database_outage_during_a_flood_loses_nothing(
    outage_settings: Settings, backend: str, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="corral.runner")
    settings = outage_settings
    forwarder: Forwarder | None = None
    app_settings = settings
    if backend == "postgresql":
        url = make_url(settings.database_url or "")
        forwarder = Forwarder(url.host or "127.0.0.1", url.port or 5432)
        await forwarder.start()
        proxied = url.set(host="127.0.0.1", port=forwarder.port)
        app_settings = settings.model_copy(
            update={"database_url": proxied.render_as_string(hide_password=False)}
        )
    # In each command's own working directory: a sandboxed command sees that (and not the
    # data dir, nor the host's /tmp).
    flag = "stop-flooding"
    try:
        async with running_app(app_settings) as (application, gql):
            commands = [
                await run(
                    gql,
                    commandString="python3 -c {{ params.code }} {{ params.flag }}",
                    params={"code": FLOOD, "flag": flag},
                )
                for _ in range(FLOOD_COMMANDS)
            ]
            await flooding(gql, commands)
            store: LogStore = application.state.supervisor.store
            pending = await outage(settings, backend, forwarder, store)
            if backend == "postgresql":
                # The API's pooled connections died with the outage (no pre-ping): not
                # what this test is about.
                await application.state.engine.dispose()
            for command_id in commands:
                (settings.commands_dir / str(pk(command_id)) / flag).touch()
            finals = await asyncio.gather(*(wait_final(gql, c, timeout=120) for c in commands))
            lost = [(await gql(LINES_LOST, id=c))["node"]["linesLost"] for c in commands]
    finally:
        if forwarder is not None:
            await forwarder.close()
    assert [final["status"] for final in finals] == ["SUCCEEDED"] * FLOOD_COMMANDS
    assert lost == [0] * FLOOD_COMMANDS
    # The children waited: the runner held no more than its bound (one read more a pipe).
    assert max(pending) >= logstore.MAX_PENDING_LINES
    assert max(pending) <= logstore.MAX_PENDING_LINES + FLOOD_COMMANDS * 20_000
    for command_id in commands:
        rows = await stored_lines(settings, pk(command_id))
        assert [seq for seq, _, _ in rows] == list(range(1, len(rows) + 1))  # gapless
        out = [text for _, stream, text in rows if stream == "stdout"]
        count = int(out[-1].split()[1])
        assert count > 1_000
        assert out == [str(n) for n in range(count)] + [f"done {count}"]
    # The outage is one warning, its end one line at INFO; never an error.
    warnings = [r for r in caplog.records if "cannot store to the database" in r.getMessage()]
    assert len(warnings) == 1
    assert any("takes writes again" in r.getMessage() for r in caplog.records)


async def flooding(gql: GraphQLClient, commands: list[str]) -> None:
    """Until every command runs and has lines stored."""
    deadline = time.monotonic() + 60
    query = """query($id: ID!) { node(id: $id) { ... on Command { status
      logs(afterSeq: 100, first: 1) { seq } } } }"""
    while True:
        nodes = [(await gql(query, id=command_id))["node"] for command_id in commands]
        if all(node["status"] == "RUNNING" and node["logs"] for node in nodes):
            return
        assert time.monotonic() < deadline, nodes
        await asyncio.sleep(0.1)


async def outage(
    settings: Settings, backend: str, forwarder: Forwarder | None, store: LogStore
) -> list[int]:
    """The database unreachable while the children print: 60 s for PostgreSQL
    (connections closed and refused), 12 s of a foreign write lock for SQLite. The lines
    the store held meanwhile, sampled."""
    pending: list[int] = []

    async def sample(seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            pending.append(store._pending_lines)
            await asyncio.sleep(0.1)

    if forwarder is not None:
        forwarder.cut()
        await sample(60)
        forwarder.restore()
        return pending
    lock = sqlite3.connect(settings.data_dir / "corral.db", timeout=30, isolation_level=None)
    try:
        lock.execute("BEGIN EXCLUSIVE")
        await sample(12)
        lock.execute("ROLLBACK")
    finally:
        lock.close()
    return pending


def test_event_checks_are_exact() -> None:
    """The bounds themselves (the end-to-end test above shows where they apply)."""
    from runner.events import EventRejected, parse_event

    ids = {"github": 1}
    assert parse_event('{"type":"usage","service":"GitHub","remaining":2147483647}', ids)
    assert parse_event("not json", ids) is None
    assert parse_event('{"no":"type"}', ids) is None
    assert parse_event('{"type":"progress","n":9223372036854775807}', ids)
    for bad in (
        '{"type":"progress","n":9223372036854775808}',
        '{"type":"usage","service":"github","remaining":-1}',
        '{"type":"usage","service":"github","units":1.5}',
        '{"type":"usage","remaining":1}',
        '{"type":"usage","service":"github","tokenValid":"yes"}',
        '{"type":"usage","service":"github","resetAt":"0001-01-01T00:00:00+01:00"}',
        '{"type":"progress","s":"nul \\u0000"}',
        '{"type":"progress","s":"\\ud800"}',
        '{"type":"' + "t" * 65 + '"}',
        json.dumps({"type": "progress", "x": [[[[[[[[1]]]]]]]]}),
    ):
        with pytest.raises(EventRejected):
            parse_event(bad, ids)


async def test_a_commit_whose_answer_was_lost_is_not_stored_twice(
    engine: AsyncEngine, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The connection breaks after the server committed a flush (the answer to COMMIT is
    lost): the next try finds its lines there already (a unique violation). They are
    stored, once; nothing is counted lost and no command's share is split off."""
    store = LogStore(engine, Broker(), runner_id="runner-1")
    real = store.committer._transact
    broke: list[bool] = []

    async def commit_then_break(*args: object) -> Written:
        results = await real(*args)  # type: ignore[arg-type]
        if not broke:
            broke.append(True)
            raise ConnectionLost("the answer to COMMIT was lost")
        return results

    monkeypatch.setattr(store.committer, "_transact", commit_then_break)
    store.start()
    try:
        command_id = await new_command(engine)
        writer = store.writer(command_id, 1, 0)
        await writer.add_lines(LogStream.STDOUT, [f"line {i}" for i in range(250)])
        await writer.add(LogStream.SYSTEM, "finished", command_values={"status": "SUCCEEDED"})
        await asyncio.wait_for(writer.close(), 30)
    finally:
        await store.close()
    assert broke == [True]
    async with engine.connect() as connection:
        texts = (
            await connection.scalars(
                select(LogLine.text).where(LogLine.command_id == command_id).order_by(LogLine.seq)
            )
        ).all()
        row = (
            await connection.execute(
                select(Command.status, Command.lines_lost).where(Command.id == command_id)
            )
        ).one()
    assert texts == [*(f"line {i}" for i in range(250)), "finished"]
    assert tuple(row) == ("SUCCEEDED", 0)
