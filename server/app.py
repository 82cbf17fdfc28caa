"""The ASGI app: `create_app(settings)` wires the database, secrets and routes in one lifespan."""

from __future__ import annotations

import asyncio
import logging
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import timedelta
from pathlib import Path
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.exc import IntegrityError
from sqlalchemy.ext.asyncio import AsyncEngine
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response
from starlette.routing import Mount, Route, WebSocketRoute
from starlette.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from graphql_schema.context import Context
from graphql_schema.schema import build_schema
from runner.renderpool import RenderPool
from runner.supervisor import Supervisor
from server import migrate
from server.access import AccessControl, Authenticator
from server.app_services import AppServices
from server.auth import SessionPolicy, TokenHasher, load_token_hasher
from server.broker import Broker
from server.csrf import CsrfProtection
from server.db import StreamSessions, create_engine, create_sessionmaker
from server.graphql_http import GRAPHIQL_CDN_ORIGIN, StrictGraphQL
from server.headers import SecurityHeaders, content_security_policy
from server.limits import request_walls
from server.login import login_routes
from server.logstream import stream_command_logs
from server.metrics import Metrics, RequestMetrics
from server.models import Command, CommandStatus
from server.outage import DatabaseOutage
from server.panel import panel_routes
from server.panel.assets import csp_origins
from server.pgbroker import PgBroker, start_broker
from server.secretbox import SecretBox, load_secret_box, verify_secret_box
from server.settings import Settings

log = logging.getLogger("corral.app")
CONTEXT_SCOPE_KEY = "corral.graphql_context"
READY_TIMEOUT_SECONDS = 3.0  # /readyz answers 503 after this long without the database
STATIC_DIR = Path(__file__).resolve().parent.parent / "static"


class StartupError(Exception):
    """Corral cannot start; the message says what to do."""


async def prepare_database(settings: Settings, engine: AsyncEngine) -> SecretBox:
    """Migrate (when configured to), then check the secret key against the database."""
    try:
        if settings.should_auto_migrate:
            await migrate.upgrade(engine)
        elif not await migrate.is_up_to_date(engine):
            raise StartupError("the database is not migrated to this version: run `corral migrate`")
    except OSError as exc:
        raise StartupError(f"cannot reach the database: {exc}") from exc
    box = load_secret_box(settings)
    for _ in range(3):
        async with create_sessionmaker(engine)() as session:
            try:
                await verify_secret_box(session, box)
                await session.commit()
                return box
            except IntegrityError:  # another process wrote the check a moment ago: check ours
                await session.rollback()
    raise StartupError("cannot store the secret key's check value in the database")


async def prepare_access(engine: AsyncEngine, box: SecretBox) -> TokenHasher:
    """The installation's token key (made on first start; two starting at once agree)."""
    for _ in range(3):
        async with create_sessionmaker(engine)() as session:
            try:
                hasher = await load_token_hasher(session, box)
                await session.commit()
                return hasher
            except IntegrityError:  # another process made it a moment ago: read theirs
                await session.rollback()
    raise StartupError("cannot store the API token key in the database")


def authenticator(services: AppServices) -> Authenticator:
    policy = SessionPolicy(
        idle=timedelta(seconds=services.settings.session_idle_seconds),
        absolute=timedelta(seconds=services.settings.session_max_seconds),
    )
    return Authenticator(services.sessionmaker, services.token_hasher, policy)


async def run_standalone_runner(settings: Settings) -> None:
    """`corral runner`: a supervisor without the API, until it has drained: SIGTERM or
    SIGINT begins the drain (a second one stops what still runs), and so does a drain
    request through the database (`corral runner --drain`)."""
    engine = create_engine(settings)
    broker: Broker | None = None
    try:
        box = await prepare_database(settings, engine)
        broker = await start_broker(engine, settings.subscriber_buffer_bytes)
        supervisor = Supervisor(settings, create_sessionmaker(engine), box, broker, Metrics())
        loop = asyncio.get_running_loop()
        early: list[int] = []  # a signal while it starts: the drain begins once it has
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, early.append, sig)
        await supervisor.start()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, supervisor.on_shutdown_signal)
        for _ in early:
            supervisor.on_shutdown_signal()
        print(f"Corral runner {supervisor.runner_id} ({supervisor.name}) is running", flush=True)
        try:
            await supervisor.stopped.wait()
        finally:
            await supervisor.drain()  # (done by now, unless this task was cancelled)
    finally:
        if broker is not None:
            await broker.close()
        await engine.dispose()


