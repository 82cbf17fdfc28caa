"""Scale-out (issue 14): commands drained by 1, 2 and 4 `corral runner` processes on one
PostgreSQL, and what cross-node log delivery adds to a line's latency.

    .venv/bin/python -m benchmarks.scale_out [--commands 400] [--runners 1,2,4]
        [--concurrency 4] [--rate 10000] [--seconds 3] [--rounds 2]

PostgreSQL only (several processes share the database). In one run:
1. drain, per runner count k: the API node (this process, uvicorn, no runner of its own)
   queues one `/bin/true` command by runCommand; it is copied N times in the database,
   held (`next_attempt_at` a day ahead). k `corral runner` processes start (each
   `--concurrency` slots) and say they run; then the hold is lifted in one UPDATE and the
   queue wake-up is sent (NOTIFY). The clock runs from there until all N are final in the
   database. CPU: the runner processes' own and their children's (utime+stime from /proc),
   this PostgreSQL database's backends', and the whole machine's (from /proc/stat: other
   load on the machine is in it).
2. latency: a child prints `t=<time.time()> ...` lines at `--rate` lines/s for
   `--seconds`; one SSE client (its own process) on the API node reports each line's
   arrival minus its write time. `in_process`: the line is run by a runner inside the API
   node's process (an embedded Supervisor: broker fan-out in memory). `cross_node`: by a
   `corral runner` process (runner -> database -> NOTIFY -> the API node reads the lines by
   seq -> SSE). Which runner runs a command is chosen by profile affinity (a profile pinned
   to each); the modes alternate for `--rounds` rounds. Target: cross-node p99 <= 2x
   in-process p99.
Prints one JSON object on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import shlex
import statistics
import sys
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import (
    FINAL_STATUSES,
    ROOT,
    Worker,
    auth_headers,
    backend_settings,
    decode_command_pk,
    graphql,
    observer_engine,
    percentiles,
    progress,
    run_benchmark,
    run_command,
    scalar,
    serve,
    wait_for_value,
)
from benchmarks.log_ingest import CHILD_PYTHON, write_child

COMMAND = "/bin/true"
TARGET_P99_RATIO_MAX = 2.0
RUNNER_START_TIMEOUT = 120.0
HOLD = "now() + interval '1 day'"
PROFILE = """mutation($name: String!, $affinity: String) {
  createProfile(input: {name: $name, runnerAffinity: $affinity}) {
    profile { id } userErrors { message } } }"""
EMBEDDED, REMOTE = "embedded", "remote"  # the latency runs' runner names
CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
CHILD_DIR = "child"  # the latency child's script: a folder of its own, readable in the sandbox


# -- CPU from /proc -------------------------------------------------------------------------


def process_cpu(pid: int) -> tuple[float, float]:
    """(own, reaped children's) CPU seconds of a process; (0, 0) once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0, 0.0
    utime, stime, cutime, cstime = (int(v) for v in fields[11:15])
    return (utime + stime) / CLOCK_TICKS, (cutime + cstime) / CLOCK_TICKS


def machine_cpu() -> tuple[float, float]:
    """(busy, total) CPU seconds of the whole machine since boot."""
    values = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = values[3] + values[4]  # idle + iowait
    return (sum(values) - idle) / CLOCK_TICKS, sum(values) / CLOCK_TICKS


async def backend_pids(engine: Any) -> list[int]:
    """The server processes of this database's connections (this engine's own included)."""
    from sqlalchemy import text

    async with engine.connect() as connection:
        rows = await connection.execute(
            text("SELECT pid FROM pg_stat_activity WHERE datname = current_database()")
        )
        return [int(row[0]) for row in rows]


class CpuMeter:
    """CPU used between start() and stop() by the runners, the database and the machine."""

    def __init__(self, engine: Any, runner_pids: list[int]) -> None:
        self.engine = engine
        self.runner_pids = runner_pids

    async def start(self) -> None:
        self.runners = [process_cpu(pid) for pid in self.runner_pids]
        self.pids = await backend_pids(self.engine)
        self.backends = {pid: process_cpu(pid)[0] for pid in self.pids}
        self.machine = machine_cpu()
        self.wall = time.perf_counter()

    async def stop(self) -> dict[str, Any]:
        wall = time.perf_counter() - self.wall
        busy, total = machine_cpu()
        runners = [process_cpu(pid) for pid in self.runner_pids]
        pids = set(self.pids) | set(await backend_pids(self.engine))
        database = sum(process_cpu(pid)[0] - self.backends.get(pid, 0.0) for pid in pids)
        own = sum(after[0] - before[0] for before, after in zip(self.runners, runners, strict=True))
        children = sum(
            after[1] - before[1] for before, after in zip(self.runners, runners, strict=True)
        )
        return {
            "runner_processes": round(own, 2),
            "runner_children": round(children, 2),
            "database_backends": round(database, 2),
            "machine_busy": round(busy - self.machine[0], 2),
            "machine_capacity": round(total - self.machine[1], 2),
            "wall": round(wall, 3),
        }


# -- runner processes -----------------------------------------------------------------------


def runner_env(settings: Any, folder: Path, concurrency: int) -> dict[str, str]:
    """What a `corral runner` on the benchmark's database needs, as an operator sets it."""
    return {
        **{k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")},
        "PYTHONPATH": str(ROOT),
        "CORRAL_DATABASE_URL": str(settings.database_url),
        "CORRAL_SECRET_KEY": settings.secret_key.get_secret_value(),
        "CORRAL_DATA_DIR": str(folder),
        "CORRAL_MAX_CONCURRENCY": str(concurrency),
        "CORRAL_SANDBOX": settings.sandbox,
        "CORRAL_SANDBOX_PATHS": json.dumps([str(p) for p in settings.sandbox_paths]),
        "CORRAL_SCHEDULES": "false",
        "CORRAL_LOG_LEVEL": "warning",
    }


async def _start_runner(name: str, env: dict[str, str], cwd: Path) -> asyncio.subprocess.Process:
    process = await asyncio.create_subprocess_exec(
        *(sys.executable, "-m", "server.cli", "runner", "--name", name),
        env=env,
        cwd=cwd,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    assert process.stdout is not None
    seen: list[bytes] = []
    async with asyncio.timeout(RUNNER_START_TIMEOUT):
        while b"is running" not in (line := await process.stdout.readline()):
            if not line:
                raise RuntimeError(f"runner {name} exited: {b''.join(seen).decode()[-2000:]}")
            seen.append(line)
    return process


async def _drain_output(process: asyncio.subprocess.Process) -> None:
    assert process.stdout is not None
    while await process.stdout.read(65536):
        pass


async def _stop_runner(process: asyncio.subprocess.Process) -> None:
    if process.returncode is None:
        process.terminate()
    try:
        await asyncio.wait_for(process.wait(), 60)
    except TimeoutError:
        process.kill()
        await process.wait()


@contextlib.asynccontextmanager
async def runner_processes(
    settings: Any, workdir: Path, names: list[str], concurrency: int
) -> AsyncIterator[list[asyncio.subprocess.Process]]:
    """`corral runner --name NAME` for each name, started side by side; SIGTERM at the end."""
    folders = [workdir / f"runner-{name}" for name in names]
    for folder in folders:
        folder.mkdir(exist_ok=True)
    outcomes = await asyncio.gather(
        *(
            _start_runner(name, runner_env(settings, folder, concurrency), folder)
            for name, folder in zip(names, folders, strict=True)
        ),
        return_exceptions=True,
    )
    started = [p for p in outcomes if isinstance(p, asyncio.subprocess.Process)]
    drains = [asyncio.create_task(_drain_output(p)) for p in started]
    try:
        for outcome in outcomes:
            if isinstance(outcome, BaseException):
                raise outcome
        yield started
    finally:
        await asyncio.gather(*(_stop_runner(p) for p in started))
        await asyncio.gather(*drains, return_exceptions=True)


# -- drain ----------------------------------------------------------------------------------


async def queue_held(http: httpx.AsyncClient, engine: Any, commands: int) -> int:
    """`commands` copies of one runCommand's row, held; the first copy's id."""
    from sqlalchemy import text

    from server.models import Command

    prototype = decode_command_pk(await run_command(http, commandString=COMMAND))
    columns = [c.name for c in Command.__table__.columns if c.name != "id"]
    values = [
        HOLD if c == "next_attempt_at" else "now()" if c == "created_at" else c for c in columns
    ]
    async with engine.begin() as connection:
        first = (
            (
                await connection.execute(
                    text(
                        f"INSERT INTO commands ({', '.join(columns)})"  # noqa: S608 - our names
                        f" SELECT {', '.join(values)} FROM commands, generate_series(1, :n)"
                        " WHERE id = :prototype RETURNING id"
                    ),
                    {"n": commands, "prototype": prototype},
                )
            )
            .scalars()
            .all()
        )
        await connection.execute(text("DELETE FROM commands WHERE id = :id"), {"id": prototype})
    return min(first)


async def release(engine: Any, broker: Any, first: int) -> None:
    """Lift the hold in one transaction, then wake the runners (as runCommand does)."""
    from sqlalchemy import text

    from server.broker import QUEUE_TOPIC

    async with engine.begin() as connection:
        await connection.execute(
            text("UPDATE commands SET next_attempt_at = NULL WHERE id >= :first"), {"first": first}
        )
    broker.publish(QUEUE_TOPIC, None)


def final_count(engine: Any, first: int) -> Any:
    statuses = ", ".join(f"'{s}'" for s in FINAL_STATUSES)
    return scalar(
        engine,
        f"SELECT count(*) FROM commands WHERE id >= :first AND status IN ({statuses})",  # noqa: S608
        first=first,
    )


async def drain(
    settings: Any,
    app: Any,
    http: httpx.AsyncClient,
    engine: Any,
    workdir: Path,
    runners: int,
    args: argparse.Namespace,
) -> dict[str, Any]:
    commands: int = args.commands
    first = await queue_held(http, engine, commands)
    names = [f"drain{runners}-{n}" for n in range(1, runners + 1)]
    progress(f"drain: {commands} x {COMMAND} by {runners} runner(s) of {args.concurrency} slots")
    async with runner_processes(settings, workdir, names, args.concurrency) as processes:
        meter = CpuMeter(engine, [p.pid for p in processes])
        await meter.start()
        started = time.perf_counter()
        await release(engine, app.state.services.broker, first)
        await wait_for_value(
            lambda: final_count(engine, first),
            lambda n: n >= commands,
            timeout=args.timeout,
            interval=0.02,
            what=f"{commands} commands final",
        )
        seconds = time.perf_counter() - started
        cpu = await meter.stop()
    succeeded = await scalar(
        engine,
        "SELECT count(*) FROM commands WHERE id >= :first AND status = 'SUCCEEDED'"
        " AND attempts = 1",
        first=first,
    )
    rate = commands / seconds
    progress(f"  {seconds:.2f}s, {rate:.0f} commands/s, cpu {cpu}")
    return {
        "runners": runners,
        "slots": runners * args.concurrency,
        "seconds": round(seconds, 3),
        "commands_per_s": round(rate, 1),
        "succeeded_once": succeeded,
        "cpu_seconds": cpu,
        "cpu_ms_per_command": {
            key: round(value * 1000 / commands, 2)
            for key, value in cpu.items()
            if key not in ("wall", "machine_capacity")
        },
    }


# -- latency --------------------------------------------------------------------------------


async def pinned_profile(http: httpx.AsyncClient, name: str) -> str:
    data = await graphql(http, PROFILE, name=name, affinity=name)
    payload = data["createProfile"]
    if payload["userErrors"]:
        raise RuntimeError(f"createProfile refused: {payload['userErrors']}")
    profile_id: str = payload["profile"]["id"]
    return profile_id


class ReadClock:
    """Times the API node's reads of stored lines (server.stream_pages.read_lines, which
    followers call for a replay and, cross-node, after each notification): the wrapper is
    the benchmark's instrument, installed in this process only."""

    def __init__(self) -> None:
        self.reads: list[tuple[float, int]] = []  # (ms, lines)

    @contextlib.contextmanager
    def installed(self) -> Iterator[ReadClock]:
        import server.stream_pages

        original = server.stream_pages.read_lines

        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            batch = await original(*args, **kwargs)
            lines = sum(len(run.texts) for run in batch.runs)
            self.reads.append(((time.perf_counter() - started) * 1000, lines))
            return batch

        server.stream_pages.read_lines = timed  # type: ignore[assignment]
        try:
            yield self
        finally:
            server.stream_pages.read_lines = original  # type: ignore[assignment]

    def take(self) -> dict[str, Any]:
        """The reads since the last take: how many, their time (ms), lines each."""
        reads, self.reads = self.reads, []
        return {
            "reads": len(reads),
            "read_ms": percentiles([ms for ms, _ in reads]),
            "read_ms_total": round(sum(ms for ms, _ in reads)),
            "lines_per_read": percentiles([float(n) for _, n in reads], 0),
        }


class NudgeClock:
    """When this process (the API node's) hears each "lines stored up to seq N of command
    C" notification, on a LISTEN connection of its own beside the broker's."""

    def __init__(self, settings: Any) -> None:
        self.settings = settings
        self.heard: dict[int, list[tuple[int, float]]] = {}  # command -> (seq, time.time())

    @contextlib.asynccontextmanager
    async def listening(self) -> AsyncIterator[NudgeClock]:
        import asyncpg

        from server.db import create_engine
        from server.pgbroker import CHANNEL, connect_arguments

        engine = create_engine(self.settings)
        connection = await asyncpg.connect(**connect_arguments(engine))
        try:
            await connection.add_listener(CHANNEL, self._heard)
            yield self
        finally:
            await connection.close()
            await engine.dispose()

    def _heard(self, _connection: Any, _pid: int, _channel: str, payload: str) -> None:
        now = time.time()
        for entry in json.loads(payload):
            if entry[0] == "l":
                self.heard.setdefault(int(entry[1]), []).append((int(entry[2]), now))

    async def breakdown(self, engine: Any, command: int) -> dict[str, Any]:
        """Per line, from the child's write: read by the runner (the line's ts), and the
        stored-up-to-here notification heard on the API node's host (ms)."""
        from sqlalchemy import text

        async with engine.connect() as connection:
            rows = (
                await connection.execute(
                    text(
                        "SELECT seq, ts, text FROM log_lines WHERE command_id = :id"
                        " AND text LIKE 't=%' ORDER BY seq"
                    ),
                    {"id": command},
                )
            ).all()
        heard = self.heard.get(command, [])
        read, notified, index = [], [], 0
        for seq, ts, line in rows:
            written = float(line[2 : line.index(" ")])
            read.append((ts.timestamp() - written) * 1000)
            while index < len(heard) and heard[index][0] < seq:
                index += 1
            if index < len(heard):
                notified.append((heard[index][1] - written) * 1000)
        return {
            "read_by_runner_ms": percentiles(read),
            "stored_and_notified_ms": percentiles(notified),
            "notifications": len(heard),
        }


async def latency_run(
    http: httpx.AsyncClient,
    base_url: str,
    command: str,
    profile_id: str,
    expected: int,
    timeout: float,
    engine: Any,
    clock: NudgeClock,
    reads: ReadClock,
) -> dict[str, Any]:
    """One paced child's lines, followed by one SSE client in its own process."""
    sse = await Worker.start("sse")
    try:
        reads.take()
        gid = await run_command(http, commandString=command, profileId=profile_id)
        await sse.send(
            {"url": f"{base_url}/api/commands/{gid}/logs/stream", "mode": "latency", "timeout": 60}
        )
        await sse.expect("connected", timeout=30)
        result = await sse.expect("result", timeout=timeout)
    finally:
        await sse.close()
    return {
        "latency_ms": result["latency_ms"],
        "breakdown": await clock.breakdown(engine, decode_command_pk(gid))
        | {"api_node_reads": reads.take()},
        "lines_delivered": result["lines"],
        "lines_expected": expected,
        "seq_gaps": result["seq_gaps"],
        "seq_repeats": result["seq_repeats"],
        "final_status": result["final_status"],
    }


def summary(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Median over the rounds of each run's p50 and p99 (and the worst p99)."""
    p50 = [r["latency_ms"]["p50"] for r in runs]
    p99 = [r["latency_ms"]["p99"] for r in runs]
    return {
        "p50_ms": round(statistics.median(p50), 2),
        "p99_ms": round(statistics.median(p99), 2),
        "worst_p99_ms": max(p99),
        "correct": all(
            r["lines_delivered"] == r["lines_expected"]
            and r["seq_gaps"] == 0
            and r["seq_repeats"] == 0
            and r["final_status"] == "SUCCEEDED"
            for r in runs
        ),
    }


async def latency(
    settings: Any,
    app: Any,
    http: httpx.AsyncClient,
    base_url: str,
    engine: Any,
    workdir: Path,
    args: argparse.Namespace,
) -> dict[str, Any]:
    from runner.supervisor import Supervisor

    child = write_child(workdir / CHILD_DIR)
    lines = int(args.rate * args.seconds)
    command = (
        f"{shlex.quote(CHILD_PYTHON)} -S {shlex.quote(str(child))} paced {lines} {args.rate} 1.0"
    )
    profiles = {
        EMBEDDED: await pinned_profile(http, EMBEDDED),
        REMOTE: await pinned_profile(http, REMOTE),
    }
    services = app.state.services
    embedded = Supervisor(
        settings.model_copy(update={"runner_name": EMBEDDED}),
        services.sessionmaker,
        services.secret_box,
        services.broker,
        services.metrics,
    )
    runs: dict[str, list[dict[str, Any]]] = {"in_process": [], "cross_node": []}
    await embedded.start()
    try:
        async with (
            runner_processes(settings, workdir, [REMOTE], args.concurrency),
            NudgeClock(settings).listening() as clock,
        ):
            with ReadClock().installed() as reads:
                for round_ in range(1, args.rounds + 1):
                    for mode, runner in (("in_process", EMBEDDED), ("cross_node", REMOTE)):
                        rate = f"{args.rate:.0f} lines/s for {args.seconds}s"
                        progress(f"latency round {round_}: {mode}, {rate}")
                        run = await latency_run(
                            http,
                            base_url,
                            command,
                            profiles[runner],
                            lines,
                            args.timeout,
                            engine,
                            clock,
                            reads,
                        )
                        progress(f"  {run['latency_ms']}")
                        progress(f"  {run['breakdown']}")
                        runs[mode].append(run)
    finally:
        await embedded.stop()
    near, far = summary(runs["in_process"]), summary(runs["cross_node"])
    ratio = far["p99_ms"] / near["p99_ms"] if near["p99_ms"] else None
    return {
        "rate_lines_per_s": args.rate,
        "seconds": args.seconds,
        "rounds": args.rounds,
        "in_process": near,
        "cross_node": far,
        "added_p50_ms": round(far["p50_ms"] - near["p50_ms"], 2),
        "added_p99_ms": round(far["p99_ms"] - near["p99_ms"], 2),
        "p99_ratio": None if ratio is None else round(ratio, 2),
        "target_p99_ratio_max": TARGET_P99_RATIO_MAX,
        "meets_target": ratio is not None and ratio <= TARGET_P99_RATIO_MAX,
        "runs": runs,
    }


# -- the benchmark --------------------------------------------------------------------------


async def run_backend(backend: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from server.app import create_app

    if backend != "postgresql":
        raise SystemExit("scale_out runs on PostgreSQL only (--backend postgresql)")
    counts = [int(n) for n in args.runners.split(",")]
    # The child runs in the commands' sandbox (bwrap when available), which shows it only
    # system paths and these: its script's folder and the interpreter's own installation.
    (workdir / CHILD_DIR).mkdir()
    readable = [workdir / CHILD_DIR, Path(sys.base_prefix)]
    async with backend_settings(
        backend,
        workdir,
        embedded_runner=False,
        sandbox_paths=readable,
        follow_poll_seconds=600.0,  # lines from other processes come by NOTIFY, not the poll
    ) as settings:
        engine = observer_engine(settings)
        app = create_app(settings)
        try:
            async with (
                serve(app) as base_url,
                httpx.AsyncClient(base_url=base_url, timeout=60, headers=auth_headers()) as http,
            ):
                drains = [
                    await drain(settings, app, http, engine, workdir, k, args) for k in counts
                ]
                delivery = await latency(settings, app, http, base_url, engine, workdir, args)
        finally:
            await engine.dispose()
    one = drains[0]["commands_per_s"]
    return {
        "commands": args.commands,
        "concurrency_per_runner": args.concurrency,
        "sandbox": settings.sandbox,
        "drain": drains,
        "drain_speedup_vs_first": [round(d["commands_per_s"] / one, 2) for d in drains],
        "latency": delivery,
        "meets_target": delivery["meets_target"],
        "correct": delivery["in_process"]["correct"]
        and delivery["cross_node"]["correct"]
        and all(d["succeeded_once"] == args.commands for d in drains),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="postgresql", help="postgresql (the only one)")
    parser.add_argument("--commands", type=int, default=400, help="commands per drain")
    parser.add_argument("--runners", default="1,2,4", help="runner counts to drain with")
    parser.add_argument("--concurrency", type=int, default=4, help="slots per runner")
    parser.add_argument("--rate", type=float, default=10_000, help="latency: lines/s")
    parser.add_argument("--seconds", type=float, default=3.0, help="latency: duration")
    parser.add_argument("--rounds", type=int, default=2, help="latency: runs per mode")
    parser.add_argument("--timeout", type=float, default=180.0, help="per-phase limit (s)")
    run_benchmark("scale_out", parser, run_backend)


if __name__ == "__main__":
    main()
