"""Fence tokens (issue 14): every write a runner makes for an attempt carries the token the
claim gave it, and the gateway refuses it (and says so) once a recovery or another claim
raised the row's token; the runner then treats the attempt as lost: it kills its group,
writes nothing more for it, logs one warning and frees the slot."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette

from runner.logstore import LogStore
from runner.logwriter import LogWriter, Share, _Chunk
from runner.store import RunnerStore, WriteBatch, open_store
from server.broker import Broker, command_topic
from server.db import create_engine, create_sessionmaker
from server.models import Command, CommandEvent, LogLine, LogStream, utcnow
from server.settings import Settings
from tests.conftest import GraphQLClient
from tests.fixtures.commands import logs_of, run, texts, wait_final
from tests.fixtures.runners import runner_process
from tests.test_supervisor import alive, pk, wait_processes

RUNNER = "runner-1"
LEASE = 1.0  # renewed every third of it; recovered within a second or two
ON_POSTGRES = pytest.mark.parametrize("backend", ["postgresql"], indirect=True)


@pytest.fixture
def settings(settings: Settings) -> Settings:
    # No sandbox: the tests read a child's pid from what it prints (a PID namespace's pid
    # would not be the host's).
    return settings.model_copy(
        update={
            "sandbox": "none",
            "kill_grace_seconds": 0.5,
            "lease_seconds": LEASE,
            "runner_labels": "fenced",
        }
    )


@pytest.fixture
async def engine(settings: Settings) -> AsyncIterator[AsyncEngine]:
    engine = create_engine(settings)
    try:
        yield engine
    finally:
        await engine.dispose()


@pytest.fixture
async def gateway(engine: AsyncEngine) -> AsyncIterator[RunnerStore]:
    store = open_store(engine, create_sessionmaker(engine), RUNNER)
    store.start()
    try:
        yield store
    finally:
        await store.close()


async def running(engine: AsyncEngine, fence: int = 1) -> int:
    """A command RUNNING on RUNNER under this fence token."""
    async with create_sessionmaker(engine)() as session, session.begin():
        command = Command(
            source="x",
            argv=["x"],
            status="RUNNING",
            runner_id=RUNNER,
            fence=fence,
            lease_expires_at=utcnow(),
        )
        session.add(command)
        await session.flush()
        return command.id


async def recover(engine: AsyncEngine, command_id: int, runner: str | None = None) -> None:
    """What a recovery (and another runner's claim, with `runner`) does to the token."""
    async with engine.begin() as connection:
        await connection.execute(
            update(Command)
            .where(Command.id == command_id)
            .values(fence=Command.fence + 1, runner_id=runner, last_seq=Command.last_seq + 1)
        )


async def row(engine: AsyncEngine, command_id: int) -> Any:
    async with engine.connect() as connection:
        result = await connection.execute(select(Command).where(Command.id == command_id))
        return result.one()


async def count(engine: AsyncEngine, model: Any, command_id: int) -> int:
    async with engine.connect() as connection:
        stmt = select(func.count()).select_from(model).where(model.command_id == command_id)
        return int(await connection.scalar(stmt) or 0)


def share(command_id: int, fence: int, lines: int, event: bool = False) -> Share:
    """One attempt's numbered share of a flush: `lines` stdout lines (and an event)."""
    writer = LogWriter(cast(LogStore, None), command_id, 1, 0, fence=fence)
    texts = [f"line {n}" for n in range(lines)]
    if event:
        texts.append('::corral::{"type": "progress", "done": 1}')
    chunk = _Chunk("stdout", texts, utcnow(), {"pgid": 4242}, sum(map(len, texts)))
    return writer.number([chunk])


# -- the gateway, on both databases ---------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "job", "event"),
    [(3, False, False), (3, True, False), (3, False, True), (300, False, True)],
    ids=["one-statement", "with-a-job", "with-events", "copy"],
)
async def test_a_share_under_a_raised_fence_writes_nothing_and_is_named(
    engine: AsyncEngine, gateway: RunnerStore, lines: int, job: bool, event: bool
) -> None:
    current, stale = await running(engine), await running(engine)
    await recover(engine, stale, runner="runner-2")
    batch = gateway.build_batch(
        [share(current, 1, lines, event=event), share(stale, 1, lines, event=event)]
    )
    jobs = [lambda connection: "ran"] if job else []

    written = await gateway.write_batch(batch, jobs)

    assert written.refused == [stale]
    assert written.results == (["ran"] if job else [])
    assert await count(engine, LogLine, current) == lines
    assert await count(engine, CommandEvent, current) == int(event)
    assert (await row(engine, current)).pgid == 4242
    assert await count(engine, LogLine, stale) == 0
    assert await count(engine, CommandEvent, stale) == 0
    after = await row(engine, stale)
    assert (after.pgid, after.last_seq, after.fence, after.runner_id) == (None, 1, 2, "runner-2")


