"""Per-operation limits that validation rules cannot state: query size, cost, response size.

One `QueryLimits` extension per operation, over HTTP and WebSocket alike:
- a query text over `graphql_max_query_bytes` is refused before it is parsed, and one of
  more than `graphql_max_tokens` tokens while it is parsed (the parser stops there);
- an operation whose estimated cost (graphql_schema/cost.py, variables resolved) is over
  `graphql_max_cost` is refused before it runs; and since a list without `first` may be
  longer than the estimate assumed, the items such lists return are counted as they come
  (`CountedList` on those fields): past the same budget the operation ends in that error;
- a result whose JSON is over `graphql_max_response_bytes` is replaced by an error (for a
  subscription, each event on its own).
Each refusal is one GraphQL error that says the number and the limit, with an
`extensions.code` a client can test.
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Iterator, Sized
from contextvars import ContextVar
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from graphql import DocumentNode, GraphQLError, parse
from graphql import ExecutionResult as GraphQLExecutionResult
from strawberry.extensions import FieldExtension, SchemaExtension
from strawberry.types import ExecutionResult
from strawberry.types.graphql import OperationType

from graphql_schema.cost import CostModel
from graphql_schema.shared_events import SharedData

NAME = re.compile(r"[_A-Za-z][_0-9A-Za-z]*")
# How graphql-core's parser words the stop at `max_tokens` (a GraphQLSyntaxError).
_TOKEN_LIMIT = re.compile(r"Document contains more than \d+ tokens")
PARSE_CACHE_SIZE = 256


@dataclass(frozen=True)
class Limits:
    """What one schema allows; built once per schema and shared by its requests."""

    max_query_bytes: int
    max_tokens: int
    max_cost: int
    max_response_bytes: int
    cost_model: CostModel


# Shared by every request (as Strawberry's ParserCache, which this extension replaces: the
# size check must come before any parse).
_parse: Callable[..., DocumentNode] = lru_cache(maxsize=PARSE_CACHE_SIZE)(parse)


def query_size_error(query: str, limit: int) -> GraphQLError | None:
    """The error for a query text over `limit` bytes (UTF-8), without encoding a huge one."""
    # A character is 1 to 4 bytes: most texts are decided by their length alone.
    if len(query) <= limit // 4:
        return None
    size = len(query) if len(query) > limit else len(query.encode())
    if size <= limit:
        return None
    return GraphQLError(
        f"the query is {size} bytes, more than the limit of {limit}; "
        "pass values as variables or split the operation",
        extensions={"code": "QUERY_TOO_LARGE", "size": size, "limit": limit},
    )


def token_count_error(limit: int) -> GraphQLError:
    """The error for a query text of more than `limit` tokens."""
    return GraphQLError(
        f"the query has more than {limit} tokens (names, punctuation, values, comments); "
        "pass values as variables or split the operation",
        extensions={"code": "QUERY_TOO_LARGE", "limit": limit},
    )


def cost_error(cost: int, budget: int) -> GraphQLError:
    """The error for an operation over budget: its cost, the budget and how to lower it."""
    return GraphQLError(
        f"the query costs {cost}, more than the budget of {budget}; ask for fewer items "
        "(a smaller `first`) or nest fewer lists",
        extensions={"code": "QUERY_TOO_COSTLY", "cost": cost, "budget": budget},
    )


def count_error(count: int, budget: int) -> GraphQLError:
    """The error for an operation whose lists without `first` returned more than the budget."""
    return GraphQLError(
        f"the query reached {count} objects while it ran, more than the budget of {budget} "
        "(its lists without `first` are longer than its cost assumed); ask for fewer items "
        "or nest fewer lists",
        extensions={"code": "QUERY_TOO_COSTLY", "cost": count, "budget": budget},
    )


@dataclass
class ObjectMeter:
    """Items returned so far by one operation's lists without `first`."""

    budget: int
    count: int = 0
    tripped: bool = False

    def charge(self, items: int) -> None:
        """Count `items`; the call that goes past the budget raises."""
        self.count += items
        if self.count > self.budget:
            self.tripped = True
            raise count_error(self.count, self.budget)


# The meter of the operation being executed: set by QueryLimits, read by CountedList (a
# context variable, since a WebSocket connection runs several operations on one context).
_meter: ContextVar[ObjectMeter | None] = ContextVar("corral_graphql_meter", default=None)


class CountedList(FieldExtension):
    """Charges the length of a list field without `first` to the operation's meter."""

    def resolve(self, next_: Callable[..., Any], source: Any, info: Any, **kwargs: Any) -> Any:
        return charge(next_(source, info, **kwargs))

    async def resolve_async(
        self, next_: Callable[..., Awaitable[Any]], source: Any, info: Any, **kwargs: Any
    ) -> Any:
        return charge(await next_(source, info, **kwargs))


