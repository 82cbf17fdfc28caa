"""The schema: Query and Mutation assembled from the feature modules, with limits."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from typing import Annotated, Any, cast

import strawberry
from graphql import ExecutionResult as GraphQLExecutionResult
from graphql import OperationType
from strawberry.extensions import (
    AddValidationRules,
    DisableIntrospection,
    MaskErrors,
    MaxAliasesLimiter,
    QueryDepthLimiter,
    ValidationCache,
)
from strawberry.schema.config import StrawberryConfig

from graphql_schema.access import AccessMutations, ApiToken, Me, resolve_api_tokens, resolve_me
from graphql_schema.audit import AuditEvent, MutationAudit, load_audit_event, resolve_audit_events
from graphql_schema.command_streams import Subscription
from graphql_schema.commands import (
    LOG_PAGE_MAX,
    Command,
    CommandMutations,
    ComposedCommand,
    resolve_commands,
    resolve_compose_command,
)
from graphql_schema.context import Info
from graphql_schema.cost import CostModel, ListBound
from graphql_schema.direct import DirectLeaves, install_direct_resolvers
from graphql_schema.errors import CorralSchema, is_unexpected
from graphql_schema.limits import Limits, QueryLimits
from graphql_schema.permissions import RoleGuard
from graphql_schema.profiles import Profile, ProfileMutations, resolve_profiles
from graphql_schema.proxies import (
    Proxy,
    ProxyImportMutations,
    ProxyMutations,
    resolve_proxies,
)
from graphql_schema.relay import DEFAULT_PAGE_SIZE, Connection, Node, decode_id
from graphql_schema.runners import Runner, resolve_runners
from graphql_schema.services import Service, ServiceMutations, resolve_services
from graphql_schema.shared_events import SharedResults, joined_data, sent_directly, shared_send
from graphql_schema.templates import (
    CommandTemplate,
    CommandTemplateMutations,
    resolve_command_templates,
)
from server.settings import Settings


async def _load_node(info: Info, type_name: str, pk: int) -> Node | None:
    loaders = info.context.loaders
    lookups: dict[str, tuple[Any, Callable[[Any], Node]]] = {
        "Profile": (loaders.profile, Profile.from_row),
        "Service": (loaders.service, Service.from_row),
        "Proxy": (loaders.proxy, Proxy.from_row),
        "CommandTemplate": (loaders.template, CommandTemplate.from_row),
    }
    if type_name == "ApiToken":
        async with info.context.reading() as session:
            from server.models import ApiToken as ApiTokenRow

            token = await session.get(ApiTokenRow, pk)
        return None if token is None else ApiToken.from_row(token)
    if type_name == "AuditEvent":
        return await load_audit_event(info, pk)
    if type_name == "Command":
        async with info.context.reading() as session:
            from server.models import Command as CommandRow

            row = await session.get(CommandRow, pk)
        return None if row is None else Command.from_row(row)
    if type_name not in lookups:
        return None
    loader, convert = lookups[type_name]
    found = await loader.load(pk)
    return None if found is None else convert(found)


@strawberry.type(description="What a client can read.")
class Query:
    @strawberry.field(description="Any object by its global ID (null when there is none).")
    async def node(
        self,
        info: Info,
        id: Annotated[strawberry.ID, strawberry.argument(description="A global ID.")],
    ) -> Node | None:
        decoded = decode_id(id)
        return None if decoded is None else await _load_node(info, *decoded)

    profiles: Connection[Profile] = strawberry.field(
        resolver=resolve_profiles, description="Profiles, oldest first."
    )
    services: Connection[Service] = strawberry.field(
        resolver=resolve_services, description="Services, oldest first."
    )
    proxies: Connection[Proxy] = strawberry.field(
        resolver=resolve_proxies, description="Proxies, oldest first."
    )
    command_templates: Connection[CommandTemplate] = strawberry.field(
        resolver=resolve_command_templates, description="Command templates, oldest first."
    )
    commands: Connection[Command] = strawberry.field(
        resolver=resolve_commands,
        description="Commands, oldest first unless `orderBy: CREATED_DESC`; optionally by "
        "status and profile.",
    )
    compose_command: ComposedCommand = strawberry.field(
        resolver=resolve_compose_command,
        description="Preview what runCommand would run (argv, env names); runs nothing.",
    )
    runners: list[Runner] = strawberry.field(
        resolver=resolve_runners,
        description="The runners, by name: those running, and those whose heartbeat stopped "
        "(alive false).",
    )
    me: Me = strawberry.field(resolver=resolve_me, description="Who the request acts as.")
    api_tokens: Connection[ApiToken] = strawberry.field(
        resolver=resolve_api_tokens,
        description="API tokens, oldest first, revoked and expired ones included.",
    )
    audit_events: Connection[AuditEvent] = strawberry.field(
        resolver=resolve_audit_events,
        description="The audit record, newest first; each filter given narrows it.",
    )


@strawberry.type(description="What a client can change (admins only).")
class Mutation(
    ProfileMutations,
    ServiceMutations,
    ProxyMutations,
    ProxyImportMutations,
    CommandTemplateMutations,
    CommandMutations,
    AccessMutations,
):
    pass


def query_limits(settings: Settings) -> Limits:
    """Query size, cost and response limits from settings (cost weights as the resolvers
    page: connections by `first` or DEFAULT_PAGE_SIZE, Command.logs by `first` or all)."""
    return Limits(
        max_query_bytes=settings.graphql_max_query_bytes,
        max_tokens=settings.graphql_max_tokens,
        max_cost=settings.graphql_max_cost,
        max_response_bytes=settings.graphql_max_response_bytes,
        cost_model=CostModel(
            list_size=settings.graphql_cost_list_size,
            page_size=DEFAULT_PAGE_SIZE,
            page_size_max=settings.page_size_max,
            bounded_lists={("Command", "logs"): ListBound(LOG_PAGE_MAX, LOG_PAGE_MAX)},
        ),
    )


# The schema extensions with a `resolve` hook; each acts on root fields only (see
# CorralExecutionContext), and a test holds every such hook of the schema to this list.
ROOT_FIELD_HOOKS: tuple[type, ...] = (RoleGuard, MutationAudit)


class CorralExecutionContext(DirectLeaves):
    """graphql-core's executor, with three changes (the third: plain scalar fields answered
    in place where no middleware runs, see `DirectLeaves`).

    Root-field middleware: our schema extensions' `resolve` hooks (RoleGuard,
    MutationAudit; `ROOT_FIELD_HOOKS`) act on root fields only and pass every other field
    straight through, but graphql-core wraps every field in them: two calls more for each
    of the 12,500 fields of a page of 500 profiles, a fifth of its time (issue 16). Here
    the root fields of a query, a mutation or a subscription event run through the
    middleware, and none of the fields below them.

    Per-event memo: each event of a subscription collects its subfields afresh.
    graphql-core 3.3 copies a subscription's executor for every event, but the copies
    share one memo of collected subfields keyed by the identity of a list that each event
    builds anew (and keeps alive): every event delivered added ~1 KB for as long as the
    subscription lived, about 1 GB for the lines of a million-line log.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.root_middleware = self.middleware_manager
        self.middleware_manager = None

    def execute_root_grouped_field_set(
        self,
        root_type: Any,
        root_value: Any,
        grouped_field_set: Any,
        serially: bool,
        position_context: Any,
    ) -> Any:
        try:
            return super().execute_root_grouped_field_set(
                root_type, root_value, grouped_field_set, serially, position_context
            )
        finally:
            self.middleware_manager = None

    def execute_field(
        self,
        parent_type: Any,
        source: Any,
        field_details_list: Any,
        path: Any,
        position_context: Any,
    ) -> Any:
        """graphql-core's; a root field's resolver is wrapped in the middleware (graphql-core
        takes it from `middleware_manager` as the field starts: see build_resolve_info)."""
        if path.prev is None:
            self.middleware_manager = self.root_middleware
        return super().execute_field(
            parent_type, source, field_details_list, path, position_context
        )

    def build_resolve_info(
        self, field_def: Any, field_nodes: Any, parent_type: Any, path: Any
    ) -> Any:
        """graphql-core's (Strawberry's); a root field's resolver was wrapped in the
        middleware just before: what runs from here on (its resolver, its value's
        subfields, however soon) is not. Before, the subfields of a root value at hand,
        such as a subscription event's log lines, all went through the hooks: two calls
        more a field, and no direct leaves."""
        if path.prev is None:
            self.middleware_manager = None
        return super().build_resolve_info(field_def, field_nodes, parent_type, path)

    _per_event = False

    def build_per_event_executor(self, payload: Any) -> Any:
        executor = cast("CorralExecutionContext", super().build_per_event_executor(payload))
        executor._relevant_sub_fields = {}
        executor._per_event = True
        return executor

    def cancellable_iterable(self, iterable: Any) -> Any:
        """graphql-core's; a subscription's event stream (what its resolver returned) is
        given over WebSocket with events whose shared data the transport sends itself
        taken out (shared_events.sent_directly)."""
        events = super().cancellable_iterable(iterable)
        send = shared_send.get()
        subscription = self.operation.operation == OperationType.SUBSCRIPTION
        if send is None or self._per_event or not subscription:
            return events  # not a subscription's event stream (a field's list, say)
        variables = self.variable_values.coerced
        return sent_directly(events, self.operation, self.fragments, variables, send)

    def execute_operation(self, serially: bool | None = None) -> Any:
        """As graphql-core's; an event shared by subscribers (graphql_schema.shared_events)
        is executed once per selection, and its data handed to the others as it is."""
        shared = getattr(self.root_value, "shared_results", None)
        if not isinstance(shared, SharedResults):
            return super().execute_operation(serially)
        data = shared.get(self.operation, self.fragments, self.variable_values.coerced)
        if data is not None:
            return GraphQLExecutionResult(data, None)
        parts = getattr(self.root_value, "parts", ())
        if parts:
            return self._joined(parts, shared, serially)
        result = super().execute_operation(serially)
        if self.is_awaitable(result):
            return self._keep_shared(result, shared)
        return self._share(result, shared)

    def _joined(self, parts: Sequence[Any], shared: SharedResults, serially: bool | None) -> Any:
        """An event made of other events (`parts`, each shared: a merge of published log
        batches) is their results joined, not executed again: each line is executed once
        per selection, however many followers' merges it is part of (issue 16)."""
        skipped = [skip for _part, skip in parts]
        results = [
            self.build_per_event_executor(part).execute_operation(serially)
            for part, _skipped in parts
        ]
        if any(self.is_awaitable(result) for result in results):
            return self._join_later(results, skipped, shared, serially)
        return self._join(results, skipped, shared, serially)

    async def _join_later(
        self, results: list[Any], skipped: list[int], shared: SharedResults, serially: bool | None
    ) -> Any:
        done = [await result if self.is_awaitable(result) else result for result in results]
        joined = self._join(done, skipped, shared, serially)
        return await joined if self.is_awaitable(joined) else joined

    def _join(
        self, results: list[Any], skipped: list[int], shared: SharedResults, serially: bool | None
    ) -> Any:
        data = joined_data([getattr(result, "data", None) for result in results], skipped)
        if data is None or any(getattr(result, "errors", None) for result in results):
            # A part met an error: the event is executed as a whole (its errors its own).
            result = super().execute_operation(serially)
            if self.is_awaitable(result):
                return self._keep_shared(result, shared)
            return self._share(result, shared)
        return self._share(GraphQLExecutionResult(data, None), shared)

    async def _keep_shared(self, result: Awaitable[Any], shared: SharedResults) -> Any:
        return self._share(await result, shared)

    def _share(self, result: Any, shared: SharedResults) -> Any:
        if not isinstance(result, GraphQLExecutionResult) or result.errors or not result.data:
            return result  # an error stays with the subscriber that met it
        data = shared.put(self.operation, self.fragments, self.variable_values.coerced, result.data)
        return GraphQLExecutionResult(data, None, result.extensions)