async def test_shares_under_their_own_fence_or_none_are_written(
    engine: AsyncEngine, gateway: RunnerStore
) -> None:
    fenced, unfenced = await running(engine, fence=7), await running(engine)
    plain = share(unfenced, 1, 2)
    plain.writer.fence = None  # a writer of a test or tool: not fenced
    written = await gateway.write_batch(gateway.build_batch([share(fenced, 7, 2), plain]), [])
    assert written.refused == []
    assert await count(engine, LogLine, fenced) == 2
    assert await count(engine, LogLine, unfenced) == 2


async def test_a_lease_renewal_under_a_raised_fence_is_refused_and_named(
    engine: AsyncEngine, gateway: RunnerStore
) -> None:
    kept, lost, gone = await running(engine), await running(engine), await running(engine)
    await recover(engine, lost)
    async with engine.begin() as connection:
        await connection.execute(update(Command).where(Command.id == gone).values(status="FAILED"))
    async with engine.begin() as connection:
        await connection.execute(
            update(Command).where(Command.id == kept).values(cancel_requested=True)
        )
    before = (await row(engine, lost)).lease_expires_at
    expires = utcnow() + timedelta(seconds=60)

    renewal = await gateway.renew_leases(RUNNER, {kept: 1, lost: 1, gone: 1}, expires)

    assert renewal.lost == sorted([lost, gone])
    assert renewal.cancel == [kept]
    assert (await row(engine, kept)).lease_expires_at > before
    assert (await row(engine, lost)).lease_expires_at == before  # not renewed
    assert (await gateway.renew_leases(RUNNER, {}, expires)).lost == []


def test_a_batch_less_refused_shares_keeps_every_other_part() -> None:
    batch = WriteBatch(
        sqlite_chunks=[[1, 1, "stdout", "t", 1, ["a"]], [2, 1, "stdout", "t", 1, ["b"]]],
        pg_copy=[(1, "a"), (2, "b")],
        updates={(("pgid",), True): [{"_id": 1, "pgid": 1}, {"_id": 2, "pgid": 2}]},
        fences={1: 1, 2: 1},
    )
    kept = batch.without({2})
    assert kept.sqlite_chunks == [[1, 1, "stdout", "t", 1, ["a"]]]
    assert kept.pg_copy == [(1, "a")]
    assert kept.updates == {(("pgid",), True): [{"_id": 1, "pgid": 1}]}
    assert kept.fences == {1: 1}
    assert batch.without({1, 2}).updates == {}


# -- the log store: a refused writer is lost -------------------------------------------------


async def test_a_refused_writer_is_lost_once_and_takes_nothing_more(engine: AsyncEngine) -> None:
    broker = Broker()
    store = LogStore(engine, broker, runner_id=RUNNER)
    store.start()
    try:
        command_id = await running(engine)
        writer = store.writer(command_id, 1, 0, fence=1)
        losses: list[int] = []
        writer.on_lost = lambda: losses.append(command_id)
        await writer.add_lines(*_stdout(["before"]))
        await writer.close()
        await recover(engine, command_id, runner="runner-2")
        async with broker.subscribe(command_topic(command_id)) as published:
            await writer.add_lines(*_stdout(["after the fence"]))
            await writer.close()
            assert writer.lost
            assert losses == [command_id]
            await writer.add_lines(*_stdout(["later still"]))
            await writer.close()
            with pytest.raises(TimeoutError):  # a refused share is not published either
                await asyncio.wait_for(published.get(), 0.1)
        assert losses == [command_id]
    finally:
        await store.close()
    async with engine.connect() as connection:
        texts = list(await connection.scalars(select(LogLine.text).order_by(LogLine.seq)))
    assert texts == ["before"]


