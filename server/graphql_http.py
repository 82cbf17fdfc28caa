"""GraphQL over HTTP and WebSocket, strict about its input: every malformed request is a 4xx
(or a 4400 close) with one readable line, never a 500.

Over HTTP it follows the GraphQL-over-HTTP spec where Strawberry does not (0.341 answers
application/json only): the response type is negotiated from `Accept`
(`application/graphql-response+json`, whose request errors are 400s, or `application/json`,
always 200; neither acceptable: 406), and a mutation over GET is a 405 with `Allow: POST`.
The GraphiQL page loads pinned copies of its scripts from /static/graphiql/ (or, by a
setting, the same files from unpkg.com with SRI), and no inline script.

Strawberry's views assume a well-formed envelope in places: a JSON body that is a string or
a number, a WebSocket message that is not an object, or a `subscribe` without a payload
raised AttributeError / TypeError (a 500, or a WebSocket torn down with a logged traceback).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import html
import json
import logging
import re
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass
from typing import Any

from cross_web import AsyncHTTPRequestAdapter, HTTPException
from starlette.datastructures import Headers
from starlette.requests import Request
from starlette.responses import HTMLResponse, PlainTextResponse, Response
from starlette.websockets import WebSocket
from strawberry.asgi import GraphQL
from strawberry.exceptions import MissingQueryError
from strawberry.http import GraphQLHTTPResponse
from strawberry.http.exceptions import WebSocketDisconnected
from strawberry.http.websocket_origin import is_same_origin
from strawberry.schema.exceptions import CannotGetOperationTypeError, InvalidOperationTypeError
from strawberry.subscriptions import GRAPHQL_TRANSPORT_WS_PROTOCOL
from strawberry.subscriptions.protocols.graphql_transport_ws.handlers import (
    BaseGraphQLTransportWSHandler,
    Operation,
)
from strawberry.subscriptions.protocols.graphql_transport_ws.types import (
    ConnectionInitMessage,
    Message,
    SubscribeMessage,
)
from strawberry.types import ExecutionResult
from strawberry.types.graphql import OperationType
from strawberry.types.unset import UNSET

from graphql_schema.context import Context
from graphql_schema.shared_events import SharedData, shared_send
from runner.store_errors import database_unreachable
from server import access
from server.access import UNAVAILABLE, Authenticator, bearer_token, principal_of
from server.auth import Principal

log = logging.getLogger("corral.graphql")

# Deepest JSON a request may carry (variables included). GraphQL inputs nest a few levels;
# a deeper value only serves to exhaust the stack of whatever walks it later.
JSON_MAX_DEPTH = 64
# graphql-transport-ws operation ids are client-chosen keys we keep for the connection.
WS_ID_MAX = 256
_JSON_KINDS = {str: "a string", int: "a number", float: "a number", bool: "a boolean"}
# graphql-transport-ws's close for no or bad credentials.
WS_UNAUTHORIZED = 4401
WS_TRY_AGAIN_LATER = 1013  # RFC 6455: the database is away, the credential cannot be checked
# An open WebSocket's credential is checked again every access.CREDENTIAL_RECHECK_SECONDS:
# a token revoked or expired, a session logged out or ended, a user deleted, closes it
# (4401) within that time, even if it only listens to a subscription.


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


GRAPHQL_RESPONSE_JSON = "application/graphql-response+json"
JSON_MEDIA_TYPE = "application/json"
_MEDIA_TYPE_KEY = "corral.graphql_media_type"
_REQUEST_ERROR_KEY = "corral.graphql_request_error"


def _media_ranges(accept: str) -> list[tuple[str, float]]:
    """`(media range, q)` of each entry of an Accept header (lower case; a range with a
    malformed q is left out)."""
    ranges = []
    for entry in accept.split(","):
        name, *params = (part.strip() for part in entry.split(";"))
        quality = 1.0
        for param in params:
            key, _, value = param.partition("=")
            if key.strip().lower() == "q":
                try:
                    quality = min(max(float(value), 0.0), 1.0)
                except ValueError:
                    quality = -1.0
        if name and quality >= 0:
            ranges.append((name.lower(), quality))
    return ranges


def _quality(ranges: list[tuple[str, float]], media_type: str) -> float:
    """The q an Accept header gives `media_type`: that of its most specific matching range
    (RFC 9110 12.5.1), 0 when none matches."""
    family = media_type.split("/")[0] + "/*"
    for candidate in (media_type, family, "*/*"):
        found = [quality for name, quality in ranges if name == candidate]
        if found:
            return max(found)
    return 0.0


def negotiate_media_type(accept: str | None) -> str | None:
    """The response type for a GraphQL request's Accept header, or None (a 406).

    application/graphql-response+json when the client names it, at least as high as
    application/json; otherwise application/json when allowed (a missing Accept, `*/*`
    or `application/*` included: such clients, curl's default among them, got JSON with
    200 before, and keep it)."""
    if accept is None or not accept.strip():
        return JSON_MEDIA_TYPE
    ranges = _media_ranges(accept)
    named = max((q for name, q in ranges if name == GRAPHQL_RESPONSE_JSON), default=0.0)
    as_json = _quality(ranges, JSON_MEDIA_TYPE)
    if named > 0 and named >= as_json:
        return GRAPHQL_RESPONSE_JSON
    return JSON_MEDIA_TYPE if as_json > 0 else None


def is_request_error(result: ExecutionResult) -> bool:
    """A result without data whose errors belong to no field: the request failed before it
    ran (syntax, validation, variables, a limit)."""
    if result.data is not None or not result.errors:
        return False
    return not any(error.path for error in result.errors)


class MethodNotAllowed(HTTPException):
    """A 405, with the methods the operation may use."""

    def __init__(self, reason: str, allow: str) -> None:
        super().__init__(405, reason)
        self.allow = allow


@dataclass(frozen=True)
class PageAsset:
    """A file the GraphiQL page loads: its name in static/graphiql/, its pinned CDN URL and
    its SRI hash (the same file: Strawberry's graphiql.html names these URLs and hashes)."""

    name: str
    cdn_url: str
    integrity: str

    def tag(self, cdn: bool) -> str:
        url = self.cdn_url if cdn else f"{GRAPHIQL_STATIC_URL}/{self.name}"
        crossorigin = " crossorigin" if cdn else ""
        if self.name.endswith(".css"):
            return f'<link rel="stylesheet" href="{url}" integrity="{self.integrity}"{crossorigin}>'
        return f'<script src="{url}" integrity="{self.integrity}"{crossorigin}></script>'


GRAPHIQL_STATIC_URL = "/static/graphiql"
GRAPHIQL_CDN_ORIGIN = "https://unpkg.com"
GRAPHIQL_STYLES = (
    PageAsset(
        "graphiql.min.css",
        f"{GRAPHIQL_CDN_ORIGIN}/graphiql@3.8.3/graphiql.min.css",
        "sha384-Mq3vbRBY71jfjQAt/DcjxUIYY33ksal4cgdRt9U/hNPvHBCaT2JfJ/PTRiPKf0aM",
    ),
    PageAsset(
        "plugin-explorer.css",
        f"{GRAPHIQL_CDN_ORIGIN}/@graphiql/plugin-explorer@1.0.2/dist/style.css",
        "sha384-5DFJlDPW2tSATRbM8kzoP1j194jexLswuNmClWoRr2Q0x7R68JIQzPHZ02Faktwi",
    ),
)
GRAPHIQL_SCRIPTS = (
    PageAsset(
        "react.production.min.js",
        f"{GRAPHIQL_CDN_ORIGIN}/react@18.2.0/umd/react.production.min.js",
        "sha384-tMH8h3BGESGckSAVGZ82T9n90ztNXxvdwvdM6UoR56cYcf+0iGXBliJ29D+wZ/x8",
    ),
    PageAsset(
        "react-dom.production.min.js",
        f"{GRAPHIQL_CDN_ORIGIN}/react-dom@18.2.0/umd/react-dom.production.min.js",
        "sha384-bm7MnzvK++ykSwVJ2tynSE5TRdN+xL418osEVF2DE/L/gfWHj91J2Sphe582B1Bh",
    ),
    PageAsset(
        "graphiql.min.js",
        f"{GRAPHIQL_CDN_ORIGIN}/graphiql@3.8.3/graphiql.min.js",
        "sha384-HbRVEFG0JGJZeAHCJ9Xm2+tpknBQ7QZmNlO/DgZtkZ0aJSypT96YYGRNod99l9Ie",
    ),
    PageAsset(
        "plugin-explorer.umd.js",
        f"{GRAPHIQL_CDN_ORIGIN}/@graphiql/plugin-explorer@1.0.2/dist/index.umd.js",
        "sha384-2oonKe47vfHIZnmB6ZZ10vl7T0Y+qrHQF2cmNTaFDuPshpKqpUMGMc9jgj9MLDZ9",
    ),
)
# Corral's own: always from this server.
GRAPHIQL_PAGE_STYLE = f"{GRAPHIQL_STATIC_URL}/corral-graphiql.css"
GRAPHIQL_PAGE_SCRIPT = f"{GRAPHIQL_STATIC_URL}/corral-graphiql.js"


def graphiql_page(cdn: bool) -> str:
    """The GraphiQL page: the pinned assets (local or from the CDN), then Corral's script."""
    styles = "\n    ".join(asset.tag(cdn) for asset in GRAPHIQL_STYLES)
    scripts = "\n    ".join(asset.tag(cdn) for asset in GRAPHIQL_SCRIPTS)
    return f"""<!doctype html>
<html lang="en">
  <head>
    <meta charset="utf-8">
    <meta name="csrf-token" content="{{csrf_token}}">
    <title>Corral GraphiQL</title>
    <link rel="icon" href="data:,">
    {styles}
    <link rel="stylesheet" href="{GRAPHIQL_PAGE_STYLE}">
  </head>
  <body>
    <div id="graphiql" class="graphiql-container">Loading...</div>
    {scripts}
    <script src="{GRAPHIQL_PAGE_SCRIPT}"></script>
  </body>
</html>
"""


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


class _SharedSendFailed(BaseException):
    """A send of shared data failed (its error carried). It is raised inside Strawberry's
    result stream, which would take an Exception for the operation's own error (logged
    as unexpected, sent as a result); past it, the error is raised as itself."""

    def __init__(self, error: Exception) -> None:
        super().__init__(error)
        self.error = error


class StrictTransportWSHandler(BaseGraphQLTransportWSHandler[Context, None]):
    """graphql-transport-ws, with every message's shape checked before Strawberry reads it:
    a malformed one closes the socket with 4400 and the reason (the protocol's answer).

    Authenticated at `connection_init`: by the payload's `authorization` ("Bearer crl_..."),
    else by what the handshake carried (the session cookie, or an Authorization header);
    none or a bad one closes 4401 "Unauthorized". The credential is checked again at every
    `subscribe` (a token revoked since closes the connection 4401 then); its principal is
    the context's for the connection's operations, whose role RoleGuard and the secret
    fields judge as over HTTP. It is also checked every CREDENTIAL_RECHECK_SECONDS while
    the connection is open, so a long-lived subscription ends with its credential. (A
    handshake from another site's page, which would carry the user's cookie, is refused by
    Strawberry's origin check before any of this; a `ConnectionRejectionError` from the
    view's `on_ws_connect` closes 4403.)
    """

    _recheck: Recheck | None = None
    _watch: asyncio.Task[None] | None = None

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
        if first and isinstance(payload, dict):
            try:
                known = await self._authenticate(payload)
            except Exception as exc:
                if not database_unreachable(exc):
                    raise
                log.info(
                    "a WebSocket is refused: the database is unreachable (%s)", type(exc).__name__
                )
                await self._refuse(WS_TRY_AGAIN_LATER, UNAVAILABLE)
                return
            if not known:
                await self._refuse(WS_UNAUTHORIZED, "Unauthorized")
                return
        await super().handle_connection_init(message)
        if self.connection_acknowledged and self._recheck is not None and self._watch is None:
            self._watch = asyncio.create_task(self._watch_credential(self._recheck))

    async def _refuse(self, code: int, reason: str) -> None:
        self.connection_init_received = True
        if self.connection_init_timeout_task:
            self.connection_init_timeout_task.cancel()
        await self.websocket.close(code=code, reason=reason)

    async def _watch_credential(self, recheck: Recheck) -> None:
        """Close the connection (4401) once its credential no longer authenticates."""
        while True:
            await asyncio.sleep(access.CREDENTIAL_RECHECK_SECONDS)
            try:
                principal = await recheck()
            except Exception as exc:  # the database is away a moment: check again next time
                # Its type only: a driver's message may quote the statement's parameters.
                log.warning(
                    "could not check a WebSocket's credential again: %s", type(exc).__name__
                )
                continue
            if principal is None:
                await self.websocket.close(code=WS_UNAUTHORIZED, reason="Unauthorized")
                return
            self.context.principal = principal  # a changed role applies from now on

    async def handle_task_exception(self, error: Exception) -> None:
        """Strawberry logs an operation that failed at ERROR with its traceback; a client
        that hung up while its subscription was being sent is its own doing (INFO)."""
        if isinstance(error, WebSocketDisconnected):
            log.info("a WebSocket client went away while a subscription was sent to it")
            return
        await super().handle_task_exception(error)

    async def shutdown(self) -> None:
        if self._watch is not None:
            self._watch.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watch
        await super().shutdown()

    async def run_operation(self, operation: Operation[Context, None]) -> None:
        # In the operation's own task: its subscription's shared events are sent from here.
        shared_send.set(functools.partial(self._send_shared, operation))
        await super().run_operation(operation)

    @staticmethod
    async def _send_shared(operation: Operation[Context, None], data: SharedData) -> None:
        """The `next` message of an event whose data is shared: what `send_next` sends for
        a result of that data alone (encoded as encode_json writes shared data)."""
        try:
            await operation.send_operation_message(
                {"id": operation.id, "type": "next", "payload": {"data": data}}
            )
        except Exception as exc:
            raise _SharedSendFailed(exc) from None

    async def _send_result_stream(self, operation: Operation[Context, None], results: Any) -> None:
        try:
            await super()._send_result_stream(operation, results)
        except _SharedSendFailed as failed:
            # As a send of a `next` fails (a client gone): the operation ends with it.
            raise failed.error from None

    async def handle_subscribe(self, message: SubscribeMessage) -> None:
        if self.connection_acknowledged and self._recheck is not None:
            try:
                principal = await self._recheck()
            except Exception as exc:
                if not database_unreachable(exc):
                    raise
                # As the periodic check does: the credential held when last checked, and a
                # database that is away says nothing against it (the subscription waits
                # for it). This used to end the whole connection with an error.
                log.info("a credential could not be checked again: %s", type(exc).__name__)
                principal = self.context.principal
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
    """Strawberry's ASGI app with strict input and negotiated responses. Subscriptions are
    served over the WebSocket only (graphql-transport-ws, the protocol the API names)."""

    graphql_transport_ws_handler_class = StrictTransportWSHandler

    def __init__(self, *args: Any, graphiql_cdn: bool = False, **kwargs: Any) -> None:
        kwargs.setdefault("subscription_protocols", (GRAPHQL_TRANSPORT_WS_PROTOCOL,))
        super().__init__(*args, **kwargs)
        self.graphiql_html = graphiql_page(cdn=graphiql_cdn)

    def _check_websocket_origin(self, request: WebSocket) -> bool:
        """Strawberry's check (0.341), which logs each refusal at WARNING: a page on another
        site that tries the socket is its visitor's doing, not the operator's (INFO here)."""
        headers = self.get_websocket_headers(request)
        origin, host = headers.get("origin"), headers.get("host")
        if (
            origin is None
            or headers.get("sec-fetch-site") == "same-origin"
            or is_same_origin(origin, host)
            or self.is_websocket_origin_allowed(request, origin)
        ):
            return True
        log.info("refused a WebSocket from origin %r to host %r", origin[:100], host)
        return False

    async def render_graphql_ide(self, request: Request) -> Response:
        """The page, with the session's CSRF token for its requests (a logged-in browser's
        POSTs carry it in X-CSRF-Token; with a Bearer token there is none to carry)."""
        principal = principal_of(request.scope)
        token = "" if principal is None or principal.csrf_token is None else principal.csrf_token
        return HTMLResponse(self.graphiql_html.replace("{csrf_token}", html.escape(token)))

    async def run(
        self, request: Request | WebSocket, context: Any = UNSET, root_value: Any = UNSET
    ) -> Any:
        """Strawberry's, with the response type negotiated first (406 when neither JSON
        type is acceptable) and set last, with 400 for a request error when the client
        takes application/graphql-response+json."""
        if isinstance(request, WebSocket) or self.should_render_graphql_ide(
            self.request_adapter_class(request)
        ):
            return await super().run(request, context, root_value)
        media_type = negotiate_media_type(request.headers.get("accept"))
        if media_type is None:
            raise HTTPException(
                406,
                f"Accept allows neither {GRAPHQL_RESPONSE_JSON} nor {JSON_MEDIA_TYPE}, "
                "the types of GraphQL responses",
            )
        request.scope[_MEDIA_TYPE_KEY] = media_type
        try:
            response: Response = await super().run(request, context, root_value)
        except MethodNotAllowed as exc:
            return PlainTextResponse(exc.reason, 405, headers={"Allow": exc.allow})
        if media_type == GRAPHQL_RESPONSE_JSON and response.media_type == JSON_MEDIA_TYPE:
            response.headers["content-type"] = GRAPHQL_RESPONSE_JSON
            if request.scope.get(_REQUEST_ERROR_KEY):
                response.status_code = 400
        return response

    async def process_result(self, request: Request, result: ExecutionResult) -> Any:
        processed: GraphQLHTTPResponse = await super().process_result(request, result)
        if request.scope.get(_MEDIA_TYPE_KEY) == GRAPHQL_RESPONSE_JSON and is_request_error(result):
            # The spec: a request error's response has no `data` entry (it never ran).
            processed.pop("data", None)
            request.scope[_REQUEST_ERROR_KEY] = True
        return processed

    def decode_json(self, data: str | bytes) -> object:
        return decode_request_json(data)

    def encode_json(self, data: object) -> str | bytes:
        """As Strawberry's; a `next` message whose data is shared by subscribers writes the
        data's JSON encoded once (graphql_schema.shared_events) inside its own envelope."""
        if isinstance(data, dict) and data.keys() == {"data"}:
            # A query's answer: its data's JSON was encoded once already, for the response
            # size limit (graphql_schema.limits), and is written as it is.
            shared = data["data"]
            if isinstance(shared, SharedData):
                with contextlib.suppress(TypeError, ValueError):
                    return f'{{"data":{shared.json()}}}'
        if isinstance(data, dict) and data.get("type") == "next":
            payload = data.get("payload")
            if isinstance(payload, dict) and payload.keys() == {"data"}:
                shared = payload["data"]
                if isinstance(shared, SharedData):
                    envelope = json.dumps(data["id"])
                    return f'{{"id":{envelope},"type":"next","payload":{{"data":{shared.json()}}}}}'
        return super().encode_json(data)

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
        """As Strawberry's, but a subscription over plain HTTP is a 400 that names the
        WebSocket (executed as a query it failed inside: a masked error, since its resolver
        yields instead of returning), and a mutation over GET a 405 with `Allow: POST`."""
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
            if exc.operation_type is OperationType.MUTATION:
                raise MethodNotAllowed(f"{reason}: send mutations with POST", "POST") from exc
            if exc.operation_type is OperationType.SUBSCRIPTION:
                reason += " (subscribe over the WebSocket at /graphql, graphql-transport-ws)"
            raise HTTPException(400, reason) from exc
        except MissingQueryError as exc:
            raise HTTPException(400, "No GraphQL query found in the request") from exc
