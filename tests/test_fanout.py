"""Live streams at fan-out (issue 16): the batched subscription, shared events, the stream pool.

A real uvicorn, real sockets: `websockets` speaking graphql-transport-ws, the SSE client of
test_streams.
"""

from __future__ import annotations

import asyncio
import gc
from collections.abc import AsyncGenerator, AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast

import httpx
import pytest
from graphql import FragmentDefinitionNode, OperationDefinitionNode, parse
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from starlette.datastructures import Headers

from graphql_schema.log_messages import log_batches, log_batches_of
from graphql_schema.shared_events import SHARED_SELECTIONS, SharedData, SharedResults
from server import access
from server.broker import Broker, StatusChange, Subscription, command_topic
from server.db import READ_ONLY
from server.logstream import (
    SHARED_CHECK_SHARE,
    _checks,
    _encoded,
    credential_holds,
    encode_log_events,
    shared_log_events,
)
from server.messages import LineRun, StoredBatch
from server.models import Command, utcnow
from server.settings import Settings
from server.stream_batches import (
    MERGE_LINES,
    SEND_CHUNK_BYTES,
    made_at_tick,
    parts_of,
    pieces,
    with_queued,
)
from server.stream_pages import PAGE_GRID, SharedPages
from server.streams import follow_command
from tests.conftest import GraphQLClient
from tests.fixtures.commands import FINAL, wait_status
from tests.fixtures.servers import LiveServer, running_server
from tests.test_streams import (
    STREAM_TIMEOUT,
    GraphQLSocket,
    assert_ends_final,
    log_seqs,
    pk,
    read_sse,
    run_command,
    store_lines,
    stored_logs,
)

BATCHES = """
subscription($id: ID!, $after: Int) {
  commandLogBatches(commandId: $id, afterSeq: $after) { lines { seq attempt stream text } final }
}"""
# Another selection of the same events: its own shared result.
BATCH_SEQS = """
subscription($id: ID!) { b: commandLogBatches(commandId: $id) { final lines { seq } } }"""
# Waits until the subscribers are there, then prints in several pipe reads (several batches).
PRINTS = "sh -c 'sleep 1; for i in $(seq 1 40); do seq $((i*10-9)) $((i*10)); sleep 0.02; done'"


@pytest.fixture
async def live(settings: Settings) -> AsyncIterator[LiveServer]:
    async with running_server(settings, stream_pool_size=1, lease_seconds=0.9) as server:
        yield server


@pytest.fixture
async def api(live: LiveServer) -> AsyncIterator[GraphQLClient]:
    async with httpx.AsyncClient(
        base_url=live.base_url, headers=live.headers, timeout=STREAM_TIMEOUT
    ) as client:
        yield GraphQLClient(client)


async def batches(live: LiveServer, query: str, **variables: Any) -> list[dict[str, Any]]:
    """The messages of one subscription on a socket of its own, up to `complete`."""
    async with GraphQLSocket.open(live) as ws:
        await ws.subscribe("s", query, **variables)
        return [next(iter(data.values())) for data in await ws.until_complete("s")]