def _stdout(lines: list[str]) -> tuple[LogStream, list[str]]:
    return LogStream.STDOUT, lines


# -- the runner: in-process, both databases ----------------------------------------------------

# Prints its pid, then a numbered line every 20 ms, for up to a minute.
PRINTER = (
    f"{sys.executable} -u -c "
    '\'import os, time\nprint("pid", os.getpid())\n'
    'for n in range(3000):\n    print("tick", n); time.sleep(0.02)\''
)


async def stdout_of(engine: AsyncEngine, command_id: int) -> list[tuple[int, str]]:
    async with engine.connect() as connection:
        rows = await connection.execute(
            select(LogLine.seq, LogLine.text)
            .where(LogLine.command_id == command_id)
            .order_by(LogLine.seq)
        )
        return [(seq, text) for seq, text in rows.all()]


async def child_pid(engine: AsyncEngine, command_id: int) -> int:
    for _ in range(400):
        for _, text in await stdout_of(engine, command_id):
            if text.startswith("pid "):
                return int(text.split()[1])
        await asyncio.sleep(0.025)
    raise AssertionError("the child never printed its pid")


async def gone(pid: int, timeout: float = 10.0) -> bool:
    for _ in range(int(timeout / 0.02)):
        if not alive(pid):
            return True
        await asyncio.sleep(0.02)
    return False


async def test_the_runner_kills_an_attempt_whose_fence_was_raised_and_writes_nothing_more(
    app: Starlette, gql: GraphQLClient, caplog: pytest.LogCaptureFixture
) -> None:
    engine: AsyncEngine = app.state.engine
    caplog.set_level(logging.WARNING, logger="corral")
    command_id = pk(await run(gql, commandString=PRINTER))
    pid = await child_pid(engine, command_id)

    # Another runner recovered the command and claimed it again (its lease and id).
    async with engine.begin() as connection:
        await connection.execute(
            update(Command)
            .where(Command.id == command_id)
            .values(fence=Command.fence + 1, runner_id="elsewhere:1:x", attempts=2)
        )
    async with engine.connect() as connection:
        fence_seq = await connection.scalar(
            select(Command.last_seq).where(Command.id == command_id)
        )

    assert await gone(pid), "the lost attempt's child still runs"
    await asyncio.sleep(0.3)  # anything the runner still wrote would show now
    after = await row(engine, command_id)
    assert (after.status, after.runner_id, after.attempts) == ("RUNNING", "elsewhere:1:x", 2)
    assert after.last_seq == fence_seq  # (a flush in flight held the row until it committed)
    assert (await stdout_of(engine, command_id))[-1][0] == fence_seq
    warnings = [r.getMessage() for r in caplog.records if "attempt_lost" in r.getMessage()]
    assert len(warnings) == 1, warnings
    assert f"command={command_id}" in warnings[0]
    assert app.state.supervisor.attempts == {}  # its slot is free


SILENT = f"{sys.executable} -u -c 'import os, time; print(\"pid\", os.getpid()); time.sleep(60)'"


async def test_a_runner_that_claims_again_what_was_recovered_from_it_kills_the_earlier_attempt(
    app: Starlette, gql: GraphQLClient
) -> None:
    # A silent child: no write of the earlier attempt would hear of the fence, and its
    # lease is no longer renewed (the runner renews the new attempt's): the claim tells.
    engine: AsyncEngine = app.state.engine
    command_id = pk(await run(gql, commandString=SILENT))
    first = await child_pid(engine, command_id)
    async with engine.begin() as connection:  # a recovery by another runner
        await connection.execute(
            update(Command)
            .where(Command.id == command_id)
            .values(
                fence=Command.fence + 1,
                status="QUEUED",
                runner_id=None,
                lease_expires_at=None,
                last_seq=Command.last_seq + 1,
            )
        )
    assert await gone(first), "the earlier attempt's child still runs"
    for _ in range(800):  # (generous: a loaded machine)
        pids = [text for _, text in await stdout_of(engine, command_id) if text.startswith("pid")]
        if len(pids) == 2:
            break
        await asyncio.sleep(0.025)
    assert len(pids) == 2, pids
    after = await row(engine, command_id)
    assert (after.status, after.attempts, after.runner_id) == (
        "RUNNING",
        2,
        app.state.supervisor.runner_id,
    )
    assert list(app.state.supervisor.attempts) == [command_id]


