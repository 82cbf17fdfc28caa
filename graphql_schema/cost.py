"""Query cost: an estimate of the objects an operation makes, computed from its document.

The model (like GitHub's node count or Shopify's calculated cost): every object a field
returns costs 1, scalars and enums cost nothing, and a list multiplies the cost of what it
holds by its length. A connection's `edges` and `nodes` are as long as its `first` (or the
default page size, and at most the largest page); a list with a `first` argument of its own
(`Command.logs`) likewise; any other list (`Profile.proxies`, `Proxy.profiles`, the
introspection lists, ...) has no bound a query can state, so it counts as `list_size` items
(graphql_schema/limits.py counts the real ones as they come). Variables are resolved, so
`first: $n` costs what `$n` (or its default) says. Fragments are followed, each costed once
per place it can stand in, so the work stays linear in the document. Where the estimate
has to guess it guesses high: every inline fragment counts (as if the object were of each
type at once), a field selected twice (say by two fragments) counts twice, and
`@skip`/`@include` are taken as including.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from graphql import (
    DocumentNode,
    FieldNode,
    FragmentDefinitionNode,
    FragmentSpreadNode,
    GraphQLField,
    GraphQLInterfaceType,
    GraphQLList,
    GraphQLNamedType,
    GraphQLNonNull,
    GraphQLObjectType,
    GraphQLSchema,
    InlineFragmentNode,
    IntValueNode,
    OperationDefinitionNode,
    OperationType,
    SelectionSetNode,
    VariableNode,
    get_named_type,
    get_operation_ast,
    is_leaf_type,
)
from graphql.type.introspection import SchemaMetaFieldDef, TypeMetaFieldDef


@dataclass(frozen=True)
class ListBound:
    """How long a list field with a `first` argument is when `first` is absent, and at most."""

    default: int
    maximum: int


@dataclass(frozen=True)
class CostModel:
    """The weights of the cost estimate (see the module docstring)."""

    list_size: int
    page_size: int
    page_size_max: int
    # (type name, field name) -> bound, for list fields that take `first` themselves
    bounded_lists: Mapping[tuple[str, str], ListBound] = field(default_factory=dict)

    def operation_cost(
        self,
        schema: GraphQLSchema,
        document: DocumentNode,
        operation_name: str | None,
        variables: Mapping[str, Any] | None,
    ) -> int:
        """The estimated cost of the operation the request runs (0 when there is none)."""
        operation = get_operation_ast(document, operation_name)
        root = _root_type(schema, operation) if operation is not None else None
        if operation is None or root is None:
            return 0
        walk = _CostWalk(self, schema, document, operation, variables or {})
        return walk.selection_cost(operation.selection_set, root, None)


def _root_type(
    schema: GraphQLSchema, operation: OperationDefinitionNode
) -> GraphQLObjectType | None:
    return {
        OperationType.QUERY: schema.query_type,
        OperationType.MUTATION: schema.mutation_type,
        OperationType.SUBSCRIPTION: schema.subscription_type,
    }[operation.operation]


def _is_connection(named: GraphQLNamedType) -> bool:
    return (
        isinstance(named, GraphQLObjectType)
        and named.name.endswith("Connection")
        and "edges" in named.fields
    )


class _CostWalk:
    """One operation's cost; fragments are memoised by (name, enclosing list size)."""

    def __init__(
        self,
        model: CostModel,
        schema: GraphQLSchema,
        document: DocumentNode,
        operation: OperationDefinitionNode,
        variables: Mapping[str, Any],
    ) -> None:
        self.model = model
        self.types = schema.type_map
        self.variables = variables
        self.fragments = {
            definition.name.value: definition
            for definition in document.definitions
            if isinstance(definition, FragmentDefinitionNode)
        }
        self.variable_defaults = {
            definition.variable.name.value: definition.default_value
            for definition in operation.variable_definitions or ()
        }
        self.memo: dict[tuple[str, int | None], int] = {}
        self.visiting: set[str] = set()

    def selection_cost(
        self, selection_set: SelectionSetNode | None, parent: GraphQLNamedType, page: int | None
    ) -> int:
        """Cost of one instance of `parent` with this selection; `page`: the length of the
        lists of the connection that `parent` is, if it is one."""
        if selection_set is None:
            return 0
        total = 0
        for selection in selection_set.selections:
            if isinstance(selection, FieldNode):
                total += self.field_cost(selection, parent, page)
            elif isinstance(selection, InlineFragmentNode):
                condition = selection.type_condition
                named = self._type(condition.name.value) if condition else parent
                total += self.selection_cost(selection.selection_set, named or parent, page)
            elif isinstance(selection, FragmentSpreadNode):
                total += self.fragment_cost(selection.name.value, page)
        return total

    def fragment_cost(self, name: str, page: int | None) -> int:
        key = (name, page)
        if key in self.memo:
            return self.memo[key]
        definition = self.fragments.get(name)
        if definition is None or name in self.visiting:
            return 0  # unknown or cyclic: validation refuses such documents anyway
        named = self._type(definition.type_condition.name.value)
        if named is None:
            return 0
        self.visiting.add(name)
        try:
            cost = self.selection_cost(definition.selection_set, named, page)
        finally:
            self.visiting.discard(name)
        self.memo[key] = cost
        return cost

    def field_cost(self, node: FieldNode, parent: GraphQLNamedType, page: int | None) -> int:
        definition = self._field(parent, node.name.value)
        if definition is None:
            return 0
        named = get_named_type(definition.type)
        if is_leaf_type(named):
            return 0
        inner_page = self._page_size(node) if _is_connection(named) else None
        count = self._list_length(node, parent, definition, page) if _is_list(definition) else 1
        return count * (1 + self.selection_cost(node.selection_set, named, inner_page))

    def _page_size(self, node: FieldNode) -> int:
        first = self._int_argument(node, "first")
        size = self.model.page_size if first is None else first
        return max(0, min(size, self.model.page_size_max))

    def _list_length(
        self, node: FieldNode, parent: GraphQLNamedType, definition: GraphQLField, page: int | None
    ) -> int:
        if page is not None:  # `edges` / `nodes` of a connection
            return page
        bound = self.model.bounded_lists.get((parent.name, node.name.value))
        if bound is None or "first" not in definition.args:
            return self.model.list_size
        first = self._int_argument(node, "first")
        return max(0, min(bound.default if first is None else first, bound.maximum))

    def _int_argument(self, node: FieldNode, name: str) -> int | None:
        argument = next((arg for arg in node.arguments or () if arg.name.value == name), None)
        value_node: Any = None if argument is None else argument.value
        if isinstance(value_node, VariableNode):
            variable = value_node.name.value
            if variable in self.variables:
                return _as_int(self.variables[variable])
            value_node = self.variable_defaults.get(variable)
        if isinstance(value_node, IntValueNode):
            return int(value_node.value)
        return None

    def _type(self, name: str) -> GraphQLNamedType | None:
        return self.types.get(name)

    def _field(self, parent: GraphQLNamedType, name: str) -> GraphQLField | None:
        if name == "__schema":
            return SchemaMetaFieldDef
        if name == "__type":
            return TypeMetaFieldDef
        if isinstance(parent, GraphQLObjectType | GraphQLInterfaceType):
            found: GraphQLField | None = parent.fields.get(name)
            return found
        return None  # `__typename` on a union, or a field validation would refuse


def _is_list(definition: GraphQLField) -> bool:
    field_type = definition.type
    if isinstance(field_type, GraphQLNonNull):
        field_type = field_type.of_type
    return isinstance(field_type, GraphQLList)


def _as_int(value: Any) -> int | None:
    """A variable's value as a size (`True` is no number, whatever Python says)."""
    return value if isinstance(value, int) and not isinstance(value, bool) else None
