"""GraphQL errors that never quote what the client sent, and a log that never holds it.

graphql-core words its coercion and validation errors with the offending value
(`... found: {'name': 1, 'token': 'ghp_...'}`), its syntax errors with the token it
stumbled on, and Strawberry logs each error at ERROR with the query's source lines.
Here every client mistake (syntax, validation, coercion) is rewritten to say where and
why without the value, logged at INFO without values or query text; an unexpected
exception is masked for the client (MaskErrors) and logged with its type, path and
traceback, the request's values blotted out. A database that is away is no bug: its error
says so (code UNAVAILABLE), logged at INFO in one line.
"""

from __future__ import annotations

import logging
import re
import traceback
from collections.abc import Iterator
from typing import Any

import strawberry
from graphql import GraphQLError, GraphQLSyntaxError, StringValueNode
from graphql.language import Visitor, visit
from strawberry.types import ExecutionContext

from runner.store_errors import database_unreachable
from server.access import UNAVAILABLE
from server.streams import StreamUnavailable

log = logging.getLogger("corral.graphql")

MASK = "[value]"
# Values shorter than this are not blotted from messages (they would garble words); the
# rewrite rules below, not this net, are what keeps values out.
MIN_MASKED_LENGTH = 6

# `, found: ...`, `; found: ...`, `. Did you mean 'x'? Found: ...`: the value follows, to the
# end (a `found` inside a sentence, as in `not found in`, is not such a tail).
_FOUND_TAIL = re.compile(r"(?:[,;]\s*found|(?<=[.?!])\s+Found):?\s.*\Z", re.S)
# An exception's text inside a coercion message, which may quote the value again.
_ENCOUNTERED = re.compile(r",? but encountered error .*\Z", re.S)
# `String cannot represent a non string value: 1`, `Value cannot represent a DateTime: "x"`.
_CANNOT_REPRESENT = re.compile(r"( cannot represent[^:]*): .*\Z", re.S)
# `Value 'PURPLE' does not exist in 'RGB' enum.` (greedy: the value may hold quotes).
_ENUM_VALUE = re.compile(r"\bValue '.*' does not exist in '", re.S)
# An input's unknown key is named back only when it looks like a field name (a client that
# put a token where a key goes must not see it logged).
_UNKNOWN_FIELD = re.compile(r"unknown field '(.+?)'(?=\.(?: Did you mean|\Z)|\Z)", re.S)
_FIELD_NAME = re.compile(r"[_A-Za-z][_0-9A-Za-z]{0,31}")
# A syntax error's last word is the token it met: `found String 'ghp_...'.`
_SYNTAX_TOKEN = re.compile(
    r"\b(found|Unexpected) (Name|String|BlockString|Int|Float|Comment) '.*'\.?\Z", re.S
)


def is_unexpected(error: GraphQLError) -> bool:
    """An error we did not raise on purpose: masked for the client, logged as ERROR."""
    original = error.original_error
    return (
        original is not None
        and not isinstance(original, GraphQLError)
        and unavailable_message(original) is None
    )


def unavailable_message(original: BaseException) -> str | None:
    """What to tell the client when `original` says the database is away (else None): a
    stream's own message says where to resume."""
    if isinstance(original, StreamUnavailable):
        return str(original)
    return UNAVAILABLE if database_unreachable(original) else None


def without_values(error: GraphQLError) -> str:
    """The error's message with any value the client sent cut out (where and why stay)."""
    message = error.message
    if isinstance(error, GraphQLSyntaxError):
        return _SYNTAX_TOKEN.sub(r"\1 \2.", message)
    message = _ENUM_VALUE.sub("Value does not exist in '", message)
    message = _ENCOUNTERED.sub("", message)
    message = _CANNOT_REPRESENT.sub(r"\1", message)
    message = _FOUND_TAIL.sub("", message).rstrip()
    message = _UNKNOWN_FIELD.sub(_named_if_a_name, message)
    if message and message[-1] not in ".?!":
        message += "."
    return message


def _named_if_a_name(match: re.Match[str]) -> str:
    name = match.group(1)
    return match.group(0) if _FIELD_NAME.fullmatch(name) else "an unknown field"


def _strings(value: Any) -> Iterator[str]:
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for item in value.values():
            yield from _strings(item)
    elif isinstance(value, list | tuple):
        for item in value:
            yield from _strings(item)


class _StringLiterals(Visitor):
    def __init__(self) -> None:
        super().__init__()
        self.found: list[str] = []

    def enter_string_value(self, node: StringValueNode, *_args: Any) -> None:
        self.found.append(node.value)


def request_values(context: ExecutionContext | None) -> list[str]:
    """Every string the request carried (variables and literals), longest first."""
    if context is None:
        return []
    values = set(_strings(context.variables or {}))
    if context.graphql_document is not None:
        literals = _StringLiterals()
        visit(context.graphql_document, literals)
        values.update(literals.found)
    return sorted((v for v in values if len(v) >= MIN_MASKED_LENGTH), key=len, reverse=True)


def blot(text: str, values: list[str]) -> str:
    """`text` with each of `values` replaced by a mark."""
    for value in values:
        if value in text:
            text = text.replace(value, MASK)
    return text


def _path(error: GraphQLError) -> str:
    return ".".join(map(str, error.path or [])) or "the request"


def _log_unexpected(error: GraphQLError, values: list[str]) -> None:
    original = error.original_error
    assert original is not None
    # Formatted here, not with exc_info: an exception's text (and its causes') may quote
    # an input value, and the logging module would print it as it is.
    lines = traceback.TracebackException.from_exception(original).format()
    log.error(
        "unexpected %s in %s\n%s",
        type(original).__name__,
        _path(error),
        blot("".join(lines), values).rstrip(),
    )


def _said_unavailable(error: GraphQLError) -> bool:
    """Worded as UNAVAILABLE if the database was away: an outage of a few seconds used to
    log a traceback per request ("Unexpected error." to the client)."""
    assert error.original_error is not None
    message = unavailable_message(error.original_error)
    if message is None:
        return False
    error.message = message
    error.extensions = {**(error.extensions or {}), "code": "UNAVAILABLE"}
    # Its type only: a driver's message may quote the statement's parameters.
    log.info(
        "GraphQL %s failed: the database is unreachable (%s)",
        _path(error),
        type(error.original_error).__name__,
    )
    return True


class CorralSchema(strawberry.Schema):
    """Strawberry's schema, with errors worded and logged without the client's values."""

    def process_errors(
        self, errors: list[GraphQLError], execution_context: ExecutionContext | None = None
    ) -> None:
        # Strawberry calls this before extensions (MaskErrors) see the errors, with the
        # same objects it returns: a message changed here is the one the client gets.
        values = request_values(execution_context)
        for error in errors:
            if error.original_error is not None and _said_unavailable(error):
                continue
            if is_unexpected(error):
                _log_unexpected(error, values)
                continue
            error.message = blot(without_values(error), values)
            log.info("GraphQL error in %s: %s", _path(error), error.message)