# -- a real runner process (PostgreSQL) -------------------------------------------------------

PINNED = """mutation($name: String!, $affinity: String!) {
  createProfile(input: {name: $name, runnerAffinity: $affinity}) { profile { id } }
}"""
REPIN = """mutation($id: ID!, $affinity: String!) {
  updateProfile(input: {id: $id, runnerAffinity: $affinity}) { profile { id } }
}"""


def hidden_printer() -> str:
    """PRINTER under a cleared environment: the run marker is gone, so another runner's
    recovery on this same host cannot find and kill it (as on another host it could not):
    only the stale runner itself can stop it."""
    return f"env -i {PRINTER}"


@ON_POSTGRES
async def test_a_runner_paused_past_its_lease_is_fenced_off_when_it_wakes(
    app: Starlette, gql: GraphQLClient, settings: Settings, tmp_path: Path
) -> None:
    # The app's embedded runner (label `fenced`, in this test's process) is the one that
    # recovers the command and runs it again; the profile is first pinned to the runner
    # process `stale`, so that it is the one to claim the command first.
    engine: AsyncEngine = app.state.engine
    data = await gql(PINNED, name="fenced-profile", affinity="stale")
    profile = data["createProfile"]["profile"]["id"]
    async with runner_process(
        settings, tmp_path, "--name", "stale", lease_seconds=str(LEASE)
    ) as stale:
        command_id = pk(await run(gql, commandString=hidden_printer(), profileId=profile))
        first_pid = await child_pid(engine, command_id)
        os.kill(stale.pid, signal.SIGSTOP)
        try:
            await gql(REPIN, id=profile, affinity="label:fenced")
            second = await _second_attempt_ticks(engine, command_id)
            assert alive(first_pid)  # the stale child printed on meanwhile
        finally:
            os.kill(stale.pid, signal.SIGCONT)
        assert await gone(first_pid), "the stale runner's child still runs"
        await asyncio.sleep(0.5)  # its late writes (had any got through) would be stored now
        lines = await _lines(engine, command_id)
        fence = next(seq for seq, _, text in lines if "stopped renewing" in text)
        late = [line for line in lines if line[0] > fence and line[1] == 1]
        assert late == [], late[:5]
        assert [seq for seq, _, _ in lines] == list(range(1, len(lines) + 1))
        assert second < len(lines)  # the new attempt went on writing
        after = await row(engine, command_id)
        assert (after.status, after.attempts) == ("RUNNING", 2)
        assert after.runner_id == app.state.supervisor.runner_id
    output = b"".join(stale.output).decode()
    assert output.count("event=attempt_lost") == 1, output


async def _lines(engine: AsyncEngine, command_id: int) -> list[tuple[int, int, str]]:
    async with engine.connect() as connection:
        rows = await connection.execute(
            select(LogLine.seq, LogLine.attempt, LogLine.text)
            .where(LogLine.command_id == command_id)
            .order_by(LogLine.seq)
        )
        return [(seq, attempt, text) for seq, attempt, text in rows.all()]


async def _second_attempt_ticks(engine: AsyncEngine, command_id: int) -> int:
    """Once the second attempt (on the fresh runner) prints: the number of stored lines."""
    for _ in range(1200):
        lines = await _lines(engine, command_id)
        if any(attempt == 2 and text.startswith("tick") for _, attempt, text in lines):
            return len(lines)
        await asyncio.sleep(0.025)
    raise AssertionError(f"no second attempt: {await _lines(engine, command_id)}")


# Runs about 2 s: a shell and two sleeps (three processes with the run's marker).
TWO_SLEEPS = "sh -c 'sleep 2 & sleep 2; wait; echo done'"


