"""Reads shared by followers that join together, and lags answered from memory (issue 16).

Before: each of 200 followers joining a command read its own (empty) first page and its
own status; on SQLite each follower that lagged read an empty page and the status again.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator
from typing import Any

from sqlalchemy import update

from server.broker import Broker, StatusChange, command_topic
from server.fresh_reads import FreshReads
from server.messages import StoredBatch
from server.models import Command
from server.stream_pages import SharedPages
from server.streams import FinalStatus, follow_command
from tests.test_fanout import FirstSessionHeld, Sessions, published, running_command, seqs_of
from tests.test_streams import store_lines


class CountedReader:
    """A read that returns how many reads there were, each held until `gate` is set."""

    def __init__(self) -> None:
        self.calls = 0
        self.gate = asyncio.Event()

    async def __call__(self) -> int:
        self.calls += 1
        number = self.calls
        await self.gate.wait()
        return number


async def test_asks_of_one_pass_share_a_read_and_asks_while_it_runs_share_the_next() -> None:
    reads: FreshReads[int] = FreshReads()
    reader = CountedReader()
    first = [asyncio.create_task(reads.read("k", reader)) for _ in range(5)]
    await asyncio.sleep(0.01)
    assert reader.calls == 1  # the five asked before it began
    later = [asyncio.create_task(reads.read("k", reader)) for _ in range(5)]
    await asyncio.sleep(0.01)
    assert reader.calls == 1  # it began before they asked: they wait, and do not take it
    reader.gate.set()
    assert await asyncio.gather(*first) == [1] * 5
    assert await asyncio.gather(*later) == [2] * 5  # one more read for all of them
    assert reader.calls == 2
    assert not reads


async def test_a_result_right_whenever_it_was_read_is_taken_from_a_read_under_way() -> None:
    reads: FreshReads[int] = FreshReads()
    reader = CountedReader()
    first = asyncio.create_task(reads.read("k", reader))
    await asyncio.sleep(0.01)
    later = asyncio.create_task(reads.read("k", reader, usable=lambda _number: True))
    await asyncio.sleep(0.01)
    reader.gate.set()
    assert (await first, await later) == (1, 1)
    assert reader.calls == 1


async def test_a_follower_never_takes_a_status_read_that_began_before_it_asked(
    sessionmaker: Sessions,
) -> None:
    command_id = await running_command(sessionmaker)
    sessions, pages = FirstSessionHeld(sessionmaker, "after"), SharedPages()
    first = asyncio.create_task(pages.status(sessions, command_id))
    await sessions.held.wait()  # its query found RUNNING; it has not answered yet
    async with sessionmaker() as session, session.begin():
        await session.execute(
            update(Command).where(Command.id == command_id).values(status="SUCCEEDED")
        )
    second = [asyncio.create_task(pages.status(sessions, command_id)) for _ in range(10)]
    await asyncio.sleep(0.05)
    assert sessions.calls == 1  # they wait for the read under way
    sessions.release.set()
    assert await first == "RUNNING"
    assert await asyncio.gather(*second) == ["SUCCEEDED"] * 10
    assert sessions.calls == 2  # one read for the ten


async def test_followers_joining_together_share_their_first_page_and_status_reads(
    sessionmaker: Sessions,
) -> None:
    command_id = await running_command(sessionmaker)
    await store_lines(sessionmaker, command_id, range(1, 11))
    sessions, pages, broker = FirstSessionHeld(sessionmaker, "never"), SharedPages(), Broker()
    streams = [follow_command(sessions, broker, command_id, pages=pages) for _ in range(20)]
    firsts = await asyncio.gather(*(anext(stream) for stream in streams))
    statuses = await asyncio.gather(*(anext(stream) for stream in streams))
    assert all(
        isinstance(first, StoredBatch) and seqs_of([first]) == list(range(1, 11))
        for first in firsts
    )
    assert statuses == [StatusChange(command_id, "RUNNING")] * 20
    # Before: 60 reads (a page with lines, an empty one and the status, each per follower).
    assert sessions.calls <= 6
    for stream in streams:
        assert isinstance(stream, AsyncGenerator)
        await stream.aclose()


class OtherProcesses(Broker):
    """A broker that also carries other processes' messages (as server.pgbroker's does)."""

    single_process = False


async def lag_twice(sessionmaker_: Sessions, broker: Broker) -> tuple[int, int, list[Any]]:
    """A follower that lags twice, the second time past a status change it does not see
    in its queue: (sessions opened once it joined, once it ended, its items)."""
    command_id = await running_command(sessionmaker_)
    sessions, pages = FirstSessionHeld(sessionmaker_, "never"), SharedPages()
    stream = follow_command(sessions, broker, command_id, pages=pages, tick_seconds=0)
    items: list[Any] = [await anext(stream)]
    joined = sessions.calls

    async def until(seq: int) -> None:
        async with asyncio.timeout(30):
            while seqs_of([i for i in items if isinstance(i, StoredBatch)])[-1:] != [seq]:
                items.append(await anext(stream))

    await store_lines(sessionmaker_, command_id, range(1, 401))
    for first in range(1, 401, 50):  # more than its queue holds: it lags
        broker.publish(command_topic(command_id), published(first, 50, command_id))
    await until(400)

    async def next_item() -> Any:
        return await anext(stream)

    pending = asyncio.create_task(next_item())
    await asyncio.sleep(0.1)  # it is through with its first lag, waiting for its queue
    await store_lines(sessionmaker_, command_id, range(401, 801))
    for first in range(401, 801, 50):
        broker.publish(command_topic(command_id), published(first, 50, command_id))
    async with sessionmaker_() as session, session.begin():
        await session.execute(
            update(Command).where(Command.id == command_id).values(status="SUCCEEDED")
        )
    broker.publish_status(command_id, "SUCCEEDED")  # dropped: the follower is lagged
    async with asyncio.timeout(30):
        items.append(await pending)
        items.extend([item async for item in stream])
    return joined, sessions.calls, items


async def test_a_lag_on_one_process_s_broker_reads_nothing_unless_a_status_changed(
    sessionmaker: Sessions,
) -> None:
    # One process: every batch was heard, so the database has nothing newer: the status is
    # read after the second lag only (a change was heard), then the page ending the stream.
    # Else each lag reads an empty page and the status again.
    for broker, reads in ((Broker(), 2), (OtherProcesses(), 5)):
        broker.subscriber_max_bytes = 2 * published(1, 50).nbytes
        joined, ended, items = await lag_twice(sessionmaker, broker)
        assert ended - joined == reads
        batches = [item for item in items if isinstance(item, StoredBatch)]
        assert seqs_of(batches) == list(range(1, 801))
        command_id = batches[0].command_id
        assert items[0] == StatusChange(command_id, "RUNNING")
        assert items[-2:] == [StatusChange(command_id, "SUCCEEDED"), FinalStatus("SUCCEEDED")]
