"""The `corral` command: serve, migrate, genkey, rotate-key, schema, user, token."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import getpass
import ipaddress
import logging
import os
import secrets
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

from pydantic import ValidationError
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncSession

from runner.loading import runner_sandbox
from runner.sandbox import SandboxError
from server import __version__, migrate
from server.app import StartupError, create_app, prepare_database, run_standalone_runner
from server.audit import record_event
from server.auth import (
    CLI,
    TokenHasher,
    check_password,
    count_admins,
    create_api_token,
    create_user,
    delete_user,
    has_users,
    list_api_tokens,
    list_users,
    load_token_hasher,
    revoke_api_token,
    set_password,
    token_is_active,
)
from server.broker import DRAIN_TOPIC
from server.db import create_engine, create_sessionmaker
from server.errors import InvalidInput
from server.ids import MAX_PK, decode_global_id
from server.keyrotation import DEFAULT_BATCH_SIZE, rotate_key
from server.limits import uvicorn_limits
from server.models import ApiToken, utcnow
from server.pgbroker import start_broker
from server.runners import is_alive, request_drain, still_running
from server.secretbox import SecretKeyError, generate_key, load_secret_box
from server.settings import WILDCARD_ADDRESSES, Settings

T = TypeVar("T")
PASSWORD_ENV = "CORRAL_USER_PASSWORD"  # noqa: S105 - the variable's name, not a password
FIRST_ADMIN = "admin"


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


def load_settings(**overrides: Any) -> Settings:
    """Settings from the environment, with command-line overrides (those not None); one
    readable error."""
    try:
        settings = Settings()
        updates = {key: value for key, value in overrides.items() if value is not None}
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


def is_loopback(host: str) -> bool:
    """Whether `host` is reachable from this machine only."""
    name = host.strip().strip("[]").lower()
    if name == "localhost":
        return True
    try:
        return ipaddress.ip_address(name).is_loopback
    except ValueError:
        return False


async def _first_admin(session: AsyncSession) -> str | None:
    """On a new embedded installation: the user `admin` with a random password (returned
    to be shown once; only its hash is stored)."""
    if await has_users(session):
        return None
    password = secrets.token_urlsafe(16)
    user = await create_user(session, FIRST_ADMIN, password, "admin")
    await _record_user_change(session, "createUser", user.id, name=user.name, role=user.role)
    try:
        await session.commit()
    except IntegrityError:  # another `corral serve` made it a moment ago
        return None
    return password


async def _prepare_serve(settings: Settings) -> str | None:
    """Prepare the database; refuse to listen beyond this machine with no admin to log in;
    make the first admin of a new embedded installation (its password is returned)."""
    engine = create_engine(settings)
    try:
        await prepare_database(settings, engine)
        async with create_sessionmaker(engine)() as session:
            if not is_loopback(settings.host) and await count_admins(session) == 0:
                raise CliError(
                    f"refusing to listen on {settings.host} (beyond this machine) while no admin "
                    "user exists: create one first with `corral user create NAME`"
                )
            return await _first_admin(session) if settings.is_embedded else None
    finally:
        await engine.dispose()


def print_first_admin(password: str) -> None:
    """Show the first admin's password, once, on the console (never through logging)."""
    print(
        f"Corral made the first admin user: name {FIRST_ADMIN!r}, password {password}\n"
        "  This password is shown only this once. Log in at /login, then change it with "
        f"`corral user set-password {FIRST_ADMIN}`.",
        flush=True,
    )


def draining_server(config: Any, app: Any) -> Any:
    """uvicorn's server, whose shutdown signals also reach the embedded runner at once: the
    first begins its drain while the HTTP side winds down (the lifespan's end waits for
    it), the next stops what still runs."""
    import uvicorn

    class DrainingServer(uvicorn.Server):
        def handle_exit(self, sig: int, frame: Any) -> None:
            super().handle_exit(sig, frame)
            supervisor = getattr(app.state, "supervisor", None)
            if supervisor is None:
                return
            with contextlib.suppress(RuntimeError):  # no loop runs yet (or any more)
                loop = asyncio.get_running_loop()
                loop.call_soon_threadsafe(supervisor.on_shutdown_signal)

    return DrainingServer(config)


def cmd_serve(args: argparse.Namespace) -> None:
    import uvicorn

    settings = load_settings(host=args.host, port=args.port)
    first_password = asyncio.run(_prepare_serve(settings))
    if first_password is not None:
        print_first_admin(first_password)
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
    server = draining_server(config, app)
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