async def test_batches_replay_then_live_once_each_shared_by_subscribers_of_a_selection(
    api: GraphQLClient, live: LiveServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    encodes = 0
    encode = SharedData.json

    def counted(self: SharedData) -> str:
        nonlocal encodes
        encodes += self._json is None
        return encode(self)

    monkeypatch.setattr(SharedData, "json", counted)
    command_id = await run_command(api, PRINTS)
    same, other, seqs_only = await asyncio.gather(
        batches(live, BATCHES, id=command_id),
        batches(live, BATCHES, id=command_id, after=0),
        batches(live, BATCH_SEQS, id=command_id),
    )
    stored = await stored_logs(api, command_id)
    assert [line["text"] for line in stored if line["stream"] == "STDOUT"] == [
        str(i) for i in range(1, 401)
    ]
    for messages in (same, other, seqs_only):
        # Every line once, in order, then one last empty message marked final.
        assert messages[-1] == {"lines": [], "final": True}
        assert not any(m["final"] for m in messages[:-1])
        assert all(m["lines"] for m in messages[:-1])
        assert [line["seq"] for m in messages for line in m["lines"]] == list(
            range(1, len(stored) + 1)
        )
    assert [line for m in same for line in m["lines"]] == [
        {key: line[key] for key in ("seq", "attempt", "stream", "text")} for line in stored
    ]
    # Batches, not a line a message. (How many depends on when the subscribers got in: on
    # a host at load 18 they joined after the command's first second, and replayed it.)
    assert 2 <= len(same) <= len(stored) // 4
    # The two subscribers of one selection (afterSeq aside) shared each live message's
    # encoding: fewer encodings than the messages the three subscribers got.
    assert 0 < encodes < len(same) + len(other) + len(seqs_only) - len(same) // 2

    # A late subscriber replays from the database, after afterSeq, and completes.
    replay = await batches(live, BATCHES, id=command_id, after=len(stored) - 5)
    assert [line["seq"] for m in replay for line in m["lines"]] == list(
        range(len(stored) - 4, len(stored) + 1)
    )
    assert replay[-1]["final"]


async def test_replays_never_take_the_runner_and_requests_pool(
    api: GraphQLClient, live: LiveServer
) -> None:
    services = live.app.state.services
    async with httpx.AsyncClient(
        base_url=live.base_url, headers=live.headers, timeout=STREAM_TIMEOUT
    ) as http:
        first = await run_command(api, "echo before")
        assert (await wait_status(api, first, FINAL))["status"] == "SUCCEEDED"
        # The stream pool (one connection here) is held, as by a replay to a slow client.
        async with services.stream_sessions() as held:
            await held.connection(execution_options=READ_ONLY)
            followers = [asyncio.create_task(read_sse(http, first)) for _ in range(5)]
            # A mutation and the runner (claim, log store, lease renewals) go on.
            second = await run_command(api, "sh -c 'echo one; sleep 1.2; echo two'")
            await wait_status(api, second, {"RUNNING"})
            leases = [await lease_of(live, second)]
            await asyncio.sleep(0.7)
            leases.append(await lease_of(live, second))
            assert (await wait_status(api, second, FINAL))["status"] == "SUCCEEDED"
            assert None not in leases
            assert leases[1] > leases[0]
            # ...while the followers wait for the stream pool.
            assert not any(task.done() for task in followers)
        for events in await asyncio.gather(*followers):
            assert log_seqs(events) == list(range(1, len(log_seqs(events)) + 1))
            assert len(log_seqs(events)) >= 2
            assert_ends_final(events)


async def lease_of(live: LiveServer, command_id: str) -> Any:
    async with live.app.state.services.sessionmaker() as session:
        return await session.scalar(
            select(Command.lease_expires_at).where(Command.id == pk(command_id))
        )


@pytest.mark.parametrize(
    ("query", "variables", "other", "shared"),
    [
        # The root field's arguments choose the stream, not how an event is shown.
        (BATCHES, {"id": "a", "after": 1}, {"id": "b", "after": 7}, True),
        (
            "subscription($id: ID!, $t: Boolean!) { commandLogBatches(commandId: $id) "
            "{ final lines @include(if: $t) { seq } } }",
            {"id": "a", "t": True},
            {"id": "a", "t": False},
            False,
        ),
        (
            'subscription($t: Boolean!) { commandLogBatches(commandId: "x") { ...F } } '
            "fragment F on LogBatch { final lines @skip(if: $t) { seq } }",
            {"t": True},
            {"t": False},
            False,
        ),
    ],
    ids=["root-arguments", "include", "skip-in-fragment"],
)
def test_a_shared_result_is_keyed_by_what_the_selection_depends_on(
    query: str, variables: dict[str, Any], other: dict[str, Any], shared: bool
) -> None:
    document = parse(query)
    operation = next(d for d in document.definitions if isinstance(d, OperationDefinitionNode))
    fragments = {
        d.name.value: d for d in document.definitions if isinstance(d, FragmentDefinitionNode)
    }
    results = SharedResults()
    data = results.put(operation, fragments, variables, {"commandLogBatches": {"final": False}})
    assert results.get(operation, fragments, variables) is data
    assert (results.get(operation, fragments, other) is data) is shared
    assert results.get(parse(query).definitions[0], fragments, variables) is None  # type: ignore[arg-type]


def test_an_event_keeps_the_results_of_a_few_selections_only() -> None:
    # An event lives as long as its batch is remembered for lagged followers: a client
    # subscribing with a new alias each time made every remembered batch keep one more
    # result (~10 MB a selection over a flood's remembered batches, kept after it left).
    results = SharedResults()
    operations = [
        cast(
            OperationDefinitionNode,
            parse(f"subscription {{ s{n}: commandLogBatches }}").definitions[0],
        )
        for n in range(SHARED_SELECTIONS + 20)
    ]
    shown = [results.put(op, {}, {}, {"n": n}) for n, op in enumerate(operations)]
    kept = [results.get(op, {}, {}) for op in operations]
    assert kept == [*shown[:SHARED_SELECTIONS], *[None] * 20]
    assert shown[-1] == {"n": SHARED_SELECTIONS + 19}  # shown all the same, on its own


async def test_a_follower_behind_merges_the_queued_batches_up_to_a_status_change() -> None:
    def batch(first: int, count: int) -> StoredBatch:
        texts = [f"line {i}" for i in range(first, first + count)]
        return StoredBatch(1, [LineRun(1, "stdout", utcnow(), first, texts)])

    subscription, same, behind = (Subscription("command:1") for _ in range(3))
    published = (batch(1, 3), batch(4, 2), batch(6, 1), StatusChange(1, "SUCCEEDED"))
    for message in published:
        subscription.offer(message)
        same.offer(message)
    behind.offer(published[0])
    subscription.offer(batch(7, MERGE_LINES))
    held = subscription.held_bytes
    first = await next_batch(subscription)
    merged = with_queued(first, subscription)
    # Another follower with the same batches queued gets the same merged object; one with
    # fewer queued gets the published batch itself.
    assert with_queued(await next_batch(same), same) is merged
    assert with_queued(await next_batch(behind), behind) is published[0]
    assert [(run.first_seq, run.texts) for run in merged.runs] == [
        (1, ["line 1", "line 2", "line 3"]),
        (4, ["line 4", "line 5"]),
        (6, ["line 6"]),
    ]
    assert subscription.held_bytes == held  # merged, still held until the next get
    assert await subscription.get() == StatusChange(1, "SUCCEEDED")
    alone = await next_batch(subscription)
    assert with_queued(alone, subscription) is alone  # nothing queued: the shared object
    assert subscription.held_bytes == alone.nbytes


async def next_batch(subscription: Subscription) -> StoredBatch:
    """The subscription's next message, which the test published as a batch."""
    message = await subscription.get()
    assert isinstance(message, StoredBatch), message
    return message


# -- shared replay pages and SSE text ------------------------------------------------------

Sessions = async_sessionmaker[AsyncSession]


async def running_command(sessionmaker: Sessions) -> int:
    async with sessionmaker() as session, session.begin():
        row = Command(source="x", argv=["x"], status="RUNNING")
        session.add(row)
    return row.id


async def replay(
    sessionmaker: Sessions, broker: Broker, pages: SharedPages, command_id: int, after: int = 0
) -> list[StoredBatch]:
    """What one follower replays: its batches up to the status that ends the replay."""
    got: list[StoredBatch] = []
    async with asyncio.timeout(30):
        async for item in follow_command(sessionmaker, broker, command_id, after, pages=pages):
            if isinstance(item, StatusChange):
                return got
            assert isinstance(item, StoredBatch), item
            got.append(item)
    raise AssertionError("the replay ended without a status")


def texts(batch: StoredBatch) -> list[str]:
    return [text for run in batch.runs for text in run.texts]


async def test_followers_replaying_together_share_each_page_and_get_every_line_once(
    sessionmaker: Sessions,
) -> None:
    command_id = await running_command(sessionmaker)
    await store_lines(sessionmaker, command_id, range(1, 3001))
    # Pages of ~10 KB (a quarter of a subscriber's bound): dozens of pages to replay.
    broker, pages = Broker(subscriber_max_bytes=40_000), SharedPages()
    followers = await asyncio.gather(
        *(replay(sessionmaker, broker, pages, command_id) for _ in range(20))
    )
    alone = await replay(sessionmaker, broker, SharedPages(), command_id)
    for got in followers:
        seqs = [
            seq
            for batch in got
            for run in batch.runs
            for seq in range(run.first_seq, run.last_seq + 1)
        ]
        assert seqs == list(range(1, 3001))
        assert [run.texts for b in got for run in b.runs] == [
            run.texts for b in followers[0] for run in b.runs
        ]
        # The very same page objects: their SSE text and GraphQL results are shared too.
        assert all(a is b for a, b in zip(got, followers[0], strict=True))
    assert len(alone) > 10
    # One read per page (and the empty one that ends the replay, per follower at most).
    assert pages.reads <= len(alone) + 20


def seqs_of(batches: list[StoredBatch]) -> list[int]:
    return [
        seq for b in batches for run in b.runs for seq in range(run.first_seq, run.last_seq + 1)
    ]


async def test_followers_resuming_at_different_seqs_meet_on_the_same_pages(
    sessionmaker: Sessions,
) -> None:
    command_id = await running_command(sessionmaker)
    await store_lines(sessionmaker, command_id, range(1, 3001))
    broker, pages = Broker(subscriber_max_bytes=40_000), SharedPages()
    afters = [7 * i for i in range(20)]  # within the first two cells of the grid
    followers = await asyncio.gather(
        *(replay(sessionmaker, broker, pages, command_id, after) for after in afters)
    )
    alone = SharedPages()
    await replay(sessionmaker, broker, alone, command_id, afters[-1])
    for after, got in zip(afters, followers, strict=True):
        assert seqs_of(got) == list(range(after + 1, 3001))
    # Past the grid multiple they all reach, every follower has the same page objects.
    meet = max(afters) - max(afters) % PAGE_GRID + PAGE_GRID
    later = [[b for b in got if b.runs[0].first_seq > meet] for got in followers]
    assert len(later[0]) > 10
    assert all(all(a is b for a, b in zip(x, later[0], strict=True)) for x in later)
    # Twenty followers cost little more reads than one alone (without the grid: 20 times).
    assert pages.reads < 2 * alone.reads + 20


class FirstSessionHeld:
    """The sessions of a test's database; the first one is held up `where` (after its
    query, or before it), until `release` is set (never, for a follower gone away)."""

    def __init__(self, sessionmaker: Sessions, where: str) -> None:
        self.sessionmaker, self.where = sessionmaker, where
        self.calls = 0
        self.held, self.release = asyncio.Event(), asyncio.Event()

    @asynccontextmanager
    async def __call__(self) -> AsyncIterator[AsyncSession]:
        self.calls += 1
        first = self.calls == 1
        if first and self.where == "before":
            self.held.set()
            await self.release.wait()
        async with self.sessionmaker() as session:
            yield session
        if first and self.where == "after":
            self.held.set()
            await self.release.wait()


async def test_a_follower_never_trusts_an_empty_page_read_before_it_asked(
    sessionmaker: Sessions,
) -> None:
    command_id = await running_command(sessionmaker)
    sessions, pages = FirstSessionHeld(sessionmaker, "after"), SharedPages()
    first = asyncio.create_task(pages.read(sessions, command_id, 0, 100, 10_000))
    await sessions.held.wait()  # its query found nothing; it has not answered yet
    await store_lines(sessionmaker, command_id, range(1, 4))
    second = asyncio.create_task(pages.read(sessions, command_id, 0, 100, 10_000))
    await asyncio.sleep(0.05)  # it waits for the read under way
    assert pages.reads == 1
    sessions.release.set()
    assert (await first).runs == []
    assert texts(await second) == ["line 1", "line 2", "line 3"]
    # A page with lines is kept for the next followers; the empty one never was.
    assert await pages.read(sessions, command_id, 0, 100, 10_000) is await second
    assert pages.reads == 2


async def test_a_shared_read_that_is_cancelled_leaves_its_waiters_to_read_alone(
    sessionmaker: Sessions,
) -> None:
    command_id = await running_command(sessionmaker)
    await store_lines(sessionmaker, command_id, range(1, 3))
    sessions, pages = FirstSessionHeld(sessionmaker, "before"), SharedPages()
    first = asyncio.create_task(pages.read(sessions, command_id, 0, 100, 10_000))
    await sessions.held.wait()
    second = asyncio.create_task(pages.read(sessions, command_id, 0, 100, 10_000))
    await asyncio.sleep(0.05)
    assert not second.done()  # it waits for the first read
    first.cancel()  # the first follower's client went away
    async with asyncio.timeout(10):
        page = await second
    assert texts(page) == ["line 1", "line 2"]
    assert pages.reads == 2
    assert not pages._reading


def test_shared_pages_keep_recent_pages_up_to_their_bytes() -> None:
    stamp = utcnow()
    pages = SharedPages(max_bytes=3 * 10_000)

    def page(seq: int) -> StoredBatch:
        return StoredBatch(1, [LineRun(1, "stdout", stamp, seq, ["x" * 1000] * 9)])

    for seq in range(1, 6):
        pages._keep(("s", 1, seq, 100, 10_000), page(seq))
    assert [key[2] for key in pages._kept] == [3, 4, 5]  # the oldest went first
    assert pages._kept_bytes <= pages.max_bytes


def test_a_batch_s_sse_text_is_encoded_once_for_every_stream_it_goes_to() -> None:
    stamp = utcnow()
    batch = StoredBatch(3, [LineRun(1, "stdout", stamp, 1, ["y" * 1000] * 200)])
    first = shared_log_events(batch)
    assert shared_log_events(batch) is first
    assert len(first) > 1  # in pieces of bounded size, as before
    assert first == [encode_log_events(piece) for piece in pieces(batch)]
    key = id(batch)
    del batch
    gc.collect()
    assert key not in _encoded


# -- write scheduling, remembered batches, merged SSE text, credential checks ---------------


def published(first: int, count: int, command_id: int = 1) -> StoredBatch:
    texts = [f"line {i}" for i in range(first, first + count)]
    return StoredBatch(command_id, [LineRun(1, "stdout", utcnow(), first, texts)])


async def test_followers_that_keep_up_wake_on_one_tick_and_share_its_merge(
    sessionmaker: Sessions,
) -> None:
    # Before: each follower sent every stored batch as it came, one send (through the
    # middleware and the socket) per batch and per follower; followers that took their
    # queues at different moments each merged (and encoded) their own.
    command_id = await running_command(sessionmaker)
    broker, pages = Broker(), SharedPages()
    streams = [
        follow_command(sessionmaker, broker, command_id, pages=pages, tick_seconds=0.2)
        for _ in range(5)
    ]
    for stream in streams:  # replayed nothing; the status
        assert await anext(stream) == StatusChange(command_id, "RUNNING")
    nexts = [asyncio.ensure_future(anext(stream)) for stream in streams]
    await asyncio.sleep(0)
    batches = [published(1, 3, command_id), published(4, 2, command_id)]
    for batch in batches:  # published within one tick (together: on a loaded machine
        broker.publish(command_topic(command_id), batch)  # 10 ms apart could span two)
    got = await asyncio.gather(*nexts)
    merged = got[0]
    assert isinstance(merged, StoredBatch)
    assert all(item is merged for item in got)  # one merge, the same object for all
    assert seqs_of([merged]) == [1, 2, 3, 4, 5]
    assert parts_of(merged) == tuple(batches)
    for stream in streams:
        assert isinstance(stream, AsyncGenerator)
        await stream.aclose()


async def test_a_follower_that_lagged_replays_the_remembered_batches_not_the_database(
    sessionmaker: Sessions,
) -> None:
    # Before: a follower that lagged re-read what it missed from the database, a page at a
    # time; those pages (a window query, rows turned into runs) cost more than anything
    # else on its way while 200 followers lagged in turn.
    command_id = await running_command(sessionmaker)
    await store_lines(sessionmaker, command_id, range(1, 401))
    pages = SharedPages()
    for first in range(1, 401, 50):  # what followers that kept up got live
        pages.remember(sessionmaker, published(first, 50, command_id))
    pages.remember(sessionmaker, published(20, 5, command_id))  # known: ignored
    got = await replay(sessionmaker, Broker(subscriber_max_bytes=40_000), pages, command_id, 30)
    assert seqs_of(got) == list(range(31, 401))
    assert [text for batch in got for text in texts(batch)] == [f"line {i}" for i in range(31, 401)]
    assert pages.recent_pages >= 1
    assert pages.reads == 1  # only the empty page that ends the replay
    # Remembered batches are bounded in bytes, the oldest out first; a gap starts afresh.
    small = SharedPages(recent_bytes=3 * published(1, 50).nbytes)
    for first in range(1, 251, 50):
        small.remember(sessionmaker, published(first, 50))
    small.remember(sessionmaker, published(400, 50))
    assert small._recent_held <= small.recent_bytes
    assert [b.runs[0].first_seq for b in small._recent[(sessionmaker, 1)]] == [400]


async def test_a_follower_that_lagged_finds_what_its_queue_dropped_in_memory(
    sessionmaker: Sessions,
) -> None:
    # Issue 15: batches were remembered only once a follower took them from its queue; a
    # busy command outran its follower's queue, which dropped them, and the follower read
    # every line back from the database (its reads competed with the writer's).
    command_id = await running_command(sessionmaker)
    broker = Broker(subscriber_max_bytes=2 * published(1, 50, command_id).nbytes)
    pages = SharedPages()
    stream = follow_command(sessionmaker, broker, command_id, pages=pages, tick_seconds=0)
    assert await anext(stream) == StatusChange(command_id, "RUNNING")
    await store_lines(sessionmaker, command_id, range(1, 401))
    for first in range(1, 401, 50):  # more than its queue holds: it lags
        broker.publish(command_topic(command_id), published(first, 50, command_id))
    got: list[StoredBatch] = []
    async with asyncio.timeout(30):
        while seqs_of(got)[-1:] != [400]:
            item = await anext(stream)
            assert isinstance(item, StoredBatch), item
            got.append(item)
    assert seqs_of(got) == list(range(1, 401))
    assert [text for batch in got for text in texts(batch)] == [f"line {i}" for i in range(1, 401)]
    assert pages.recent_pages >= 1
    assert pages.reads <= 1  # at most the empty page that ends a replay
    assert isinstance(stream, AsyncGenerator)
    await stream.aclose()
    # The last follower gone, nothing listens for the command any more.
    assert not broker._taps
    assert not pages._taps


def test_a_tap_hears_every_message_and_never_lags() -> None:
    broker = Broker(subscriber_max_bytes=1)
    heard: list[Any] = []
    with broker.tap("command:1", heard.append):
        for i in range(3):
            broker.publish("command:1", published(i * 10 + 1, 10))
        broker.publish("command:2", published(1, 10))  # another topic: not heard
    broker.publish("command:1", published(31, 10))  # after the block: not heard
    assert [batch.runs[0].first_seq for batch in heard] == [1, 11, 21]
    assert not broker._taps
    assert not broker._subscribers


async def test_a_page_of_remembered_batches_is_those_batches_and_shares_their_text(
    sessionmaker: Sessions,
) -> None:
    # Before: a page made of remembered batches was new runs, cut to the page grid; every
    # lagged follower's page was encoded again (SSE text, GraphQL messages): 200 followers
    # lagging in turn spent most of the server's CPU encoding the same lines (issue 16).
    pages = SharedPages()
    batches = [published(first, 50) for first in range(1, 401, 50)]
    for batch in batches:
        pages.remember(sessionmaker, batch)
    texts_of = {id(batch): shared_log_events(batch) for batch in batches}  # sent live
    page = await pages.read(sessionmaker, 1, 100, 1_000, 1 << 20)  # at a batch's end
    parts = parts_of(page)
    assert parts == tuple(batches[2:])  # the very objects, up to a batch's end
    assert seqs_of([page]) == list(range(101, 401))
    text = shared_log_events(page)
    assert b"".join(text) == b"".join(p for part in parts for p in texts_of[id(part)])
    assert b"".join(text) == encode_log_events(page)
    # Inside a batch: that batch from the next line on, then the others as they are.
    inside = await pages.read(sessionmaker, 1, 120, 1_000, 1 << 20)
    assert seqs_of([inside]) == list(range(121, 401))
    assert parts_of(inside)[1:] == tuple(batches[3:])
    # A page ends where a batch ends, once its byte budget is spent.
    small = await pages.read(sessionmaker, 1, 0, 1_000, 2 * batches[0].nbytes)
    assert seqs_of([small])[-1] % 50 == 0
    assert pages.reads == 0
    assert await pages.read(sessionmaker, 1, 100, 1_000, 1 << 20) is page  # kept, shared


def queued_of(subscription: Subscription) -> StoredBatch:
    queued = subscription.take_queued()
    assert isinstance(queued, StoredBatch)
    return queued


def test_a_merge_s_sse_text_is_its_batches_text_joined() -> None:
    subscription, other = Subscription("command:1"), Subscription("command:1")
    batches = [published(first, 40) for first in range(1, 401, 40)]
    for batch in batches:
        subscription.offer(batch)
    other.offer(batches[0])
    parts = [shared_log_events(batch) for batch in batches]  # encoded as they came
    merged = with_queued(queued_of(subscription), subscription)
    assert parts_of(merged) == tuple(batches)
    text = shared_log_events(merged)
    assert b"".join(text) == b"".join(piece for part in parts for piece in part)
    assert b"".join(text) == encode_log_events(merged)
    assert len(text) < len(batches)  # joined: fewer sends than batches
    assert all(len(piece) <= SEND_CHUNK_BYTES for piece in text)
    assert parts_of(batches[0]) == (batches[0],)


async def test_streams_holding_one_credential_share_its_recheck(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Before: each of 200 SSE followers with the same token checked it against the database
    # every CREDENTIAL_RECHECK_SECONDS on its own.
    class Counting:
        checks = 0
        holds = True

        async def from_headers(self, headers: Headers) -> tuple[object | None, bool]:
            self.checks += 1
            await asyncio.sleep(0.01)
            return (object() if self.holds else None), False

    monkeypatch.setattr(access, "CREDENTIAL_RECHECK_SECONDS", 0.6)
    authenticator: Any = Counting()
    token = Headers({"authorization": "Bearer one"})
    results = await asyncio.gather(*(credential_holds(authenticator, token) for _ in range(50)))
    assert all(results)
    assert authenticator.checks == 1
    assert await credential_holds(authenticator, Headers({"authorization": "Bearer two"}))
    assert authenticator.checks == 2
    authenticator.holds = False  # revoked: a check older than the window is not reused
    await asyncio.sleep(access.CREDENTIAL_RECHECK_SECONDS * SHARED_CHECK_SHARE + 0.05)
    assert not await credential_holds(authenticator, token)
    assert authenticator.checks == 3
    assert len(_checks[authenticator]) == 1  # the other credential's old check is gone


def test_a_small_merge_of_a_follower_behind_goes_to_graphql_as_its_batches_messages() -> None:
    # Before: a follower behind (it took its queue without waiting for the tick) executed
    # its own merge of up to 256 lines for itself alone; at 200 subscribers, executing such
    # merges took more of the server's CPU than the sends.
    behind = Subscription("command:1")
    batches = [published(first, 50) for first in (1, 51, 101)]
    for batch in batches:
        behind.offer(batch)
    merge = with_queued(queued_of(behind), behind)
    assert parts_of(merge) == tuple(batches)
    assert not made_at_tick(merge)
    messages = log_batches_of(merge)
    assert all(
        a is b
        for a, b in zip(messages, [m for batch in batches for m in log_batches(batch)], strict=True)
    )
    assert len(messages) == len(batches)


def test_a_large_merge_goes_to_graphql_as_its_batches_shared_messages() -> None:
    # Before: a follower that fell behind executed its own merge of up to 2,000 lines (a
    # resolver call per field of every line) for itself alone.
    small, large = Subscription("command:1"), Subscription("command:1")
    for first in (1, 11):
        small.offer(published(first, 10))
    small_merge = with_queued(queued_of(small), small, at_tick=True)
    assert made_at_tick(small_merge)
    assert len(log_batches_of(small_merge)) == 1  # one message, shared with its tick
    batches = [published(first, 100) for first in range(1, 1001, 100)]
    for batch in batches:
        large.offer(batch)
    large_merge = with_queued(queued_of(large), large)
    messages = log_batches_of(large_merge)
    assert messages == [message for batch in batches for message in log_batches(batch)]
    assert all(
        a is b
        for a, b in zip(messages, [m for batch in batches for m in log_batches(batch)], strict=True)
    )
