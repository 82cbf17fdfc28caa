"""GraphQL over HTTP and WebSocket, strict about its input: every malformed request is a 4xx
(or a 4400 close) with one readable line, never a 500.

Strawberry's views assume a well-formed envelope in places: a JSON body that is a string or
a number, a WebSocket message that is not an object, or a `subscribe` without a payload
raised AttributeError / TypeError (a 500, or a WebSocket torn down with a logged traceback).
"""

from __future__ import annotations

import json
import re
from collections.abc import Awaitable, Callable, Iterable
from typing import Any

from cross_web import AsyncHTTPRequestAdapter, HTTPException
from starlette.datastructures import Headers
from strawberry.asgi import GraphQL
from strawberry.exceptions import MissingQueryError
from strawberry.schema.exceptions import CannotGetOperationTypeError, InvalidOperationTypeError
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL
from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import (
    BaseGraphQLTransportWSHandler,
)
from strawberry.subscriptions.protocols.graphql_transport_ws.types import (
    ConnectionInitMessage,
    Message,
    SubscribeMessage,
)
from strawberry.types import ExecutionResult
from strawberry.types.graphql import OperationType

from graphql_schema.context import Context
from server.access import Authenticator, bearer_token
from server.auth import Principal

# Deepest JSON a request may carry (variables included). GraphQL inputs nest a few levels;
# a deeper value only serves to exhaust the stack of whatever walks it later.
JSON_MAX_DEPTH = 64
# graphql-transport-ws operation ids are client-chosen keys we keep for the connection.
WS_ID_MAX = 256
_JSON_KINDS = {str: "a string", int: "a number", float: "a number", bool: "a boolean"}
# graphql-transport-ws's close for no or bad credentials.
WS_UNAUTHORIZED = 4401


_SURROGATE = re.compile("[\ud800-\udfff]")


