"""Subscription events that many subscribers receive: executed and encoded once (issue 16).

A published log batch goes to every subscriber of its command. Each subscriber's event
would be executed by graphql-core (a resolver call per field of every line) and encoded
to JSON on its own: with 200 subscribers, 200 times the same work. An event that carries
`SharedResults` is executed once per selection instead: the first subscriber of a
selection executes it and keeps the result's data as `SharedData`; the others with the
same selection get that very object, and the WebSocket writes its JSON, encoded once,
inside each subscriber's own `next` message (graphql_http.StrictGraphQL.encode_json).

"The same selection": the same parsed operation (queries are parsed through a shared
cache, so subscribers sending the same text share one) and the same values of the
variables the result can depend on: those used anywhere but in the root field's own
arguments (which choose the event stream, not how an event is shown).

Even an event whose data is shared cost each subscriber graphql-core's per-event executor
and Strawberry's result handling and extension hooks, most of the event loop's time with
200 subscribers. Where the transport can write a shared event itself (`shared_send`, set
by the WebSocket's operation task), an event whose data for the selection exists and
passed the response limit skips all that (`sent_directly`): the transport writes the very
message the full path would have written.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable
from contextvars import ContextVar
from typing import Any

from graphql import FieldNode, OperationDefinitionNode, VariableNode, Visitor, visit
from graphql.language.visitor import SKIP

_RELEVANT_CACHE_SIZE = 1024
# Most selections whose result one event keeps. An event lives as long as its batch, and
# batches are remembered for lagged followers (server.stream_pages.SharedPages, ~16 MB in all):
# each selection kept adds about that much again, so without a cap a client subscribing
# with a new alias each time grew the server by ~10 MB a selection, even after leaving.
# Followers beyond the cap are shown the event on their own (as before issue 16).
SHARED_SELECTIONS = 4


class SharedData(dict[str, Any]):
    """A subscription event's data shared by subscribers, with its JSON encoded once.

    `fits_response`: True once the response limit (graphql_schema.limits) let it pass,
    False once it did not, None until it was checked."""

    __slots__ = ("_json", "fits_response")

    def __init__(self, data: dict[str, Any]) -> None:
        super().__init__(data)
        self._json: str | None = None
        self.fits_response: bool | None = None

    def json(self) -> str:
        """The data as compact JSON (as the GraphQL view encodes messages), encoded once."""
        if self._json is None:
            self._json = json.dumps(self, separators=(",", ":"))
        return self._json


class SharedResults:
    """The results of one event, one per selection seen so far."""

    __slots__ = ("_results",)

    def __init__(self) -> None:
        self._results: list[tuple[OperationDefinitionNode, tuple[Any, ...], SharedData]] = []

    def get(
        self, operation: OperationDefinitionNode, fragments: Any, variables: dict[str, Any]
    ) -> SharedData | None:
        """The data executed already for this selection, if any."""
        key = selection_key(operation, fragments, variables)
        for seen, seen_key, data in self._results:
            if seen is operation and seen_key == key:
                return data
        return None

    def put(
        self,
        operation: OperationDefinitionNode,
        fragments: Any,
        variables: dict[str, Any],
        data: dict[str, Any],
    ) -> SharedData:
        """Keep `data` as this selection's result (unless SHARED_SELECTIONS are kept
        already); the shared object."""
        shared = SharedData(data)
        if len(self._results) < SHARED_SELECTIONS:
            key = selection_key(operation, fragments, variables)
            self._results.append((operation, key, shared))
        return shared


SharedSend = Callable[[SharedData], Awaitable[None]]

# How the operation running in this task sends an event's shared data as its next message,
# when its transport can (server.graphql_http); None: every event takes the full path.
shared_send: ContextVar[SharedSend | None] = ContextVar("corral_shared_send", default=None)


async def sent_directly(
    events: AsyncIterable[Any],
    operation: OperationDefinitionNode,
    fragments: Any,
    variables: dict[str, Any],
    send: SharedSend,
) -> AsyncIterator[Any]:
    """The events of a subscription, less those whose data for its selection is shared
    already and within the response limit: those are handed to `send` here, in order.

    Such an event's full path ends in the same message: its execution returns the shared
    data as it is (CorralExecutionContext.execute_operation), without errors, and our
    extensions add no `extensions` to a result; the response limit is the one check
    left, and it passed for this very data. An event that was not checked yet, or
    failed it, goes the full path (and meets the same limit there)."""
    iterator = aiter(events)
    try:
        async for event in iterator:
            shared = getattr(event, "shared_results", None)
            if isinstance(shared, SharedResults):
                data = shared.get(operation, fragments, variables)
                if data is not None and data.fits_response:
                    await send(data)
                    continue
            yield event
    finally:
        aclose = getattr(iterator, "aclose", None)
        if aclose is not None:  # the resolver's own cleanup (limits, metrics) runs now
            await aclose()


def joined_data(parts: list[Any], skipped: list[int]) -> dict[str, Any] | None:
    """The data of an event made of the events whose data are `parts`, in order, each past
    its first `skipped` items: of its one root field, each list (the items the events
    carry) joined, every other value as all the parts have it. None when the parts are not
    of that shape (the event is executed)."""
    if not parts or not all(isinstance(part, dict) and len(part) == 1 for part in parts):
        return None
    root = next(iter(parts[0]))
    fields = [part.get(root) for part in parts]
    first = fields[0]
    if not all(isinstance(field, dict) and field.keys() == first.keys() for field in fields):
        return None
    joined: dict[str, Any] = {}
    for key, value in first.items():
        if isinstance(value, list):
            joined[key] = [
                item
                for field, skip in zip(fields, skipped, strict=True)
                for item in field[key][skip:]
            ]
        elif all(field[key] == value for field in fields):
            joined[key] = value
        else:
            return None
    return {root: joined}


def selection_key(
    operation: OperationDefinitionNode, fragments: Any, variables: dict[str, Any]
) -> tuple[Any, ...]:
    """The values of the variables an event's result may depend on, as a comparable key."""
    names = _relevant_variables(operation, fragments)
    return tuple(json.dumps(variables.get(name), sort_keys=True, default=str) for name in names)