def build_schema(settings: Settings | None = None) -> strawberry.Schema:
    """The schema, with depth, alias, query size, token, cost and response limits (and
    introspection on or off) from settings."""
    settings = settings or Settings()
    # The limits' rules are built once, here: the limiter extensions build new rule classes
    # each time they are made (once a request), and a validation cached under one request's
    # rules never served another (every request was validated afresh: most of its time).
    rules = [
        *QueryDepthLimiter(max_depth=settings.graphql_max_depth).validation_rules,
        *MaxAliasesLimiter(max_alias_count=settings.graphql_max_aliases).validation_rules,
    ]
    if not settings.graphql_introspection:
        rules.extend(DisableIntrospection().validation_rules)
    limits = query_limits(settings)
    schema = CorralSchema(
        query=Query,
        mutation=Mutation,
        subscription=Subscription,
        types=[Profile, Service, Proxy, CommandTemplate, Command, ApiToken, AuditEvent],
        extensions=[
            lambda: AddValidationRules(rules),
            lambda: MaskErrors(should_mask_error=is_unexpected),
            # QueryLimits also parses (with a cache), after checking the query's size.
            lambda: QueryLimits(limits),
            # After the limits (a refused query never gets this far), and inside the audit
            # (a resolver hook listed earlier runs nested in a later one's): its refusals
            # are on record as `denied`.
            RoleGuard,
            lambda: ValidationCache(maxsize=256),
            MutationAudit,
        ],
        config=StrawberryConfig(),
        execution_context_class=CorralExecutionContext,
    )
    install_direct_resolvers(schema)
    return schema


def schema_sdl() -> str:
    """The schema in SDL, as exported to `schema.graphql`."""
    return build_schema().as_str() + "\n"
