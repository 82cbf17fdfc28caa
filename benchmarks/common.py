"""What the benchmarks share: throwaway databases, an in-process uvicorn server, client
processes, percentiles and output.

Clients that stream or load the server (the SSE reader, the GraphQL poster) run in their own
process (`python -m benchmarks.common ROLE`), so their CPU never shares the server's event
loop. They speak JSON lines: `ready`, then one job on stdin, then events and a `result`.
Progress goes to stderr; a benchmark prints exactly one JSON object on stdout.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import json
import logging
import math
import os
import random
import shutil
import socket
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

PG_ENV = "CORRAL_BENCH_POSTGRES_URL"
DEFAULT_PG_URL = "postgresql+asyncpg://postgres@127.0.0.1:5432/test"
ROOT = Path(__file__).resolve().parent.parent
BACKENDS = ("sqlite", "postgresql")
FINAL_STATUSES = ("SUCCEEDED", "FAILED", "TIMED_OUT", "CANCELLED")
# The benchmark's commands get ids above this. Small ids are in every Corral database on the
# host, and a runner that recovers "its" command 2 by killing whatever carries
# CORRAL_COMMAND_ID=2 (as runner/process.py did before per-run markers) would kill ours.
ID_FLOOR = random.randrange(10**6, 10**9)  # noqa: S311 - not cryptography

RUN_COMMAND = """
mutation Run($input: RunCommandInput!) {
  runCommand(input: $input) { command { id status } userErrors { field message code } }
}
"""


# -- output ------------------------------------------------------------------------------


def progress(message: str) -> None:
    """Human progress, on stderr."""
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def print_result(result: dict[str, Any]) -> None:
    """The benchmark's one JSON object, on stdout."""
    sys.stdout.write(json.dumps(result, indent=2) + "\n")
    sys.stdout.flush()


def percentiles(samples: list[float], digits: int = 2) -> dict[str, Any]:
    """p50/p90/p99/max/mean of samples (linear interpolation between closest ranks)."""
    if not samples:
        return {"n": 0, "p50": None, "p90": None, "p99": None, "max": None, "mean": None}
    ordered = sorted(samples)

    def at(q: float) -> float:
        pos = q * (len(ordered) - 1)
        low = math.floor(pos)
        high = min(low + 1, len(ordered) - 1)
        return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)

    return {
        "n": len(ordered),
        "p50": round(at(0.50), digits),
        "p90": round(at(0.90), digits),
        "p99": round(at(0.99), digits),
        "max": round(ordered[-1], digits),
        "mean": round(sum(ordered) / len(ordered), digits),
    }


def machine(load_at_start: float) -> dict[str, Any]:
    """What the numbers were measured on (other load on the machine skews them)."""
    return {
        "cpus": os.cpu_count(),
        "loadavg_1m_at_start": round(load_at_start, 2),
        "loadavg_1m_at_end": round(os.getloadavg()[0], 2),
        "python": sys.version.split()[0],
    }


class CpuClock:
    """CPU seconds since creation: this thread (the event loop's) and the whole process."""

    def __init__(self) -> None:
        self.thread = time.thread_time()
        self.process = time.process_time()

    def read(self) -> dict[str, float]:
        return {
            "event_loop_thread": round(time.thread_time() - self.thread, 3),
            "process": round(time.process_time() - self.process, 3),
        }


def parse_backends(value: str) -> list[str]:
    if value == "both":
        return list(BACKENDS)
    if value not in BACKENDS:
        raise SystemExit(f"--backend must be sqlite, postgresql or both, not {value!r}")
    return [value]


def decode_command_pk(global_id: str) -> int:
    """The integer key of a Relay `Command:<pk>` ID."""
    kind, _, raw = base64.b64decode(global_id).decode().partition(":")
    if kind != "Command":
        raise ValueError(f"not a Command ID: {global_id!r}")
    return int(raw)


# -- databases ---------------------------------------------------------------------------


def postgres_admin_url() -> str:
    return os.environ.get(PG_ENV, "").strip() or DEFAULT_PG_URL


def asyncpg_dsn(sqlalchemy_url: str) -> str:
    """A SQLAlchemy `postgresql+asyncpg://` URL as a plain libpq DSN for asyncpg.connect."""
    from sqlalchemy.engine import make_url

    url = make_url(sqlalchemy_url).set(drivername="postgresql")
    return url.render_as_string(hide_password=False)