class GraphQLEndpoint(StrictGraphQL):
    """Strawberry's ASGI app, with Corral's per-request context (closed after the request)."""

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            context: Context | None = scope.get(CONTEXT_SCOPE_KEY)
            if context is not None:
                await context.close()

    async def get_context(self, request: Request | WebSocket, response: Any) -> Context:
        services: AppServices = request.app.state.services
        context = Context(app=services, request=request, response=response)
        request.scope[CONTEXT_SCOPE_KEY] = context
        return context


async def healthz(_request: Request) -> Response:
    return PlainTextResponse("ok")


async def readyz(request: Request) -> Response:
    engine: AsyncEngine = request.app.state.engine
    try:
        # Bounded: a database behind a network that drops packets would hang the probe
        # (and the orchestrator asking it) for the driver's connect timeout or longer.
        async with asyncio.timeout(READY_TIMEOUT_SECONDS):
            async with engine.connect() as connection:
                await connection.execute(text("SELECT 1"))
            if not await migrate.is_up_to_date(engine):
                return PlainTextResponse("database not migrated", status_code=503)
    except Exception as exc:
        log.warning("readiness check failed: %s %s", type(exc).__name__, exc)
        return PlainTextResponse("database unreachable", status_code=503)
    return PlainTextResponse("ready")


async def metrics_endpoint(request: Request) -> Response:
    services: AppServices = request.app.state.services
    async with services.sessionmaker() as session:
        rows = await session.execute(select(Command.status, func.count()).group_by(Command.status))
        counts = {status: float(count) for status, count in rows.all()}
    # Every status, zeros included: a series that appears only once non-zero breaks rate().
    services.metrics.status_counts = {s.value: counts.get(s, 0.0) for s in CommandStatus}
    body, content_type = services.metrics.render(request.headers.get("accept", ""))
    return Response(body, headers={"content-type": content_type})


def create_app(settings: Settings) -> Starlette:
    """Build the Corral ASGI app; resources start and stop in its lifespan."""

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        engine = create_engine(settings)
        stream_sessions = StreamSessions(settings)
        render_pool = RenderPool.from_settings(settings)
        supervisor: Supervisor | None = None
        broker: Broker | None = None
        try:
            box = await prepare_database(settings, engine)
            broker = await start_broker(engine, settings.subscriber_buffer_bytes)
            metrics = Metrics()
            services = AppServices(
                settings=settings,
                sessionmaker=create_sessionmaker(engine),
                secret_box=box,
                render_pool=render_pool,
                token_hasher=await prepare_access(engine, box),
                broker=broker,
                metrics=metrics,
                stream_reads=stream_sessions,
            )
            metrics.watch_status_counts(lambda: services.metrics.status_counts)
            if isinstance(broker, PgBroker):
                metrics.watch_broker(broker.counters)
            app.state.engine = engine
            app.state.services = services
            app.state.authenticator = authenticator(services)
            if settings.embedded_runner:
                supervisor = Supervisor(
                    settings, services.sessionmaker, box, services.broker, metrics, render_pool
                )
                await supervisor.start()
            app.state.supervisor = supervisor
            yield
        finally:
            if supervisor is not None:
                # A signal to `corral serve` began a drain (server/cli.py): it ends it.
                await (supervisor.drain() if supervisor.draining else supervisor.stop())
            if broker is not None:
                await broker.close()
            await render_pool.close()
            await stream_sessions.dispose()
            await engine.dispose()

    graphql = GraphQLEndpoint(
        build_schema(settings),
        graphql_ide="graphiql" if settings.graphiql else None,
        graphiql_cdn=settings.graphiql_cdn,
    )
    routes = [
        Route("/healthz", healthz),
        Route("/readyz", readyz),
        Route("/metrics", metrics_endpoint),
        Route("/graphql", graphql, methods=["GET", "POST"]),
        WebSocketRoute("/graphql", graphql),
        Route("/api/commands/{command_id}/logs/stream", stream_command_logs),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
        *login_routes(settings),
        *panel_routes(settings),
    ]
    cdn_origins = [GRAPHIQL_CDN_ORIGIN] if settings.graphiql_cdn else []
    cdn_origins += csp_origins(settings.panel_assets)
    policy = content_security_policy(sorted(set(cdn_origins)))
    middleware = [
        Middleware(RequestMetrics),
        Middleware(SecurityHeaders, html_policy=policy),
        *request_walls(settings),
        Middleware(AccessControl, metrics_allow=settings.metrics_allow),
        Middleware(DatabaseOutage),
        Middleware(CsrfProtection),
    ]
    return Starlette(routes=routes, lifespan=lifespan, middleware=middleware)
