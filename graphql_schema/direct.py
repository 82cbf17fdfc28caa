"""Direct resolvers: the fields of a big page resolved without Strawberry's per-field
machinery (issue 16), with the same answers and the same checks.

Strawberry resolves every field through a wrapper: for a field with a resolver or an
extension it builds an `Info`, converts the arguments and chains the extensions, some
microseconds a field; a page of 500 profiles has 12,500 fields. Once the schema is built,
`install_direct_resolvers` gives graphql-core
- for each plain field (no resolver, no extension: an attribute of the object), one
  `getattr`; and where such a field is a scalar or an enum, the executor
  (`DirectLeaves`) reads and serialises it itself, without the resolve info, path and
  completion graphql-core builds for every field (two thirds of a page's fields);
- for each field declared with `answer_at_once(...)`, that function first: when it has the
  answer at once (a page's prefetched links, a token's preview) it is returned after the
  field's extensions' checks (`CountedList` counts it, `SecretField` refuses it to a
  non-admin); otherwise (`NOT_AT_ONCE`) the field's Strawberry resolver runs as before.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final, NamedTuple

import strawberry
from graphql import (
    GraphQLEnumType,
    GraphQLField,
    GraphQLNonNull,
    GraphQLObjectType,
    GraphQLResolveInfo,
    GraphQLScalarType,
    Undefined,
)
from graphql.pyutils import Path, gather_with_cancel
from strawberry.resolvers import is_default_resolver
from strawberry.schema.schema import StrawberryGraphQLCoreExecutionContext
from strawberry.schema.schema_converter import GraphQLCoreConverter
from strawberry.types.field import StrawberryField

from graphql_schema.limits import CountedList, charge
from graphql_schema.permissions import SecretField, require_admin_for

NOT_AT_ONCE: Final = object()
_AT_ONCE = "corral_answer_at_once"

# (source, info): graphql-core's info, which has the same `context` as Strawberry's.
AtOnce = Callable[[Any, Any], Any]


def answer_at_once(answer: AtOnce) -> dict[str, AtOnce]:
    """Field metadata: `answer(source, info)` is the field's value when it has it at once,
    NOT_AT_ONCE otherwise."""
    return {_AT_ONCE: answer}


def install_direct_resolvers(schema: strawberry.Schema) -> None:
    """Replace the resolvers of plain and `answer_at_once` fields (see the module)."""
    for graphql_type in schema._schema.type_map.values():
        if not isinstance(graphql_type, GraphQLObjectType):
            continue
        for graphql_field in graphql_type.fields.values():
            field = (graphql_field.extensions or {}).get(GraphQLCoreConverter.DEFINITION_BACKREF)
            if not isinstance(field, StrawberryField) or field.is_subscription:
                continue
            metadata: Mapping[str, Any] = field.metadata or {}
            at_once: AtOnce | None = metadata.get(_AT_ONCE)
            if at_once is not None and graphql_field.resolve is not None:
                graphql_field.resolve = _at_once_or(at_once, field, graphql_field.resolve)
            elif (
                field.is_basic_field
                and field.default_resolver is getattr
                and is_default_resolver(graphql_field.resolve)
            ):
                graphql_field.resolve = _attribute_of(field.python_name, graphql_field)


class _Leaf(NamedTuple):
    """How `DirectLeaves` answers a plain scalar or enum field."""

    attribute: str
    coerce: Callable[[Any], Any]
    non_null: bool


_LEAF = "corral_leaf"
# A list item's selected fields, each (response name, attribute, output coercion, non-null).
_RowPlan = list[tuple[str, str, Callable[[Any], Any], bool]]


def _attribute_of(name: str, graphql_field: GraphQLField) -> Callable[..., Any]:
    def resolve(source: Any, _info: Any) -> Any:
        return getattr(source, name)

    resolve._is_default = True  # type: ignore[attr-defined]  # as Strawberry marks its own
    field_type = graphql_field.type
    non_null = isinstance(field_type, GraphQLNonNull)
    named = field_type.of_type if isinstance(field_type, GraphQLNonNull) else field_type
    if isinstance(named, GraphQLScalarType | GraphQLEnumType) and not graphql_field.args:
        setattr(resolve, _LEAF, _Leaf(name, named.coerce_output_value, non_null))
    return resolve


class DirectLeaves(StrawberryGraphQLCoreExecutionContext):
    """graphql-core's `execute_fields` (3.3), with the plain scalar and enum fields of an
    object answered in place: `getattr` and the type's output coercion, as graphql-core's
    default completion would give them, without its resolve info, path and completion.
    Only where no field middleware runs (see CorralExecutionContext); a value that is not
    answered so at once (an exception, a null for a non-null field, a coercion that fails)
    takes graphql-core's own path, which words and places the error as before."""

    def execute_fields(
        self,
        parent_type: GraphQLObjectType,
        source_value: Any,
        path: Path | None,
        grouped_field_set: Any,
        position_context: Any,
    ) -> Any:
        results: dict[str, Any] = {}
        is_awaitable = self.is_awaitable
        awaitable_fields: list[str] = []
        fields = parent_type.fields
        # Root fields always go through execute_field (and its middleware: CorralExecutionContext).
        direct = self.middleware_manager is None and path is not None
        try:
            for response_name, field_details_list in grouped_field_set.items():
                if direct:
                    value = _leaf_value(fields, source_value, field_details_list)
                    if value is not Undefined:
                        results[response_name] = value
                        continue
                result = self.execute_field(
                    parent_type,
                    source_value,
                    field_details_list,
                    Path(path, response_name, parent_type.name),
                    position_context,
                )
                if result is not Undefined:
                    results[response_name] = result
                    if is_awaitable(result):
                        awaitable_fields.append(response_name)
        except Exception:
            if awaitable_fields:
                self.settle_in_background([results[field] for field in awaitable_fields])
            raise
        if not awaitable_fields:
            return results
        return _gathered(results, awaitable_fields)

    def complete_iterable_value(
        self,
        item_type: Any,
        field_details_list: Any,
        info: Any,
        path: Path,
        items: Any,
        position_context: Any,
    ) -> Any:
        """graphql-core's; a list of objects whose selected fields are all plain leaves (a
        page of log lines, say) is made row by row here, each row as `execute_fields` would
        answer it, without completing each item through graphql-core (a third of the cost
        of executing a log batch). Anything else, or any item not answered at once, takes
        graphql-core's own path, which words and places the error as before."""
        plan = self._row_plan(item_type, field_details_list, path)
        if plan is not None:
            if not isinstance(items, list | tuple):
                items = list(items)  # made once: graphql-core's path may need them again
            rows = self._leaf_rows(item_type, plan, info, items)
            if rows is not None:
                return rows
        return super().complete_iterable_value(
            item_type, field_details_list, info, path, items, position_context
        )

    def _row_plan(self, item_type: Any, field_details_list: Any, path: Path) -> _RowPlan | None:
        """How to answer each item of a list of `item_type` in place, if it can be."""
        if self.middleware_manager is not None:
            return None
        object_type = item_type.of_type if isinstance(item_type, GraphQLNonNull) else item_type
        if not isinstance(object_type, GraphQLObjectType):
            return None
        if self.get_stream_usage(field_details_list, path) is not None:
            return None
        grouped_field_set, new_defer_usages, _forbidden = self.collect_subfields(
            object_type, field_details_list
        )
        if new_defer_usages:
            return None
        plan: _RowPlan = []
        fields = object_type.fields
        for response_name, details in grouped_field_set.items():
            node = details[0].node
            field = fields.get(node.name.value)
            leaf: _Leaf | None = None if field is None else getattr(field.resolve, _LEAF, None)
            if leaf is None or node.arguments:
                return None
            plan.append((response_name, leaf.attribute, leaf.coerce, leaf.non_null))
        return plan

    def _leaf_rows(self, item_type: Any, plan: _RowPlan, info: Any, items: Any) -> list[Any] | None:
        """The items answered by `plan`, or None if one of them is not answered at once."""
        non_null = isinstance(item_type, GraphQLNonNull)
        object_type = item_type.of_type if non_null else item_type
        is_type_of = object_type.is_type_of
        is_awaitable = self.is_awaitable
        rows: list[Any] = []
        try:
            for item in items:
                if item is None:
                    if non_null:
                        return None
                    rows.append(None)
                    continue
                if is_awaitable(item) or (is_type_of and is_type_of(item, info) is not True):
                    return None
                row: dict[str, Any] = {}
                for response_name, attribute, coerce, leaf_non_null in plan:
                    value = getattr(item, attribute)
                    if value is None:
                        if leaf_non_null:
                            return None
                        row[response_name] = None
                        continue
                    coerced = coerce(value)
                    if coerced is None:
                        return None
                    row[response_name] = coerced
                rows.append(row)
        except Exception:  # graphql-core's path makes the located error
            return None
        return rows


