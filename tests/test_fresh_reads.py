"""Reads shared by followers that join together (issue 16).

Before: each of 200 followers joining a command read its own (empty) first page and its
own status.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncGenerator

from sqlalchemy import update

from server.broker import Broker, StatusChange
from server.fresh_reads import FreshReads
from server.messages import StoredBatch
from server.models import Command
from server.streams import SharedPages, follow_command
from tests.test_fanout import FirstSessionHeld, Sessions, running_command, seqs_of
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
