"""The `corral` command: serve, migrate, genkey, rotate-key, schema, token."""

from __future__ import annotations

import argparse
import asyncio
import gc
import logging
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from runner.sandbox import SandboxError
from runner.supervisor import runner_sandbox
from server import __version__, migrate
from server.app import (
    StartupError,
    create_app,
    prepare_access,
    prepare_database,
    run_standalone_runner,
)
from server.auth import (
    CLI,
    TokenHasher,
    create_api_token,
    list_api_tokens,
    revoke_api_token,
    token_is_active,
)
from server.db import create_engine, create_sessionmaker
from server.errors import InvalidInput
from server.keyrotation import DEFAULT_BATCH_SIZE, rotate_key
from server.limits import uvicorn_limits
from server.models import ApiToken, utcnow
from server.secretbox import SecretKeyError, generate_key
from server.settings import WILDCARD_ADDRESSES, Settings

T = TypeVar("T")
TokenWork = Callable[[AsyncSession, TokenHasher], Awaitable[T]]


class CliError(Exception):
    """A problem the user can fix; printed as one line, exit status 1."""


class HideQueryStrings(logging.Filter):
    """Access log lines name the path, not its query string: a GraphQL GET carries the
    query text (and any literal in it, a token included) and its variables there."""

    def filter(self, record: logging.LogRecord) -> bool:
        # uvicorn's access record: (client, method, path with query, HTTP version, status).
        args = record.args
        if isinstance(args, tuple) and len(args) == 5 and isinstance(args[2], str):
            path, mark, _query = args[2].partition("?")
            if mark:
                record.args = (args[0], args[1], f"{path}?…", *args[3:])
        return True


def hide_query_strings() -> None:
    """Install `HideQueryStrings` on uvicorn's access log (after uvicorn configured it)."""
    access = logging.getLogger("uvicorn.access")
    if not any(isinstance(f, HideQueryStrings) for f in access.filters):
        access.addFilter(HideQueryStrings())


def load_settings(*, host: str | None = None, port: int | None = None) -> Settings:
    """Settings from the environment, with command-line overrides; one readable error."""
    try:
        settings = Settings()
        updates = {
            key: value for key, value in (("host", host), ("port", port)) if value is not None
        }
        if updates:
            settings = Settings.model_validate({**settings.model_dump(), **updates})
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "settings"
        raise CliError(f"invalid setting CORRAL_{where.upper()}: {first['msg']}") from exc
    return settings


async def _prepare(settings: Settings) -> None:
    engine = create_engine(settings)
    try:
        await prepare_database(settings, engine)
    finally:
        await engine.dispose()


def _describe_database(settings: Settings) -> str:
    if settings.is_embedded:
        return f"embedded SQLite in {settings.data_dir.resolve()}"
    from sqlalchemy.engine import make_url

    return make_url(settings.resolved_database_url).render_as_string(hide_password=True)


def print_protection(settings: Settings) -> None:
    """Say which wall stands between commands and Corral's files (a warning when none)."""
    sandbox = runner_sandbox(settings)
    if sandbox.protected:
        print(f"Corral protection: {sandbox.describe()}", flush=True)
    else:
        print(f"Corral WARNING: {sandbox.describe()}", flush=True)


def freeze_startup_heap() -> None:
    """Take what startup built (modules, the GraphQL schema, ORM mappers: some 130k
    objects) out of the cyclic garbage collector's sight, as a long-running server should.

    Left in sight, each full collection walks them all: 60-130 ms with the event loop
    stopped, about twice a second while a command floods its log (measured with
    benchmarks/log_ingest.py). Call it once, when startup is done.
    """
    gc.collect()
    gc.freeze()


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    settings = load_settings(host=args.host, port=args.port)
    asyncio.run(_prepare(settings))
    app = create_app(settings)
    freeze_startup_heap()
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        lifespan="on",
        **uvicorn_limits(settings),
    )
    hide_query_strings()
    server = uvicorn.Server(config)
    print(f"Corral {__version__}: database {_describe_database(settings)}", flush=True)
    if settings.embedded_runner:
        print_protection(settings)
    if settings.port:
        print(
            f"Corral listening on http://{settings.host}:{settings.port}/ (GraphQL at /graphql)",
            flush=True,
        )
    if settings.allowed_hosts is None and settings.host.strip().lower() in WILDCARD_ADDRESSES:
        names = ", ".join(settings.allowed_host_names)
        print(
            f"Corral answers only to the Host names {names}: set CORRAL_ALLOWED_HOSTS to the "
            "names clients use to reach it",
            flush=True,
        )
    server.run()


