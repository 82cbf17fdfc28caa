"""commandLogBatches messages made of other messages' lines (issue 16): a merge at the tick
and a follower's slice of a published batch are their batches' shared results joined, so a
line is executed once per selection, whatever messages it goes out in."""

from __future__ import annotations

import gc
from typing import Any

import pytest
from graphql import MiddlewareManager, parse

from graphql_schema.direct import DirectLeaves
from graphql_schema.log_messages import LogBatch, LogLine, log_batches, log_batches_of
from graphql_schema.schema import CorralExecutionContext, build_schema
from graphql_schema.shared_events import joined_data
from server.broker import Subscription
from server.ids import encode_global_id
from server.messages import LineRun, StoredBatch
from server.models import utcnow
from server.stream_batches import made_at_tick, sliced, with_queued
from tests.test_fanout import published, queued_of

BATCHES = """
subscription($id: ID!) { commandLogBatches(commandId: $id) { lines { seq text } final } }"""


@pytest.fixture
def executed(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The lines of each message graphql-core executes (not a shared result taken)."""
    lines: list[int] = []
    execute = DirectLeaves.execute_operation

    def counted(self: Any, serially: bool | None = None) -> Any:
        lines.append(len(self.root_value.lines))
        return execute(self, serially)

    monkeypatch.setattr(DirectLeaves, "execute_operation", counted)
    return lines


def subscriber() -> CorralExecutionContext:
    """The executor of one subscription's events (of one selection: one parsed operation)."""
    executor = CorralExecutionContext.build(
        build_schema()._schema,
        parse(BATCHES),
        raw_variable_values={"id": encode_global_id("Command", 1)},
    )
    assert isinstance(executor, CorralExecutionContext)
    return executor


def result_of(executor: CorralExecutionContext, message: LogBatch) -> Any:
    result = executor.build_per_event_executor(message).execute_operation()
    assert not result.errors
    return result.data


def seqs(data: Any) -> list[int]:
    return [line["seq"] for line in data["commandLogBatches"]["lines"]]


def test_a_tick_merge_and_a_slice_execute_no_line_again(executed: list[int]) -> None:
    # Before: the merge's 6 lines were executed for it after its batches' 3 + 3 (and each
    # lagged follower's slice of a batch for that follower alone): a PostgreSQL run of
    # 200 subscribers executed 543k lines for the 50k it printed.
    first, second = published(1, 3), published(4, 3)
    subscription = Subscription("command:1")
    for batch in (first, second):
        subscription.offer(batch)
    merge = with_queued(queued_of(subscription), subscription, at_tick=True)
    assert made_at_tick(merge)
    (message,) = log_batches_of(merge)
    executor = subscriber()
    data = result_of(executor, message)
    assert seqs(data) == [1, 2, 3, 4, 5, 6]
    assert data["commandLogBatches"]["final"] is False
    assert [line["text"] for line in data["commandLogBatches"]["lines"]][-1] == "line 6"
    assert executed == [3, 3]

    (cut,) = log_batches(sliced(second, 4))
    assert [line.seq for line in cut.lines] == [5, 6]
    assert seqs(result_of(executor, cut)) == [5, 6]
    assert executed == [3, 3]  # the second batch's result, cut


def test_parts_of_another_shape_are_not_joined() -> None:
    line = {"seq": 1}
    assert joined_data([{"a": {"lines": [line], "final": False}}] * 2, [0, 1]) == {
        "a": {"lines": [line], "final": False}
    }
    assert joined_data([{"a": {"final": False}}, {"a": {"final": True}}], [0, 0]) is None
    assert joined_data([{"a": {"lines": []}}, {"b": {"lines": []}}], [0, 0]) is None
    assert joined_data([None], [0]) is None


def test_published_messages_keep_no_line_objects() -> None:
    # Before: a published message held a LogLine object per line for as long as its batch
    # was remembered: a quarter of the objects the garbage collector tracked in a
    # 200-follower fan-out (each full collection walked them, the loop stopped meanwhile).
    batch = StoredBatch(
        1,
        [
            LineRun(1, "stdout", utcnow(), 1, [f"line {i}" for i in range(1, 501)]),
            LineRun(2, "stderr", utcnow(), 501, [f"line {i}" for i in range(501, 1001)]),
        ],
    )
    gc.collect()
    before = live_log_lines()
    messages = log_batches(batch)
    cut = log_batches(sliced(batch, 700))
    assert live_log_lines() == before
    assert sum(len(message.lines) for message in messages) == 1000
    assert sum(len(message.lines) for message in cut) == 300

    executor = subscriber()
    data = [result_of(executor, message) for message in messages]
    assert [seq for part in data for seq in seqs(part)] == list(range(1, 1001))
    assert [seq for message in cut for seq in seqs(result_of(executor, message))] == list(
        range(701, 1001)
    )
    assert live_log_lines() == before  # made for the execution, then let go
    stderr_line = next(line for message in cut for line in message.lines)
    assert (stderr_line.seq, stderr_line.attempt, stderr_line.stream.name) == (701, 2, "STDERR")


def live_log_lines() -> int:
    return sum(1 for thing in gc.get_objects() if isinstance(thing, LogLine))


def test_only_the_root_field_of_an_event_goes_through_the_middleware() -> None:
    # Before: an event's batch is at hand when its root field resolves, so every field of
    # every line was completed with the root's middleware still on (our schema's resolve
    # hooks, RoleGuard and MutationAudit: two calls more a field, and no direct leaves).
    seen: list[list[Any]] = []

    class Recorder:
        def resolve(self, next_: Any, root: Any, info: Any, **kwargs: Any) -> Any:
            seen.append(info.path.as_list())
            return next_(root, info, **kwargs)

    executor = CorralExecutionContext.build(
        build_schema()._schema,
        parse(BATCHES),
        raw_variable_values={"id": encode_global_id("Command", 1)},
        middleware=MiddlewareManager(Recorder()),
    )
    assert isinstance(executor, CorralExecutionContext)
    for first in (1, 11):
        (message,) = log_batches(published(first, 10))
        assert seqs(result_of(executor, message)) == list(range(first, first + 10))
    assert seen == [["commandLogBatches"]] * 2