# operation id -> (operation, relevant names); the operation is kept so its id
# is not reused while the entry lives.
_relevant: dict[int, tuple[OperationDefinitionNode, tuple[str, ...]]] = {}


def _relevant_variables(operation: OperationDefinitionNode, fragments: Any) -> tuple[str, ...]:
    cached = _relevant.get(id(operation))
    # The fragments come from the operation's own document: the same operation, the same.
    if cached is not None and cached[0] is operation:
        return cached[1]
    everywhere = _variables_in([operation, *(fragments or {}).values()])
    in_root_arguments = _variables_in(
        [
            argument
            for selection in operation.selection_set.selections
            if isinstance(selection, FieldNode)
            for argument in selection.arguments or ()
        ]
    )
    # A name counts when it is used somewhere besides the root field's arguments.
    names = tuple(
        sorted(name for name, count in everywhere.items() if count > in_root_arguments.get(name, 0))
    )
    if len(_relevant) >= _RELEVANT_CACHE_SIZE:
        _relevant.clear()
    _relevant[id(operation)] = (operation, names)
    return names


def _variables_in(nodes: list[Any]) -> dict[str, int]:
    """How often each variable is referenced in `nodes` (definitions not counted)."""
    counts: dict[str, int] = {}

    class Counter(Visitor):
        def enter_variable_definition(self, *_args: Any) -> Any:
            return SKIP

        def enter_variable(self, node: VariableNode, *_args: Any) -> None:
            counts[node.name.value] = counts.get(node.name.value, 0) + 1

    for node in nodes:
        visit(node, Counter())
    return counts