def cmd_runner(args: argparse.Namespace) -> None:
    labels = None if args.label is None else ",".join(args.label)
    settings = load_settings(
        runner_name=args.name, runner_labels=labels, drain_seconds=args.drain_seconds
    )
    if args.drain:
        drain_runners(settings, settings.resolved_runner_name)
        return
    if settings.is_embedded:
        raise CliError(
            "`corral runner` needs a shared PostgreSQL (CORRAL_DATABASE_URL); on the embedded "
            "SQLite, `corral serve` runs commands itself"
        )
    print_protection(settings)
    freeze_startup_heap()
    asyncio.run(run_standalone_runner(settings))


DRAIN_WATCH_SECONDS = 0.5


def drain_runners(settings: Settings, name: str) -> None:
    """`corral runner --drain`: ask the alive runners of this name (on any host) to drain,
    then wait until each has stopped (a runner that dies meanwhile is said so)."""

    async def ask(session: AsyncSession) -> list[str]:
        rows = await request_drain(session, name, settings.lease_seconds)
        if not rows:
            raise CliError(f"no runner named {name!r} is alive (see GraphQL `runners`)")
        await record_event(
            session,
            principal=CLI,
            action="drainRunner",
            outcome="ok",
            object_type="runner",
            object_id=name,
            detail={"runners": ", ".join(row.runner_id for row in rows)},
        )
        return [row.runner_id for row in rows]

    async def run() -> None:
        engine = create_engine(settings)
        try:
            await prepare_database(settings, engine)
            sessions = create_sessionmaker(engine)
            async with sessions() as session:
                try:
                    asked = await ask(session)
                except InvalidInput as exc:
                    raise CliError(_describe(exc)) from None
                await session.commit()
            await announce_drain(engine, settings)
            print(
                f"corral: asked {len(asked)} runner(s) named {name!r} to drain: "
                f"{', '.join(asked)}; waiting until they stop",
                flush=True,
            )
            await wait_stopped(sessions, asked, settings)
        finally:
            await engine.dispose()

    asyncio.run(run())


async def announce_drain(engine: Any, settings: Settings) -> None:
    """Wake the runners at once (on PostgreSQL, NOTIFY; elsewhere their heartbeat reads it)."""
    broker = await start_broker(engine, settings.subscriber_buffer_bytes)
    try:
        broker.publish(DRAIN_TOPIC, None)
    finally:
        await broker.close()


async def wait_stopped(sessions: Any, runner_ids: list[str], settings: Settings) -> None:
    """Until every one of these runners stopped, or its heartbeat stopped (it died)."""
    waiting = set(runner_ids)
    while waiting:
        async with sessions() as session:
            rows = {row.runner_id: row for row in await still_running(session, list(waiting))}
        for runner_id in sorted(waiting - set(rows)):
            print(f"corral: runner {runner_id} has stopped", flush=True)
        waiting &= set(rows)
        for runner_id, row in rows.items():
            if not is_alive(row, settings.lease_seconds, utcnow()):
                print(f"corral: runner {runner_id} stopped heartbeating (dead?)", flush=True)
                waiting.discard(runner_id)
        if waiting:
            await asyncio.sleep(DRAIN_WATCH_SECONDS)


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

    async def record(session: AsyncSession) -> None:
        detail = {"reencrypted": dict(report.counts)}
        await record_event(session, principal=CLI, action="rotateKey", outcome="ok", detail=detail)

    run_in_session(settings, record)
    for line in report.lines():
        print(line)


def cmd_schema(_args: argparse.Namespace) -> None:
    from graphql_schema.schema import schema_sdl

    sys.stdout.write(schema_sdl())


# --- corral user ------------------------------------------------------------------------


def _describe(exc: InvalidInput) -> str:
    return "; ".join(f"{'.'.join(error.field)}: {error.message}" for error in exc.errors)