def cmd_migrate(args: argparse.Namespace) -> None:
    settings = load_settings()

    async def run() -> str | None:
        engine = create_engine(settings)
        try:
            if args.down:
                await migrate.downgrade(engine, args.down)
            else:
                await migrate.upgrade(engine, args.revision)
            return await migrate.current_revision(engine)
        finally:
            await engine.dispose()

    revision = asyncio.run(run())
    print(f"database {_describe_database(settings)} is at revision {revision or 'base (empty)'}")


def cmd_runner(_args: argparse.Namespace) -> None:
    settings = load_settings()
    if settings.is_embedded:
        raise CliError(
            "`corral runner` needs a shared PostgreSQL (CORRAL_DATABASE_URL); on the embedded "
            "SQLite, `corral serve` runs commands itself"
        )
    print_protection(settings)
    freeze_startup_heap()
    asyncio.run(run_standalone_runner(settings))


def cmd_check(_args: argparse.Namespace) -> None:
    settings = load_settings()
    asyncio.run(_prepare(settings))
    print(f"ok: database {_describe_database(settings)} is migrated and the secret key fits")


def cmd_genkey(_args: argparse.Namespace) -> None:
    print(generate_key())


def cmd_rotate_key(args: argparse.Namespace) -> None:
    settings = load_settings()
    if args.batch_size < 1:
        raise CliError("--batch-size must be at least 1")
    report = asyncio.run(rotate_key(settings, batch_size=args.batch_size))
    for line in report.lines():
        print(line)


def cmd_schema(_args: argparse.Namespace) -> None:
    from graphql_schema.schema import schema_sdl

    sys.stdout.write(schema_sdl())


# --- corral token ----------------------------------------------------------------------

TOKEN_DAYS_MAX = 3650


def _token_days(text: str | None) -> timedelta | None:
    if text is None:
        return None
    if not text.strip().isdigit() or not 1 <= int(text) <= TOKEN_DAYS_MAX:
        raise CliError(f"--expires-in-days must be a whole number from 1 to {TOKEN_DAYS_MAX}")
    return timedelta(days=int(text))


def _token_pk(text: str) -> int:
    """A token's id as `corral token list` shows it, or its GraphQL ID."""
    from graphql_schema.relay import MAX_PK, decode_id

    if text.isascii() and text.isdigit() and int(text) <= MAX_PK:
        return int(text)
    decoded = decode_id(text)
    if decoded is None or decoded[0] != "ApiToken":
        raise CliError("the token ID must be a number from `corral token list`")
    return decoded[1]


def _one_line(exc: InvalidInput) -> str:
    return "; ".join(f"{'.'.join(e.field) or 'input'}: {e.message}" for e in exc.errors)


async def _with_tokens(settings: Settings, work: TokenWork[T]) -> T:
    """Run `work` in one committed transaction, with the installation's token hasher."""
    engine = create_engine(settings)
    try:
        box = await prepare_database(settings, engine)
        hasher = await prepare_access(engine, box)
        async with create_sessionmaker(engine)() as session:
            try:
                result = await work(session, hasher)
            except InvalidInput as exc:
                raise CliError(_one_line(exc)) from exc
            await session.commit()
            return result
    finally:
        await engine.dispose()


def cmd_token_create(args: argparse.Namespace) -> None:
    settings = load_settings()
    lifetime = _token_days(args.expires_in_days)
    expires_at = None if lifetime is None else utcnow() + lifetime

    async def work(session: AsyncSession, hasher: TokenHasher) -> tuple[ApiToken, str]:
        return await create_api_token(
            session, hasher, name=args.name, role=args.role, created_by=CLI, expires_at=expires_at
        )

    token, plaintext = asyncio.run(_with_tokens(settings, work))
    print(plaintext, flush=True)  # alone on stdout: TOKEN=$(corral token create ...)
    until = "never expires" if token.expires_at is None else f"expires {token.expires_at:%Y-%m-%d}"
    print(
        f"corral: API token {token.id} {token.name!r} ({token.role}, {until}) created; it is "
        "printed above once and cannot be shown again. Send it as `Authorization: Bearer ...`.",
        file=sys.stderr,
    )