def charge(result: Any) -> Any:
    """`result`, its length (when it has one) charged to the operation's meter."""
    meter = _meter.get()
    if meter is None or not isinstance(result, Sized):
        return result
    if meter.tripped:
        # The operation is over (its result becomes the one error): an empty list ends
        # the walk below this field at once, and adds no error of its own.
        return []
    meter.charge(len(result))
    return result


def response_size_error(size: int, limit: int) -> GraphQLError:
    """The error that replaces a result over the response limit."""
    return GraphQLError(
        f"the response is {size} bytes, more than the limit of {limit}; "
        "ask for fewer items (a smaller `first`) or fewer fields",
        extensions={"code": "RESPONSE_TOO_LARGE", "size": size, "limit": limit},
    )


def response_size(data: Any) -> int:
    """Bytes of the result's data as JSON (ASCII-escaped, as the HTTP view sends it); of
    `SharedData`, its JSON as encoded once for the response (or for all subscribers)."""
    if isinstance(data, SharedData):
        try:
            return len(data.json())
        except (TypeError, ValueError):  # not JSON as it is: the view's encoding fails too
            pass
    return len(json.dumps(data, default=str))


def _placeholder(operation_name: str | None) -> DocumentNode:
    """A tiny document that stands in for a refused one until the error is raised (so the
    refusal takes the path every pre-execution error takes, over HTTP and WebSocket)."""
    name = operation_name if operation_name and NAME.fullmatch(operation_name) else ""
    return parse(f"query {name} {{ __typename }}")


class QueryLimits(SchemaExtension):
    """Enforces `Limits` on one operation (a new instance per operation)."""

    def __init__(self, limits: Limits) -> None:
        super().__init__()
        self.limits = limits
        self.refusal: GraphQLError | None = None
        self.meter: ObjectMeter | None = None

    def on_parse(self) -> Iterator[None]:
        context = self.execution_context
        query = context.query or ""
        # Set in the options, so that Strawberry's own parse (after a syntax error) stops too.
        context.parse_options["max_tokens"] = self.limits.max_tokens
        self.refusal = query_size_error(query, self.limits.max_query_bytes)
        if self.refusal is None:
            try:
                context.graphql_document = _parse(query, **context.parse_options)
            except GraphQLError as error:
                if _TOKEN_LIMIT.search(error.message):
                    self.refusal = token_count_error(self.limits.max_tokens)
                # Otherwise Strawberry parses it again and reports the syntax error its own
                # way (raised from here, it would escape a WebSocket operation as a crash).
                context.graphql_document = None
        if self.refusal is not None:
            context.graphql_document = _placeholder(context.operation_name)
        yield

    def on_execute(self) -> Iterator[None]:
        context = self.execution_context
        if self.refusal is not None:
            raise self.refusal
        assert context.graphql_document is not None
        cost = self.limits.cost_model.operation_cost(
            context.schema._schema,
            context.graphql_document,
            context.operation_name,
            context.variables,
        )
        if cost > self.limits.max_cost:
            raise cost_error(cost, self.limits.max_cost)
        self.meter = ObjectMeter(self.limits.max_cost)
        _meter.set(self.meter)
        yield
        result = context.result
        if isinstance(result, GraphQLExecutionResult):
            self._settle(result)
        if context.operation_type != OperationType.SUBSCRIPTION:
            _meter.set(None)  # a subscription's events run after this hook: it stays set

    def on_stream_result(self, result: Any) -> Iterator[None]:
        # Queries over a WebSocket were capped in on_execute; a subscription's events here.
        context = self.execution_context
        if (
            isinstance(result, ExecutionResult)
            and context.graphql_document is not None  # None: a syntax error, nothing ran
            and context.operation_type == OperationType.SUBSCRIPTION
        ):
            self._settle(result)
            self.meter = ObjectMeter(self.limits.max_cost)  # each event has the whole budget
            _meter.set(self.meter)
        yield

    def _settle(self, result: GraphQLExecutionResult | ExecutionResult) -> None:
        """Replace a result over the object budget or the response limit by the one error
        that says so (a tripped meter left a partial result: the first list past the budget
        is an error, the ones after it empty)."""
        if self.meter is not None and self.meter.tripped:
            result.data = None
            result.errors = [count_error(self.meter.count, self.meter.budget)]
            return
        if result.data is None:
            return
        if type(result.data) is dict:
            # Encoded once: the view writes this JSON as it is (graphql_http.encode_json).
            result.data = SharedData(result.data)
        size = response_size(result.data)
        if isinstance(result.data, SharedData):
            # Other subscribers of this data are sent it without this check (shared_events).
            result.data.fits_response = size <= self.limits.max_response_bytes
        if size > self.limits.max_response_bytes:
            result.data = None
            result.errors = [response_size_error(size, self.limits.max_response_bytes)]