def run_in_session(settings: Settings, work: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """Run `work` in one database session (committed when it succeeds); a user's mistake
    (InvalidInput) becomes a CliError."""

    async def run() -> T:
        engine = create_engine(settings)
        try:
            await prepare_database(settings, engine)
            async with create_sessionmaker(engine)() as session:
                try:
                    result = await work(session)
                except InvalidInput as exc:
                    raise CliError(_describe(exc)) from None
                await session.commit()
                return result
        finally:
            await engine.dispose()

    return asyncio.run(run())


def read_new_password() -> str:
    """A new password: from CORRAL_USER_PASSWORD (scripts), else asked twice."""
    password = os.environ.get(PASSWORD_ENV)
    if password is None:
        try:
            password = getpass.getpass("Password: ")
            again = getpass.getpass("Password again: ")
        except EOFError:
            raise CliError(f"no password given (type it, or set {PASSWORD_ENV})") from None
        if password != again:
            raise CliError("the two passwords differ")
    try:
        return check_password(password)
    except InvalidInput as exc:
        raise CliError(_describe(exc)) from None


async def _record_user_change(
    session: AsyncSession, action: str, user_id: int, **detail: str
) -> None:
    await record_event(
        session,
        principal=CLI,
        action=action,
        outcome="ok",
        object_type="user",
        object_id=str(user_id),
        detail=detail,
    )


def cmd_user_create(args: argparse.Namespace) -> None:
    settings = load_settings()
    password = read_new_password()

    async def work(session: AsyncSession) -> str:
        user = await create_user(session, args.name, password, args.role)
        await _record_user_change(session, "createUser", user.id, name=user.name, role=user.role)
        return f"user {user.name!r} created ({user.role})"

    print(run_in_session(settings, work))


def cmd_user_list(_args: argparse.Namespace) -> None:
    settings = load_settings()

    async def work(session: AsyncSession) -> list[tuple[str, ...]]:
        return [
            (
                user.name,
                user.role,
                f"{user.created_at:%Y-%m-%d %H:%M}",
                "never" if user.last_login_at is None else f"{user.last_login_at:%Y-%m-%d %H:%M}",
            )
            for user in await list_users(session)
        ]

    rows = [("NAME", "ROLE", "CREATED (UTC)", "LAST LOGIN (UTC)"), *run_in_session(settings, work)]
    widths = [max(len(row[column]) for row in rows) for column in range(3)]
    for row in rows:
        padded = [cell.ljust(width) for cell, width in zip(row[:3], widths, strict=True)]
        print("  ".join([*padded, row[3]]))


def cmd_user_set_password(args: argparse.Namespace) -> None:
    settings = load_settings()
    password = read_new_password()

    async def work(session: AsyncSession) -> str:
        user = await set_password(session, args.name, password)
        await _record_user_change(session, "setUserPassword", user.id, name=user.name)
        return f"password of {user.name!r} changed; their sessions are ended"

    print(run_in_session(settings, work))


def cmd_user_delete(args: argparse.Namespace) -> None:
    settings = load_settings()

    async def work(session: AsyncSession) -> str:
        user = await delete_user(session, args.name)
        await _record_user_change(session, "deleteUser", user.id, name=user.name)
        return f"user {user.name!r} deleted; their sessions are ended, their API tokens revoked"

    print(run_in_session(settings, work))


def add_user_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    user = commands.add_parser("user", help="manage the users who log in to the panel")
    actions = user.add_subparsers(dest="action", required=True, metavar="ACTION")
    create = actions.add_parser(
        "create", help=f"add a user (password asked twice, or from {PASSWORD_ENV})"
    )
    create.add_argument("name")
    create.add_argument("--role", default="admin", help="admin (the default) or viewer")
    create.set_defaults(func=cmd_user_create)
    actions.add_parser("list", help="list users: name, role, created, last login").set_defaults(
        func=cmd_user_list
    )
    change = actions.add_parser(
        "set-password", help="change a user's password (ends their sessions)"
    )
    change.add_argument("name")
    change.set_defaults(func=cmd_user_set_password)
    delete = actions.add_parser("delete", help="remove a user (never the last admin)")
    delete.add_argument("name")
    delete.set_defaults(func=cmd_user_delete)


# --- corral token -----------------------------------------------------------------------

TOKEN_DAYS_MAX = 3650


def _token_days(text: str | None) -> timedelta | None:
    if text is None:
        return None
    days = text.strip()
    # ASCII digits only ("²" passes isdigit() but not int()), and few (int() refuses 4,300+).
    if not (days.isascii() and days.isdigit() and len(days) < 12):
        raise CliError(f"--expires-in-days must be a whole number from 1 to {TOKEN_DAYS_MAX}")
    if not 1 <= int(days) <= TOKEN_DAYS_MAX:
        raise CliError(f"--expires-in-days must be a whole number from 1 to {TOKEN_DAYS_MAX}")
    return timedelta(days=int(days))


def _token_pk(text: str) -> int:
    """A token's id as `corral token list` shows it, or its GraphQL ID."""
    if text.isascii() and text.isdigit() and int(text) <= MAX_PK:
        return int(text)
    decoded = decode_global_id(text)
    if decoded is None or decoded[0] != "ApiToken":
        raise CliError("the token ID must be a number from `corral token list`")
    return decoded[1]


def run_with_tokens(
    settings: Settings, work: Callable[[AsyncSession, TokenHasher], Awaitable[T]]
) -> T:
    """`run_in_session`, with the installation's token hasher."""

    async def with_hasher(session: AsyncSession) -> T:
        return await work(session, await load_token_hasher(session, load_secret_box(settings)))

    return run_in_session(settings, with_hasher)


async def _record_token_change(session: AsyncSession, action: str, token: ApiToken) -> None:
    await record_event(
        session,
        principal=CLI,
        action=action,
        outcome="ok",
        object_type="api_token",
        object_id=str(token.id),
        detail={"name": token.name, "role": token.role},
    )


def cmd_token_create(args: argparse.Namespace) -> None:
    settings = load_settings()
    lifetime = _token_days(args.expires_in_days)
    expires_at = None if lifetime is None else utcnow() + lifetime

    async def work(session: AsyncSession, hasher: TokenHasher) -> tuple[ApiToken, str]:
        token, plaintext = await create_api_token(
            session, hasher, name=args.name, role=args.role, created_by=CLI, expires_at=expires_at
        )
        await _record_token_change(session, "createApiToken", token)
        return token, plaintext

    token, plaintext = run_with_tokens(settings, work)
    print(plaintext, flush=True)  # alone on stdout: TOKEN=$(corral token create ...)
    until = "never expires" if token.expires_at is None else f"expires {token.expires_at:%Y-%m-%d}"
    print(
        f"corral: API token {token.id} {token.name!r} ({token.role}, {until}) created; it is "
        "printed above once and cannot be shown again. Send it as `Authorization: Bearer ...`.",
        file=sys.stderr,
    )


def _when(moment: datetime | None) -> str:
    return "-" if moment is None else f"{moment:%Y-%m-%d %H:%M}Z"


def _token_row(token: ApiToken, now: datetime) -> tuple[str, ...]:
    state = "active" if token_is_active(token, now) else "expired"
    if token.revoked_at is not None:
        state = "revoked"
    return (
        str(token.id),
        token.name,
        token.role,
        state,
        token.preview,
        _when(token.created_at),
        _when(token.expires_at),
        _when(token.last_used_at),
    )


def cmd_token_list(_args: argparse.Namespace) -> None:
    settings = load_settings()

    async def work(session: AsyncSession) -> list[ApiToken]:
        return await list_api_tokens(session)

    now = utcnow()
    print("ID\tNAME\tROLE\tSTATE\tPREVIEW\tCREATED\tEXPIRES\tLAST USED")
    for token in run_in_session(settings, work):
        print("\t".join(_token_row(token, now)))


def cmd_token_revoke(args: argparse.Namespace) -> None:
    settings = load_settings()
    pk = _token_pk(args.id.strip())

    async def work(session: AsyncSession) -> str:
        token = await revoke_api_token(session, pk)
        await _record_token_change(session, "revokeApiToken", token)
        return f"API token {token.id} {token.name!r} is revoked: requests with it are refused"

    print(run_in_session(settings, work))


def add_token_commands(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    token = commands.add_parser("token", help="create, list and revoke API tokens")
    actions = token.add_subparsers(dest="action", required=True, metavar="ACTION")
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

    runner = commands.add_parser(
        "runner", help="run commands only (no API), beside `corral serve` on a shared PostgreSQL"
    )
    runner.add_argument("--name", help="this runner's name (default CORRAL_RUNNER_NAME or host)")
    runner.add_argument(
        "--label",
        action="append",
        metavar="LABEL",
        help="a label of this runner (repeatable; replaces CORRAL_RUNNER_LABELS)",
    )
    runner.add_argument(
        "--drain-seconds",
        type=float,
        metavar="S",
        help="when it drains (SIGTERM, SIGINT, --drain), how long its running commands may "
        "go on (default CORRAL_DRAIN_SECONDS, 30); then they are stopped and put back",
    )
    runner.add_argument(
        "--drain",
        action="store_true",
        help="start no runner: ask the running runners named --name (default: this host's "
        "name), on any host, to drain, and wait until they have stopped",
    )
    runner.set_defaults(func=cmd_runner)

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
    add_user_commands(commands)
    add_token_commands(commands)
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
