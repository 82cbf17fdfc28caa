"""Direct resolvers: the fields of a big page resolved without Strawberry's per-field
machinery (issue 16), with the same answers and the same checks.

Strawberry resolves every field through a wrapper: for a field with a resolver or an
extension it builds an `Info`, converts the arguments and chains the extensions, some
microseconds a field; a page of 500 profiles has 12,500 fields. Once the schema is built,
`install_direct_resolvers` gives graphql-core
- for each plain field (no resolver, no extension: an attribute of the object), one
  `getattr`;
- for each field declared with `answer_at_once(...)`, that function first: when it has the
  answer at once (a page's prefetched links, a token's preview) it is returned after the
  field's extensions' checks (`CountedList` counts it, `SecretField` refuses it to a
  non-admin); otherwise (`NOT_AT_ONCE`) the field's Strawberry resolver runs as before.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any, Final

import strawberry
from graphql import GraphQLObjectType, GraphQLResolveInfo
from strawberry.resolvers import is_default_resolver
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
                graphql_field.resolve = _attribute_of(field.python_name)


def _attribute_of(name: str) -> Callable[..., Any]:
    def resolve(source: Any, _info: Any) -> Any:
        return getattr(source, name)

    resolve._is_default = True  # type: ignore[attr-defined]  # as Strawberry marks its own
    return resolve


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