async def _admin_execute(admin_url: str, statement: str) -> None:
    from sqlalchemy import text
    from sqlalchemy.ext.asyncio import create_async_engine

    engine = create_async_engine(admin_url, isolation_level="AUTOCOMMIT")
    try:
        async with engine.connect() as connection:
            await connection.execute(text(statement))
    finally:
        await engine.dispose()


async def _migrate(settings: Any) -> None:
    """Migrate; then make new commands' ids start above ID_FLOOR."""
    from sqlalchemy import text

    from server import migrate
    from server.db import create_engine, create_sessionmaker
    from server.models import Command

    engine = create_engine(settings)
    try:
        await migrate.upgrade(engine)
        async with create_sessionmaker(engine)() as session, session.begin():
            if engine.dialect.name == "postgresql":
                await session.execute(
                    text("SELECT setval(pg_get_serial_sequence('commands', 'id'), :floor)"),
                    {"floor": ID_FLOOR},
                )
            else:  # SQLite hands out max(id) + 1: a finished placeholder at the floor
                session.add(
                    Command(id=ID_FLOOR, source="(benchmark id floor)", argv=[], status="SUCCEEDED")
                )
    finally:
        await engine.dispose()


@asynccontextmanager
async def backend_settings(backend: str, workdir: Path, **overrides: Any) -> AsyncIterator[Any]:
    """Settings for a fresh, migrated database: SQLite in `workdir`, or a throwaway
    PostgreSQL database (created here, dropped on exit)."""
    from sqlalchemy.engine import make_url

    from server.secretbox import generate_key
    from server.settings import Settings

    data_dir = workdir / f"data-{backend}"
    data_dir.mkdir(parents=True)
    key = generate_key()
    if backend == "sqlite":
        settings = Settings(data_dir=data_dir, secret_key=key, auto_migrate=False, **overrides)
        await _migrate(settings)
        yield settings
        return
    admin = postgres_admin_url()
    name = f"corral_bench_{os.getpid()}_{uuid.uuid4().hex[:8]}"
    try:
        await _admin_execute(admin, f'CREATE DATABASE "{name}"')
    except OSError as exc:
        raise SystemExit(f"PostgreSQL at {admin} is unreachable ({PG_ENV}): {exc}") from exc
    try:
        url = make_url(admin).set(database=name).render_as_string(hide_password=False)
        settings = Settings(
            data_dir=data_dir, database_url=url, secret_key=key, auto_migrate=False, **overrides
        )
        await _migrate(settings)
        yield settings
    finally:
        await _admin_execute(admin, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def observer_engine(settings: Any) -> Any:
    """An engine for the benchmark's own polling. Plain: on SQLite it does not take the
    write lock for reads (Corral's engine does, see server/db.py), so polling never
    competes with the writer."""
    from sqlalchemy.ext.asyncio import create_async_engine

    return create_async_engine(settings.resolved_database_url)


async def scalar(engine: Any, sql: str, **params: Any) -> Any:
    from sqlalchemy import text

    async with engine.connect() as connection:
        return (await connection.execute(text(sql), params)).scalar()


async def wait_for_value(
    probe: Callable[[], Any],
    done: Callable[[Any], bool],
    *,
    timeout: float,
    interval: float = 0.01,
    what: str = "condition",
) -> tuple[float, Any]:
    """Poll `await probe()` until `done(value)`; returns (time.time() when seen, value)."""
    deadline = time.monotonic() + timeout
    while True:
        value = await probe()
        if done(value):
            return time.time(), value
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not reached in {timeout:.0f}s (last value {value!r})")
        await asyncio.sleep(interval)


# -- the server --------------------------------------------------------------------------


def log_server_to(path: Path) -> None:
    """Log like `corral serve` (INFO, uvicorn's access log included), but to a file:
    the same formatting cost, and stdout stays the benchmark's JSON."""
    root = logging.getLogger()
    for handler in list(root.handlers):
        root.removeHandler(handler)
        handler.close()
    handler = logging.FileHandler(path)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    logging.getLogger("alembic").setLevel(logging.WARNING)


@contextlib.contextmanager
def server_log(workdir: Path, benchmark: str) -> Iterator[Path]:
    """Log the server to a file in `workdir`; if the benchmark fails, keep a copy of it."""
    path = workdir / "server.log"
    log_server_to(path)
    try:
        yield path
    except BaseException:
        kept = Path(tempfile.gettempdir()) / f"corral-bench-{benchmark}-{os.getpid()}.log"
        with contextlib.suppress(OSError):
            shutil.copy(path, kept)
            progress(f"failed; the server log is kept at {kept}")
        raise


API_TOKEN: str | None = None  # an admin token of the app `serve` runs; clients send it


async def issue_admin_token(app: Any) -> str:
    """An admin API token of the running app, as `corral token create` makes one."""
    from server.auth import create_api_token

    services = app.state.services
    async with services.sessionmaker() as session:
        _token, plaintext = await create_api_token(
            session, services.token_hasher, name="benchmark", role="admin"
        )
        await session.commit()
    return plaintext


def auth_headers(token: str | None = None) -> dict[str, str]:
    """The Authorization header of `token` (default: the served app's)."""
    token = token or API_TOKEN
    return {} if token is None else {"Authorization": f"Bearer {token}"}


@asynccontextmanager
async def serve(app: Any, settings: Any = None) -> AsyncIterator[str]:
    """Run `app` with uvicorn in this process on a free 127.0.0.1 port; yields its base URL.
    The heap is settled first and uvicorn gets the limits `corral serve` gives it (from
    `settings`, default: the environment's)."""
    import uvicorn

    from server.cli import freeze_startup_heap
    from server.limits import uvicorn_limits
    from server.settings import Settings

    freeze_startup_heap()

    # proto=IPPROTO_TCP matters: asyncio sets TCP_NODELAY on accepted connections only when
    # the listening socket says so, as `corral serve`'s own (getaddrinfo) socket does. With
    # proto 0, keep-alive responses (headers and body written apart) wait ~40 ms on Nagle.
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(
        app,
        host="127.0.0.1",
        port=port,
        lifespan="on",
        log_config=None,
        log_level="info",
        **uvicorn_limits(settings or Settings()),
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                task.result()
                raise RuntimeError("the server stopped during startup (see the server log)")
            await asyncio.sleep(0.02)
        global API_TOKEN
        API_TOKEN = await issue_admin_token(app)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        try:
            await asyncio.wait_for(asyncio.shield(task), 30)
        except TimeoutError:
            server.force_exit = True
            await task
        sock.close()


async def graphql(http: Any, query: str, **variables: Any) -> dict[str, Any]:
    """POST one operation with an httpx.AsyncClient; raises on errors."""
    response = await http.post("/graphql", json={"query": query, "variables": variables})
    response.raise_for_status()
    body: dict[str, Any] = response.json()
    if body.get("errors"):
        raise RuntimeError(f"GraphQL errors: {body['errors']}")
    data: dict[str, Any] = body["data"]
    return data


async def run_command(http: Any, **command_input: Any) -> str:
    """runCommand; returns the command's Relay ID."""
    data = await graphql(http, RUN_COMMAND, input=command_input)
    payload = data["runCommand"]
    if payload["userErrors"]:
        raise RuntimeError(f"runCommand refused: {payload['userErrors']}")
    command_id: str = payload["command"]["id"]
    return command_id


# -- client processes --------------------------------------------------------------------


class Worker:
    """A client in its own process; see the module docstring."""

    def __init__(self, process: asyncio.subprocess.Process, role: str) -> None:
        self.process = process
        self.role = role

    @classmethod
    async def start(cls, role: str) -> Worker:
        process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "benchmarks.common",
            role,
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
            cwd=ROOT,
            limit=64 * 1024 * 1024,
        )
        worker = cls(process, role)
        await worker.expect("ready", timeout=60)
        return worker

    async def send(self, job: dict[str, Any]) -> None:
        assert self.process.stdin is not None
        job = {"token": API_TOKEN, **job}
        self.process.stdin.write(json.dumps(job).encode() + b"\n")
        await self.process.stdin.drain()

    async def read(self, timeout: float) -> dict[str, Any]:
        assert self.process.stdout is not None
        line = await asyncio.wait_for(self.process.stdout.readline(), timeout)
        if not line:
            code = await self.process.wait()
            raise RuntimeError(f"the {self.role} client exited ({code}) without a result")
        message: dict[str, Any] = json.loads(line)
        if message.get("event") == "failed":
            raise RuntimeError(f"the {self.role} client failed: {message.get('error')}")
        return message

    async def expect(self, event: str, timeout: float) -> dict[str, Any]:
        message = await self.read(timeout)
        if message.get("event") != event:
            raise RuntimeError(f"the {self.role} client sent {message!r}, expected {event!r}")
        return message

    async def close(self) -> None:
        if self.process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.process.kill()
        await self.process.wait()


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def _sse_client(job: dict[str, Any]) -> dict[str, Any]:
    """Read one command's SSE stream to its final status.

    Counts stdout `log` events, checks their seqs are gapless and unrepeated, counts masked
    and leaked secrets; in latency mode each line starts `t=<write time> `, and the latency
    is the arrival time of the chunk that carried it minus that.
    """
    import httpx

    url: str = job["url"]
    latency_mode = job.get("mode") == "latency"
    secret: str = job.get("secret") or "\0"
    lines = system_lines = gaps = repeats = redacted = leaked = 0
    last_seq = 0
    first_at = last_at = None
    latencies: list[float] = []
    final_status = None
    timeout = httpx.Timeout(job.get("timeout", 120.0), connect=10.0)
    with (
        httpx.Client(timeout=timeout) as client,
        client.stream(
            "GET", url, headers={"accept": "text/event-stream", **auth_headers(job["token"])}
        ) as response,
    ):
        _emit({"event": "connected", "status": response.status_code, "at": time.time()})
        if response.status_code != 200:
            raise RuntimeError(f"SSE answered {response.status_code}")
        buffer = b""
        for chunk in response.iter_raw():
            now = time.time()
            buffer += chunk
            *events, buffer = buffer.split(b"\r\n\r\n")
            # The log events' data are decoded together (one json.loads a chunk): this
            # client shares the machine with the server it measures, so it stays lean.
            seqs: list[int] = []
            payloads: list[bytes] = []
            for raw in events:
                kind = data = seq = None
                for field in raw.split(b"\r\n"):
                    if field.startswith(b"event: "):
                        kind = field[7:]
                    elif field.startswith(b"data: "):
                        data = field[6:]
                    elif field.startswith(b"id: "):
                        seq = int(field[4:])
                if kind == b"log" and data is not None and seq is not None:
                    seqs.append(seq)
                    payloads.append(data)
                elif kind == b"status" and data is not None:
                    status = json.loads(data)
                    if status.get("final"):
                        final_status = status["status"]
            decoded = json.loads(b"[" + b",".join(payloads) + b"]") if payloads else []
            for seq, line in zip(seqs, decoded, strict=True):
                if seq <= last_seq:
                    repeats += 1
                    continue
                if seq != last_seq + 1:
                    gaps += 1
                last_seq = seq
                if line["stream"].lower() != "stdout":  # spelled STDOUT, as in GraphQL
                    system_lines += 1
                    continue
                lines += 1
                first_at = first_at or now
                last_at = now
                text: str = line["text"]
                if "[redacted]" in text:
                    redacted += 1
                if secret in text:
                    leaked += 1
                if latency_mode and text.startswith("t="):
                    written = float(text[2 : text.index(" ")])
                    latencies.append((now - written) * 1000)
            if final_status is not None:
                break
    return {
        "client_cpu_seconds": round(time.process_time(), 3),
        "lines": lines,
        "system_lines": system_lines,
        "first_at": first_at,
        "last_at": last_at,
        "seq_gaps": gaps,
        "seq_repeats": repeats,
        "redacted": redacted,
        "leaked": leaked,
        "final_status": final_status,
        "latency_ms": percentiles(latencies) if latency_mode else None,
    }


def _graphql_poster(job: dict[str, Any]) -> dict[str, Any]:
    """POST `query` once per input in `inputs`, one after another; each round trip timed."""
    import httpx

    latencies: list[float] = []
    ids: list[str] = []
    errors: list[Any] = []
    with httpx.Client(
        base_url=job["url"], timeout=30.0, headers=auth_headers(job["token"])
    ) as client:
        for command_input in job["inputs"]:
            body = {"query": job["query"], "variables": {"input": command_input}}
            started = time.perf_counter()
            response = client.post("/graphql", json=body)
            latencies.append((time.perf_counter() - started) * 1000)
            answer = response.json()
            payload = (answer.get("data") or {}).get("runCommand") or {}
            if answer.get("errors") or payload.get("userErrors") or response.status_code != 200:
                errors.append(answer.get("errors") or payload.get("userErrors"))
                continue
            ids.append(payload["command"]["id"])
    return {"latencies_ms": latencies, "ids": ids, "errors": errors[:5], "error_count": len(errors)}


def _page_getter(job: dict[str, Any]) -> dict[str, Any]:
    """GET `url` `requests` times, one after another on one keep-alive connection; each
    round trip timed (the body read in full)."""
    import httpx

    latencies: list[float] = []
    status = size = 0
    with httpx.Client(headers=auth_headers(job["token"]), timeout=60.0) as client:
        client.get(job["url"])  # connect and warm up, not timed
        for _ in range(job["requests"]):
            started = time.perf_counter()
            response = client.get(job["url"])
            body = response.content
            latencies.append((time.perf_counter() - started) * 1000)
            status, size = response.status_code, len(body)
            if status != 200:
                raise RuntimeError(f"GET {job['url']} answered {status}")
    return {"latencies_ms": latencies, "status": status, "bytes": size}


def _tail_reader(job: dict[str, Any]) -> dict[str, Any]:
    """Read the panel's live tail (SSE of HTML fragments) to its `end` event, as a browser's
    EventSource would; counts the lines (one `class="line ` span each) and the bytes."""
    import httpx

    lines = size = 0
    ended = False
    started = time.perf_counter()
    first_event_ms = None
    carry = b""
    timeout = httpx.Timeout(job.get("timeout", 120.0), connect=10.0)
    headers = {"accept": "text/event-stream", **auth_headers(job["token"])}
    with (
        httpx.Client(timeout=timeout) as client,
        client.stream("GET", job["url"], headers=headers) as response,
    ):
        if response.status_code != 200:
            raise RuntimeError(f"the tail answered {response.status_code}")
        for chunk in response.iter_raw():
            if first_event_ms is None:
                first_event_ms = round((time.perf_counter() - started) * 1000, 1)
            size += len(chunk)
            window = carry + chunk
            lines += window.count(b'class="line ') - carry.count(b'class="line ')
            if b"event: end" in window:
                ended = True
                break
            carry = window[-32:]
    return {
        "lines": lines,
        "bytes": size,
        "ended": ended,
        "seconds": time.perf_counter() - started,
        "first_event_ms": first_event_ms,
    }


def _poster(job: dict[str, Any]) -> dict[str, Any]:
    """POST the JSON `body` to `url` `requests` times, one after another on one keep-alive
    connection (after `warmup` untimed ones); each round trip timed, the body read in full.
    The last body is returned (parsed) so that the benchmark can compare answers."""
    import httpx

    latencies: list[float] = []
    status = size = 0
    body = job["body"]
    answer: bytes = b""
    with httpx.Client(headers=auth_headers(job["token"]), timeout=60.0) as client:
        for _ in range(job.get("warmup", 3)):
            client.post(job["url"], json=body)
        for _ in range(job["requests"]):
            started = time.perf_counter()
            response = client.post(job["url"], json=body)
            answer = response.content
            latencies.append((time.perf_counter() - started) * 1000)
            status, size = response.status_code, len(answer)
            if status != 200:
                raise RuntimeError(f"POST {job['url']} answered {status}: {answer[:300]!r}")
    return {"latencies_ms": latencies, "status": status, "bytes": size, "body": json.loads(answer)}


ROLES: dict[str, Callable[[dict[str, Any]], dict[str, Any]]] = {
    "sse": _sse_client,
    "graphql": _graphql_poster,
    "pages": _page_getter,
    "tail": _tail_reader,
    "posts": _poster,
}


def worker_main(role: str) -> int:
    # Every role's client library, imported before `ready` (~0.2 CPU-s): not on the clock,
    # where it took the server's second core while the ingest under test started.
    import httpx  # noqa: F401

    _emit({"event": "ready"})
    job = json.loads(sys.stdin.readline())
    try:
        result = ROLES[role](job)
    except Exception as exc:
        _emit({"event": "failed", "error": repr(exc)})
        return 1
    _emit({"event": "result", **result})
    return 0


if __name__ == "__main__":
    if len(sys.argv) != 2 or sys.argv[1] not in ROLES:
        raise SystemExit(f"usage: python -m benchmarks.common {{{','.join(ROLES)}}}")
    sys.exit(worker_main(sys.argv[1]))


def run_benchmark(
    name: str,
    parser: argparse.ArgumentParser,
    run_backend: Callable[[str, argparse.Namespace, Path], Awaitable[dict[str, Any]]],
) -> None:
    """Parse the arguments, run `run_backend` for each backend asked for, print the JSON."""
    args = parser.parse_args()
    started = time.monotonic()

    async def run_all() -> dict[str, Any]:
        results: dict[str, Any] = {}
        load = os.getloadavg()[0]
        with tempfile.TemporaryDirectory(prefix="corral-bench-") as tmp:
            workdir = Path(tmp)
            with server_log(workdir, name):
                for backend in parse_backends(args.backend):
                    results[backend] = await run_backend(backend, args, workdir)
        return {"benchmark": name, "backends": results, "machine": machine(load)}

    result = asyncio.run(run_all())
    result["wall_seconds"] = round(time.monotonic() - started, 1)
    print_result(result)
