"""schema.graphql is the exported SDL; a stale copy fails here (`make schema` refreshes it)."""

from pathlib import Path

from graphql_schema.schema import schema_sdl

SCHEMA_FILE = Path(__file__).resolve().parent.parent / "schema.graphql"


def test_schema_file_is_current() -> None:
    assert SCHEMA_FILE.read_text() == schema_sdl(), "schema.graphql is stale: run `make schema`"


def test_schema_keeps_the_public_names() -> None:
    sdl = schema_sdl()
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
    for secret_field in ("token: String!", "password: String!", "credentials"):
        assert f"  {secret_field}" not in sdl.split("input ")[0]