@ON_POSTGRES
async def test_a_runner_killed_9_has_its_commands_finish_elsewhere_within_the_lease(
    app: Starlette, gql: GraphQLClient, settings: Settings, tmp_path: Path
) -> None:
    # Two commands run on the runner process `doomed` (their profiles are pinned to it);
    # it is killed with SIGKILL; the app's embedded runner (label `fenced`) recovers them
    # once their lease expires, stops the processes they left (this host), runs them again.
    profiles = [
        (await gql(PINNED, name=f"doomed-{n}", affinity="doomed"))["createProfile"]["profile"]["id"]
        for n in range(2)
    ]
    async with runner_process(
        settings,
        tmp_path,
        "--name",
        "doomed",
        exits=(-signal.SIGKILL,),
        lease_seconds=str(LEASE),
        max_concurrency="2",
    ) as doomed:
        commands = [
            await run(gql, commandString=TWO_SLEEPS, profileId=profile) for profile in profiles
        ]
        orphans = [
            pid
            for command in commands
            for pid in await wait_processes(command, runner_pid=doomed.pid)
        ]
        doomed.kill()
        await doomed.wait()
        killed_at = time.monotonic()
        for profile in profiles:
            await gql(REPIN, id=profile, affinity="label:fenced")
        finals = [await wait_final(gql, command) for command in commands]
        for command in commands:
            recovered_in = await _recovered_after(engine_of(app), pk(command), killed_at)
            assert recovered_in < LEASE + 3, recovered_in
        assert [pid for pid in orphans if alive(pid)] == []
    for command, final in zip(commands, finals, strict=True):
        assert (final["status"], final["attempts"], final["uncountedAttempts"]) == (
            "SUCCEEDED",
            2,
            1,
        )
        lines = await logs_of(gql, command)
        assert "done" in texts(lines)
        assert any("stopped renewing its lease" in line["text"] for line in lines)


def engine_of(app: Starlette) -> AsyncEngine:
    engine: AsyncEngine = app.state.engine
    return engine


async def _recovered_after(engine: AsyncEngine, command_id: int, since: float) -> float:
    """Seconds from `since` (monotonic) to the recovery note (its stored timestamp)."""
    async with engine.connect() as connection:
        noted = await connection.scalar(
            select(LogLine.ts).where(
                LogLine.command_id == command_id, LogLine.text.like("%stopped renewing%")
            )
        )
    assert noted is not None
    return (noted - utcnow()).total_seconds() + (time.monotonic() - since)


@ON_POSTGRES
async def test_a_restarted_runner_stops_what_its_killed_run_left_once_finished_elsewhere(
    settings: Settings, tmp_path: Path
) -> None:
    # The command of a runner killed with SIGKILL is recovered and run to its end by a
    # runner on another host (written here as such a runner writes it: no runner of this
    # host recovers it, the app has none). Its processes here are no command's any more;
    # the killed runner, restarted, stops them.
    from server.app import create_app
    from tests.fixtures.auth import admin_client

    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    application = create_app(settings.model_copy(update={"embedded_runner": False}))
    async with application.router.lifespan_context(application), admin_client(application) as http:
        gql = GraphQLClient(http)
        async with runner_process(
            settings, tmp_path / "a", "--name", "phoenix", exits=(-signal.SIGKILL,)
        ) as first:
            command_id = await run(gql, commandString="sh -c 'sleep 300 & sleep 300; wait'")
            orphans = await wait_processes(command_id, runner_pid=first.pid)
            first.kill()
            await first.wait()
        assert all(alive(pid) for pid in orphans)
        async with engine_of(application).begin() as connection:
            await connection.execute(
                update(Command)
                .where(Command.id == pk(command_id))
                .values(status="SUCCEEDED", runner_id=None, lease_expires_at=None, pgid=None)
            )
        async with runner_process(settings, tmp_path / "b", "--name", "phoenix") as second:
            for _ in range(300):  # up to 30 s for a start on a loaded machine
                if not any(alive(pid) for pid in orphans):
                    break
                await asyncio.sleep(0.1)
            assert [pid for pid in orphans if alive(pid)] == []
            assert second.returncode is None
        output = b"".join(getattr(second, "output", [])).decode()
        assert "leftovers_killed" in output, output
