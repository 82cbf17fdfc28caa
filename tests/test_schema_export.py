"""schema.graphql is the exported SDL; a stale copy fails here (`make schema` refreshes it)."""

import re
from collections.abc import Iterator
from pathlib import Path

import graphql
import strawberry
from graphql import (
    GraphQLEnumType,
    GraphQLInputObjectType,
    GraphQLInterfaceType,
    GraphQLObjectType,
    GraphQLScalarType,
    GraphQLSchema,
    get_named_type,
)

from graphql_schema.schema import build_schema, schema_sdl

SCHEMA_FILE = Path(__file__).resolve().parent.parent / "schema.graphql"


def test_schema_file_is_current() -> None:
    assert SCHEMA_FILE.read_text() == schema_sdl(), "schema.graphql is stale: run `make schema`"


def bare_sdl(sdl: str) -> str:
    """The SDL without descriptions (a described argument breaks a field over lines)."""
    schema = graphql.build_schema(sdl)
    for type_ in schema.type_map.values():
        type_.description = None
        if isinstance(type_, GraphQLEnumType):
            for value in type_.values.values():
                value.description = None
        elif isinstance(type_, GraphQLObjectType | GraphQLInterfaceType | GraphQLInputObjectType):
            for field in type_.fields.values():
                field.description = None
                for arg in getattr(field, "args", {}).values():
                    arg.description = None
    return graphql.print_schema(schema)


def test_schema_keeps_the_public_names() -> None:
    sdl = bare_sdl(schema_sdl())
    for name in (
        "interface Node",
        "type UserError",
        "node(id: ID!): Node",
        "profiles(",
        "services(",
        "proxies(",
        "commandTemplates(",
        "commands(",
        "createProfile(input: CreateProfileInput!): ProfilePayload!",
        "deleteProfile(id: ID!, deleteData: Boolean = false): DeletePayload!",
        "cancelRequested: Boolean!",
        "orderBy: CommandOrder! = CREATED_ASC",
        "enum CommandOrder",
        "linkService(",
        "unlinkService(",
        "attachProxy(",
        "detachProxy(",
        "createCommandTemplate(",
        "enum ProxyProtocol",
        "enum CommandStatus",
        "hasToken: Boolean!",
        "tokenPreview: String",
        "hasCredentials: Boolean!",
    ):
        assert name in sdl, name


# A field named with one of these words hands out a secret, unless it is a preview of one.
SECRET_WORDS = frozenset({"token", "password", "secret", "credential", "credentials", "plaintext"})
# Scalars that cannot carry a secret's value (`hasToken`, `tokenValid`, `tokenId`).
HARMLESS_SCALARS = frozenset({"Boolean", "Int", "Float", "ID", "DateTime"})
# The one deliberate exception: a new API token is shown once, in its creation payload.
SHOWN_ONCE = frozenset({"ApiTokenPayload.plaintext"})


def output_fields(schema: GraphQLSchema) -> Iterator[tuple[str, str, graphql.GraphQLField]]:
    """(type name, field name, field) of every object and interface type's fields."""
    for name, type_ in schema.type_map.items():
        if name.startswith("__"):
            continue
        if isinstance(type_, GraphQLObjectType | GraphQLInterfaceType):
            for field_name, field in type_.fields.items():
                yield name, field_name, field


def secret_output_fields(schema: GraphQLSchema) -> list[str]:
    """`Type.field` for each output field whose name says it holds a secret and whose type
    could carry one (a string-like scalar); previews and the shown-once token excepted."""
    found = []
    for type_name, field_name, field in output_fields(schema):
        words = {w.lower() for w in re.findall(r"[a-z]+|[A-Z][a-z]*", field_name)}
        leaf = get_named_type(field.type)
        if not words & SECRET_WORDS or "preview" in words:
            continue
        if not isinstance(leaf, GraphQLScalarType) or leaf.name in HARMLESS_SCALARS:
            continue
        if f"{type_name}.{field_name}" not in SHOWN_ONCE:
            found.append(f"{type_name}.{field_name}")
    return found


def test_no_secret_field_in_output_types() -> None:
    assert secret_output_fields(build_schema()._schema) == []


def test_the_secret_walker_finds_a_secret_field() -> None:
    tiny = graphql.build_schema(
        """
        interface Node { id: ID! }
        type Query { things: [Thing!]! node: Node }
        type Thing implements Node {
          id: ID! hasToken: Boolean! tokenPreview: String tokenValid: Boolean tokenId: ID
          apiToken: Thing password: String!
        }
        type Hidden implements Node { id: ID! clientSecret: JSON }
        type Mutation { save(input: SaveInput!): Thing }
        input SaveInput { token: String password: String }
        scalar JSON
        """
    )
    assert secret_output_fields(tiny) == ["Thing.password", "Hidden.clientSecret"]


def test_the_secret_walker_reads_strawberry_schemas() -> None:
    @strawberry.type
    class Account:
        name: str
        has_credentials: bool
        credentials: str | None

    @strawberry.type
    class Query:
        account: Account

    schema = strawberry.Schema(query=Query)
    assert secret_output_fields(schema._schema) == ["Account.credentials"]


def undescribed(schema: GraphQLSchema) -> list[str]:
    """Every object, interface, input and enum type, field and argument without a
    description, as `Type`, `Type.field` or `Type.field(argument)`."""
    missing = []
    for name, type_ in schema.type_map.items():
        if name.startswith("__") or isinstance(type_, GraphQLScalarType):
            continue
        if not type_.description:
            missing.append(name)
        if isinstance(type_, GraphQLEnumType):
            continue
        assert isinstance(
            type_, GraphQLObjectType | GraphQLInterfaceType | GraphQLInputObjectType
        ), name
        for field_name, field in type_.fields.items():
            if not field.description:
                missing.append(f"{name}.{field_name}")
            for arg_name, arg in getattr(field, "args", {}).items():
                if not arg.description:
                    missing.append(f"{name}.{field_name}({arg_name})")
    return missing


def test_every_type_field_and_argument_is_described() -> None:
    assert undescribed(build_schema()._schema) == []


def test_the_docs_walker_finds_what_is_undescribed() -> None:
    tiny = graphql.build_schema(
        """
        "Entry."
        type Query {
          "Described."
          a(
            "Described."
            x: Int
            y: Int
          ): Thing
          b: Int
        }
        type Thing { "Described." c: Int }
        enum Colour { RED }
        "Described."
        input In { d: Int }
        """
    )
    assert undescribed(tiny) == [
        "Query.a(y)",
        "Query.b",
        "Thing",
        "Colour",
        "In.d",
    ]