def _leaf_value(fields: Any, source: Any, field_details_list: Any) -> Any:
    """The completed value of a plain leaf field, or Undefined: not such a field, or not a
    value answered at once (graphql-core's path then resolves it again, side-effect free)."""
    node = field_details_list[0].node
    field = fields.get(node.name.value)
    if field is None or node.arguments:
        return Undefined
    leaf: _Leaf | None = getattr(field.resolve, _LEAF, None)
    if leaf is None:
        return Undefined
    try:
        value = getattr(source, leaf.attribute)
        if value is None:
            return Undefined if leaf.non_null else None
        coerced = leaf.coerce(value)
    except Exception:  # graphql-core's path makes the located error
        return Undefined
    return Undefined if coerced is None else coerced


async def _gathered(results: dict[str, Any], awaitable_fields: list[str]) -> dict[str, Any]:
    if len(awaitable_fields) == 1:
        field = awaitable_fields[0]
        results[field] = await results[field]
    else:
        awaited = await gather_with_cancel(*(results[field] for field in awaitable_fields))
        results.update(zip(awaitable_fields, awaited, strict=True))
    return results


def _at_once_or(
    at_once: AtOnce, field: StrawberryField, resolver: Callable[..., Any]
) -> Callable[..., Any]:
    kinds = {type(extension) for extension in field.extensions}
    unknown = kinds - {CountedList, SecretField}
    if unknown:  # a check this module does not know how to make: it must not be skipped
        raise TypeError(f"{field.python_name}: answer_at_once with {unknown}")
    counted, secret = CountedList in kinds, SecretField in kinds

    def resolve(source: Any, info: GraphQLResolveInfo[Any], **kwargs: Any) -> Any:
        if secret:
            require_admin_for(info)
        value = at_once(source, info)
        if value is NOT_AT_ONCE:
            return resolver(source, info, **kwargs)
        return charge(value) if counted else value

    return resolve