def cmd_token_list(_args: argparse.Namespace) -> None:
    settings = load_settings()

    async def work(session: AsyncSession, _hasher: TokenHasher) -> list[ApiToken]:
        return await list_api_tokens(session)

    tokens = asyncio.run(_with_tokens(settings, work))
    now = utcnow()
    print("ID\tNAME\tROLE\tSTATE\tPREVIEW\tCREATED\tEXPIRES\tLAST USED")
    for token in tokens:
        state = (
            "revoked"
            if token.revoked_at is not None
            else ("active" if token_is_active(token, now) else "expired")
        )
        print(
            "\t".join(
                (
                    str(token.id),
                    token.name,
                    token.role,
                    state,
                    token.preview,
                    _when(token.created_at),
                    _when(token.expires_at),
                    _when(token.last_used_at),
                )
            )
        )


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else f"{moment:%Y-%m-%d %H:%M}Z"


def cmd_token_revoke(args: argparse.Namespace) -> None:
    settings = load_settings()
    pk = _token_pk(args.id.strip())

    async def work(session: AsyncSession, _hasher: TokenHasher) -> ApiToken:
        return await revoke_api_token(session, pk)

    token = asyncio.run(_with_tokens(settings, work))
    print(f"API token {token.id} {token.name!r} is revoked: requests with it are refused")


def _add_token_commands(commands: Any) -> None:
    token = commands.add_parser("token", help="create, list and revoke API tokens")
    actions = token.add_subparsers(dest="token_command", required=True, metavar="ACTION")
    create = actions.add_parser("create", help="make a token; prints it (only it) on stdout, once")
    create.add_argument("--name", required=True, help="what the token is for")
    create.add_argument("--role", choices=("admin", "viewer"), default="viewer")
    create.add_argument("--expires-in-days", metavar="D", help="stop working after D days")
    create.set_defaults(func=cmd_token_create)
    actions.add_parser("list", help="every token (never the token itself)").set_defaults(
        func=cmd_token_list
    )
    revoke = actions.add_parser("revoke", help="revoke a token: its next request is refused")
    revoke.add_argument("id", help="the token's ID (from `corral token list`)")
    revoke.set_defaults(func=cmd_token_revoke)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="corral", description=__doc__)
    parser.add_argument("--version", action="version", version=f"corral {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = commands.add_parser("serve", help="run the API and panel (migrates embedded SQLite)")
    serve.add_argument("--host", help="address to listen on (default 127.0.0.1)")
    serve.add_argument("--port", type=int, help="port to listen on (default 8000)")
    serve.set_defaults(func=cmd_serve)

    commands.add_parser(
        "runner", help="run commands only (no API), beside `corral serve` on a shared PostgreSQL"
    ).set_defaults(func=cmd_runner)

    mig = commands.add_parser("migrate", help="migrate the database (to the newest revision)")
    mig.add_argument("revision", nargs="?", default="head", help="revision to upgrade to")
    mig.add_argument("--down", metavar="REVISION", help="downgrade to REVISION (base: empty)")
    mig.set_defaults(func=cmd_migrate)

    commands.add_parser(
        "check", help="check settings, database, migrations and secret key (as serve would)"
    ).set_defaults(func=cmd_check)
    commands.add_parser("genkey", help="print a new secret key").set_defaults(func=cmd_genkey)
    rotate = commands.add_parser(
        "rotate-key", help="re-encrypt every stored secret under a new key (stop serve first)"
    )
    rotate.add_argument(
        "--batch-size",
        type=int,
        default=DEFAULT_BATCH_SIZE,
        help=f"secrets re-encrypted per transaction (default {DEFAULT_BATCH_SIZE})",
    )
    rotate.set_defaults(func=cmd_rotate_key)
    commands.add_parser("schema", help="print the GraphQL schema (SDL)").set_defaults(
        func=cmd_schema
    )
    _add_token_commands(commands)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `corral` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    logging.getLogger("alembic").setLevel(logging.WARNING)
    try:
        args.func(args)
    except (CliError, StartupError, SecretKeyError, SandboxError) as exc:
        print(f"corral: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
