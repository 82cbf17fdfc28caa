"""The admin panel: server time of its heaviest pages, and its live tail's throughput.

    .venv/bin/python -m benchmarks.panel [--backend sqlite|postgresql|both] [--runs N]
        [--lines N] [--requests N] [--tail-lines N]

Per backend, in one run:
1. seed: N runs (default 10,000, mixed statuses) and one run of --lines log lines (default
   1,000,000), written with the raw driver (sqlite3 executemany / asyncpg COPY) before the
   clock starts.
2. pages: the real app under uvicorn on 127.0.0.1 (no embedded runner: the seeded runs stay
   as they are); a client in its own process GETs each page --requests times, one after
   another on a keep-alive connection, with an admin API token, and times each round trip:
   the runs list (first page, last page, filtered by status) and the page of the big run
   (it opens at its tail). Baseline, in the same run: `GET /healthz` (the same client, the
   same server stack, no database) — each page's p50/p99 is also given as a ratio to it.
3. tail: the browser-like client reads the run page's live tail (`/runs/{id}/tail`, SSE of
   rendered HTML fragments) from --tail-lines before the big run's end to its `end` event;
   lines/s and MB/s of fragments.
Targets (issue #17): p99 <= 50 ms for the runs list and the run page on both databases.
Prints one JSON object on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import sqlite3
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import (
    ID_FLOOR,
    CpuClock,
    Worker,
    asyncpg_dsn,
    backend_settings,
    percentiles,
    progress,
    run_benchmark,
    serve,
)

P99_MS_MAX = 50.0
STATUSES = ("SUCCEEDED", "SUCCEEDED", "SUCCEEDED", "FAILED", "CANCELLED", "TIMED_OUT")
RUN_COLUMNS = [
    "id",
    "source",
    "is_ad_hoc",
    "argv",
    "env",
    "params",
    "status",
    "priority",
    "attempts",
    "max_attempts",
    "backoff_seconds",
    "exit_code",
    "error",
    "cancel_requested",
    "last_seq",
    "lines_lost",
    "created_at",
    "started_at",
    "finished_at",
]
LINE_COLUMNS = ["command_id", "seq", "attempt", "stream", "ts", "text"]
BATCH = 50_000


def run_rows(count: int, big_lines: int) -> list[tuple[Any, ...]]:
    """`count` finished runs; the last is the big one, with `big_lines` lines."""
    start = datetime(2026, 1, 1, tzinfo=UTC)
    rows = []
    for i in range(count):
        status = STATUSES[i % len(STATUSES)]
        created = start + timedelta(seconds=i)
        failed = status != "SUCCEEDED"
        rows.append(
            (
                ID_FLOOR + 1 + i,
                "echo run {{ params.n }}",
                True,
                f'["echo", "run", "{i}"]',
                "{}",
                f'{{"n": {i}}}',
                status,
                0,
                1,
                1,
                5.0,
                1 if failed else 0,
                f"exit code 1 (run {i})" if failed else None,
                False,
                big_lines if i == count - 1 else 2,
                0,
                created,
                created + timedelta(milliseconds=50),
                created + timedelta(seconds=2),
            )
        )
    return rows


def line_text(seq: int) -> str:
    return (
        f"{seq:07d} INFO worker-{seq % 8} fetched https://api.example.test/v2/items/{seq}"
        f" status=200 bytes={(seq * 7919) % 100000} <b>&amp;</b>"
    )


def line_rows(command_id: int, first: int, last: int, ts: datetime) -> list[tuple[Any, ...]]:
    return [
        (command_id, seq, 1, "stderr" if seq % 50 == 0 else "stdout", ts, line_text(seq))
        for seq in range(first, last + 1)
    ]


def sqlite_seed(path: Path, runs: list[tuple[Any, ...]], big_id: int, lines: int) -> None:
    connection = sqlite3.connect(path)
    try:
        marks = ", ".join("?" for _ in RUN_COLUMNS)
        iso_runs = [
            tuple(v.isoformat(sep=" ") if isinstance(v, datetime) else v for v in row)
            for row in runs
        ]
        connection.executemany(
            f"INSERT INTO commands ({', '.join(RUN_COLUMNS)}) VALUES ({marks})",  # noqa: S608 - constants
            iso_runs,
        )
        ts = datetime(2026, 1, 2, tzinfo=UTC).isoformat(sep=" ")
        for first in range(1, lines + 1, BATCH):
            connection.executemany(
                f"INSERT INTO log_lines ({', '.join(LINE_COLUMNS)}) VALUES (?, ?, ?, ?, ?, ?)",  # noqa: S608
                line_rows(big_id, first, min(lines, first + BATCH - 1), ts),  # type: ignore[arg-type]
            )
        connection.commit()
    finally:
        connection.close()


async def postgres_seed(url: str, runs: list[tuple[Any, ...]], big_id: int, lines: int) -> None:
    import asyncpg

    connection = await asyncpg.connect(asyncpg_dsn(url))
    try:
        rows = [
            tuple(v.replace(tzinfo=None) if isinstance(v, datetime) else v for v in row)
            for row in runs
        ]
        await connection.copy_records_to_table("commands", records=rows, columns=RUN_COLUMNS)
        ts = datetime(2026, 1, 2)
        for first in range(1, lines + 1, BATCH):
            await connection.copy_records_to_table(
                "log_lines",
                records=line_rows(big_id, first, min(lines, first + BATCH - 1), ts),
                columns=LINE_COLUMNS,
            )
        await connection.execute("ANALYZE commands; ANALYZE log_lines")
    finally:
        await connection.close()


async def seed(settings: Any, count: int, lines: int) -> int:
    """Writes the runs and the big run's lines; returns the big run's id."""
    runs = run_rows(count, lines)
    big_id: int = runs[-1][0]
    if settings.resolved_database_url.startswith("sqlite"):
        sqlite_seed(Path(settings.resolved_database_url.split("///", 1)[1]), runs, big_id, lines)
    else:
        await postgres_seed(settings.resolved_database_url, runs, big_id, lines)
    return big_id


async def timed_gets(base_url: str, path: str, requests: int) -> dict[str, Any]:
    worker = await Worker.start("pages")
    try:
        await worker.send({"url": base_url + path, "requests": requests})
        result = await worker.expect("result", timeout=600)
    finally:
        await worker.close()
    return result


def page_summary(result: dict[str, Any], baseline: dict[str, Any]) -> dict[str, Any]:
    latency = percentiles(result["latencies_ms"])
    return {
        "status": result["status"],
        "bytes": result["bytes"],
        "latency_ms": latency,
        "ratio_p50_to_healthz": round(latency["p50"] / baseline["p50"], 1),
        "ratio_p99_to_healthz": round(latency["p99"] / baseline["p99"], 1),
        "meets_p99_target": latency["p99"] <= P99_MS_MAX,
    }


async def read_tail(base_url: str, big_id: int, after: int, timeout: float) -> dict[str, Any]:
    worker = await Worker.start("tail")
    try:
        url = f"{base_url}/runs/{big_id}/tail?after={after}"
        await worker.send({"url": url, "timeout": timeout})
        return await worker.expect("result", timeout=timeout + 30)
    finally:
        await worker.close()


async def run_backend(backend: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    from server.app import create_app

    async with backend_settings(backend, workdir, embedded_runner=False) as settings:
        progress(f"{backend}: seeding {args.runs} runs and a run of {args.lines} lines")
        clock = time.monotonic()
        big_id = await seed(settings, args.runs, args.lines)
        seeded = round(time.monotonic() - clock, 1)
        app = create_app(settings)
        async with serve(app) as base_url:
            async with httpx.AsyncClient(base_url=base_url) as http:  # warm the pools
                await http.get("/healthz")
            baseline_run = await timed_gets(base_url, "/healthz", args.requests)
            baseline = percentiles(baseline_run["latencies_ms"])
            last_page = -(-args.runs // 25)
            pages = {
                "runs_list_first_page": "/runs",
                "runs_list_last_page": f"/runs?page={last_page}",
                "runs_list_failed": "/runs?status=FAILED",
                "run_page_1m_lines": f"/runs/{big_id}",
            }
            results: dict[str, Any] = {}
            for name, path in pages.items():
                progress(f"{backend}: {args.requests} x GET {path}")
                cpu = CpuClock()
                measured = await timed_gets(base_url, path, args.requests)
                results[name] = page_summary(measured, baseline) | {"server_cpu": cpu.read()}
            progress(f"{backend}: the tail of the last {args.tail_lines} lines")
            cpu = CpuClock()
            tail = await read_tail(base_url, big_id, args.lines - args.tail_lines, args.timeout)
            tail_cpu = cpu.read()
        seconds = max(tail["seconds"], 1e-9)
        return {
            "seed_seconds": seeded,
            "runs": args.runs,
            "big_run_lines": args.lines,
            "baseline_healthz_ms": baseline,
            "pages": results,
            "tail": {
                "lines": tail["lines"],
                "expected_lines": args.tail_lines,
                "ended": tail["ended"],
                "lines_per_second": round(tail["lines"] / seconds),
                "megabytes_per_second": round(tail["bytes"] / seconds / 1e6, 2),
                "first_event_ms": tail["first_event_ms"],
                "server_cpu": tail_cpu,
            },
            "meets_targets": all(page["meets_p99_target"] for page in results.values()),
        }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="both", help="sqlite, postgresql or both")
    parser.add_argument("--runs", type=int, default=10_000, help="runs in the list")
    parser.add_argument("--lines", type=int, default=1_000_000, help="lines of the big run")
    parser.add_argument("--requests", type=int, default=200, help="GETs per page")
    parser.add_argument("--tail-lines", type=int, default=100_000, help="lines the tail reads")
    parser.add_argument("--timeout", type=float, default=300.0, help="tail read limit (s)")
    run_benchmark("panel", parser, run_backend)


if __name__ == "__main__":
    main()
