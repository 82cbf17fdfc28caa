"""Per-operation limits that validation rules cannot state: query size, cost, response size.

One `QueryLimits` extension per operation, over HTTP and WebSocket alike:
- a query text over `graphql_max_query_bytes` is refused before it is parsed;
- an operation whose estimated cost (graphql_schema/cost.py, variables resolved) is over
  `graphql_max_cost` is refused before it runs;
- a result whose JSON is over `graphql_max_response_bytes` is replaced by an error (for a
  subscription, each event on its own).
Each refusal is one GraphQL error that says the number and the limit, with an
`extensions.code` a client can test.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from graphql import DocumentNode, GraphQLError, parse
from graphql import ExecutionResult as GraphQLExecutionResult
from strawberry.extensions import SchemaExtension
from strawberry.types import ExecutionResult
from strawberry.types.graphql import OperationType

from graphql_schema.cost import CostModel

NAME = re.compile(r"[_A-Za-z][_0-9A-Za-z]*")
PARSE_CACHE_SIZE = 256


@dataclass(frozen=True)
class Limits:
    """What one schema allows; built once per schema and shared by its requests."""

    max_query_bytes: int
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


def cost_error(cost: int, budget: int) -> GraphQLError:
    """The error for an operation over budget: its cost, the budget and how to lower it."""
    return GraphQLError(
        f"the query costs {cost}, more than the budget of {budget}; ask for fewer items "
        "(a smaller `first`) or nest fewer lists",
        extensions={"code": "QUERY_TOO_COSTLY", "cost": cost, "budget": budget},
    )


def response_size_error(size: int, limit: int) -> GraphQLError:
    return GraphQLError(
        f"the response is {size} bytes or more, more than the limit of {limit}; "
        "ask for fewer items (a smaller `first`) or fewer fields",
        extensions={"code": "RESPONSE_TOO_LARGE", "size": size, "limit": limit},
    )


def response_size(data: Any) -> int:
    """Bytes of the result's data as JSON (ASCII-escaped, as the HTTP view sends it)."""
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

    def on_parse(self) -> Iterator[None]:
        context = self.execution_context
        query = context.query or ""
        self.refusal = query_size_error(query, self.limits.max_query_bytes)
        if self.refusal is not None:
            context.graphql_document = _placeholder(context.operation_name)
        else:
            try:
                context.graphql_document = _parse(query, **context.parse_options)
            except GraphQLError:
                # Strawberry parses it again and reports the syntax error its own way
                # (raised from here, it would escape a WebSocket operation as a crash).
                context.graphql_document = None
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
        yield
        result = context.result
        if isinstance(result, GraphQLExecutionResult):
            self._cap(result)

    def on_stream_result(self, result: Any) -> Iterator[None]:
        # Queries over a WebSocket were capped in on_execute; a subscription's events here.
        context = self.execution_context
        if (
            isinstance(result, ExecutionResult)
            and result.data is not None  # an error, perhaps before any document was parsed
            and context.graphql_document is not None
            and context.operation_type == OperationType.SUBSCRIPTION
        ):
            self._cap(result)
        yield

    def _cap(self, result: GraphQLExecutionResult | ExecutionResult) -> None:
        """Replace a result over the response limit by the error that says so."""
        if result.data is None:
            return
        size = response_size(result.data)
        if size > self.limits.max_response_bytes:
            result.data = None
            result.errors = [response_size_error(size, self.limits.max_response_bytes)]