def json_problem(value: Any, max_depth: int) -> str | None:
    """What makes parsed JSON unfit as input, or None: nesting deeper than `max_depth`, or
    a lone surrogate (`"\\ud800"` is valid JSON but not text: every encoder, the
    databases' included, refuses it). Walked without recursion."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, str):
            if not item.isascii() and _SURROGATE.search(item):
                return "a string holds a lone surrogate (an escape like \\ud800), not text"
            continue
        children: Iterable[Any]
        if isinstance(item, dict):
            children = [*item.keys(), *item.values()]
        elif isinstance(item, list):
            children = item
        else:
            continue
        if depth > max_depth:
            return f"nested deeper than {max_depth} levels"
        stack.extend((child, depth + 1) for child in children)
    return None


def decode_request_json(data: str | bytes) -> object:
    """JSON of a request body, a query parameter or a WebSocket message. Anything unfit
    (not JSON, bad UTF-8, too deep, not text) is a JSONDecodeError, which Strawberry
    answers with 400 (HTTP) or close 4400 (WebSocket)."""
    try:
        value = json.loads(data)
    except json.JSONDecodeError:
        raise
    except (ValueError, RecursionError) as exc:  # bad UTF-8, a huge integer, too deep
        reason = "too deeply nested" if isinstance(exc, RecursionError) else str(exc)
        raise json.JSONDecodeError(reason.split("\n")[0][:120], "", 0) from exc
    problem = json_problem(value, JSON_MAX_DEPTH)
    if problem is not None:
        raise json.JSONDecodeError(problem, "", 0)
    return value


def _invalid_ws_message(message: object) -> str | None:
    """Why a graphql-transport-ws message is malformed, or None when its shape is right."""
    if not isinstance(message, dict) or not isinstance(message.get("type"), str):
        return "a message must be a JSON object with a string `type`"
    if message["type"] not in ("subscribe", "complete"):
        return None
    op_id = message.get("id")
    if not isinstance(op_id, str) or not 0 < len(op_id) <= WS_ID_MAX:
        return f"`id` must be a string of 1 to {WS_ID_MAX} characters"
    if message["type"] == "complete":
        return None
    payload = message.get("payload")
    if not isinstance(payload, dict) or not isinstance(payload.get("query"), str):
        return "`payload` must be an object with a string `query`"
    for key, kind in (("variables", dict), ("extensions", dict), ("operationName", str)):
        if payload.get(key) is not None and not isinstance(payload[key], kind):
            return f"`payload.{key}` must be {'an object' if kind is dict else 'a string'}"
    return None


def connection_init_token(payload: dict[str, Any]) -> str | None:
    """The API token of a connection_init payload's `authorization` ("Bearer crl_..."),
    '' when it is malformed, None when there is none."""
    value = payload.get("authorization", payload.get("Authorization"))
    if value is None:
        return None
    if not isinstance(value, str):
        return ""
    return bearer_token(Headers({"authorization": value}))


Recheck = Callable[[], Awaitable[Principal | None]]


class StrictTransportWSHandler(BaseGraphQLTransportWSHandler[Context, None]):
    """graphql-transport-ws, with every message's shape checked before Strawberry reads it:
    a malformed one closes the socket with 4400 and the reason (the protocol's answer).

    Authenticated at `connection_init`: by the payload's `authorization` ("Bearer crl_..."),
    else by what the handshake carried (the session cookie, or an Authorization header);
    none or a bad one closes 4401 "Unauthorized". The credential is checked again at every
    `subscribe` (a token revoked since closes the connection 4401 then); its principal is
    the context's for the connection's operations, whose role RoleGuard and the secret
    fields judge as over HTTP. (A handshake from another site's page, which would carry the
    user's cookie, is refused by Strawberry's origin check before any of this; a
    `ConnectionRejectionError` from the view's `on_ws_connect` closes 4403.)
    """

    _recheck: Recheck | None = None

    async def handle_message(self, message: Message) -> None:
        problem = _invalid_ws_message(message)
        if problem is not None:
            await self.handle_invalid_message(problem)
            return
        await super().handle_message(message)

    async def handle_connection_init(self, message: ConnectionInitMessage) -> None:
        payload = message.get("payload", {})
        first = not (self.connection_init_received or self.connection_timed_out)
        # Not a first init with an object payload: Strawberry closes it (4400 / 4429).
        if first and isinstance(payload, dict) and not await self._authenticate(payload):
            self.connection_init_received = True
            if self.connection_init_timeout_task:
                self.connection_init_timeout_task.cancel()
            await self.websocket.close(code=WS_UNAUTHORIZED, reason="Unauthorized")
            return
        await super().handle_connection_init(message)

    async def handle_subscribe(self, message: SubscribeMessage) -> None:
        if self.connection_acknowledged and self._recheck is not None:
            principal = await self._recheck()
            if principal is None:
                await self.websocket.close(code=WS_UNAUTHORIZED, reason="Unauthorized")
                return
            self.context.principal = principal
        await super().handle_subscribe(message)

    async def _authenticate(self, payload: dict[str, Any]) -> bool:
        """Set the context's principal from the credentials; whether there was one."""
        request = self.context.request
        authenticator: Authenticator | None = getattr(request.app.state, "authenticator", None)
        if authenticator is None:
            return False
        token = connection_init_token(payload)
        if token is not None:
            self._recheck = self._token_check(authenticator, token)
        else:
            self._recheck = self._handshake_check(authenticator, Headers(scope=request.scope))
        principal = await self._recheck()
        self.context.principal = principal
        return principal is not None

    @staticmethod
    def _token_check(authenticator: Authenticator, token: str) -> Recheck:
        async def check() -> Principal | None:
            return await authenticator.from_token(token) if token else None

        return check

    @staticmethod
    def _handshake_check(authenticator: Authenticator, headers: Headers) -> Recheck:
        async def check() -> Principal | None:
            principal, _refused = await authenticator.from_headers(headers)
            return principal

        return check


class StrictGraphQL(GraphQL[Context, None]):
    """Strawberry's ASGI app with strict input. Subscriptions are served over the
    WebSocket only (graphql-transport-ws, the protocol the API names)."""

    graphql_transport_ws_handler_class = StrictTransportWSHandler

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("subscription_protocols", (GRAPHQL_TRANSPORT_WS_PROTOCOL,))
        super().__init__(*args, **kwargs)

    def decode_json(self, data: str | bytes) -> object:
        return decode_request_json(data)

    def parse_json(self, data: str | bytes) -> Any:
        """An HTTP body or a `variables`/`extensions` parameter: a JSON object (or a list,
        which Strawberry refuses as a batch), never a bare string, number or null."""
        try:
            value = decode_request_json(data)
        except json.JSONDecodeError as exc:  # its msg says what, never quotes the input
            raise HTTPException(400, f"Unable to parse request body as JSON: {exc.msg}") from exc
        if not isinstance(value, dict | list):
            kind = "null" if value is None else _JSON_KINDS.get(type(value), "a value")
            raise HTTPException(400, f"expected a JSON object, not {kind}")
        return value

    def parse_query_params(self, params: Any) -> dict[str, Any]:
        # `variables=null` in a GET is allowed (GraphQL over HTTP): the same as none.
        given = {
            key: value
            for key, value in dict(params).items()
            if not (key in ("variables", "extensions") and value.strip() == "null")
        }
        return super().parse_query_params(given)

    async def execute_single(
        self,
        request: Any,
        request_adapter: AsyncHTTPRequestAdapter,
        sub_response: Any,
        context: Context,
        root_value: None,
        request_data: Any,
    ) -> ExecutionResult:
        """As Strawberry's, but a subscription over plain HTTP is a 400: executed as a query
        it failed inside (a masked error), since its resolver yields instead of returning."""
        allowed = {OperationType.QUERY}
        if request_adapter.method == "POST":
            allowed.add(OperationType.MUTATION)
        try:
            return await self.schema.execute(
                request_data.query,
                root_value=root_value,
                variable_values=request_data.variables,
                context_value=context,
                operation_name=request_data.operation_name,
                allowed_operation_types=allowed,
                operation_extensions=request_data.extensions,
            )
        except CannotGetOperationTypeError as exc:
            raise HTTPException(400, exc.as_http_error_reason()) from exc
        except InvalidOperationTypeError as exc:
            reason = exc.as_http_error_reason(request_adapter.method)
            if exc.operation_type is OperationType.SUBSCRIPTION:
                reason += " (subscribe over the WebSocket at /graphql, graphql-transport-ws)"
            raise HTTPException(400, reason) from exc
        except MissingQueryError as exc:
            raise HTTPException(400, "No GraphQL query found in the request") from exc
