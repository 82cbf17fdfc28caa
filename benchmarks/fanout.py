"""Live streams at fan-out (issue 16): many subscribers follow one busy run.

One run prints `--rate` lines/s (5,000) for `--seconds` (10), followed by `--clients` (200)
subscribers at once (it starts to print once they are all in, so that a line's latency is
the fan-out's, not the clients' connection time), in each mode on its own fresh server (a
subprocess of this script per mode, so one mode's memory never counts in another's):

- `sse`: the SSE log stream (`GET /api/commands/{id}/logs/stream`);
- `batches`: the `commandLogBatches` subscription over graphql-transport-ws;
- `lines`: the per-line `commandLogs` subscription over graphql-transport-ws.

The clients live in `--workers` processes (asyncio, many clients each), not one process a
client. Each line the child writes starts `t=<time.time()>`; a line's latency is when the
message that carried it arrived minus that (every 20th seq sampled). Per mode: whether
every line reached every subscriber (gaps, repeats, short clients), p50/p99 line latency,
the server's RSS growth (peak over its RSS before the run), and `/healthz` round trips
probed every 100 ms from another process throughout; and the server's CPU seconds and
wall seconds from the first line printed to the last client done (on a shared machine the
CPU figure moves far less than the latencies do).

    python -m benchmarks.fanout [--backend sqlite|postgresql|both] [--modes sse,batches,lines]
        [--clients 200] [--rate 5000] [--seconds 10] [--workers 4] [--timeout 150]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import re
import resource
import shlex
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from benchmarks.common import (
    ROOT,
    Worker,
    auth_headers,
    backend_settings,
    percentiles,
    progress,
    run_benchmark,
    run_command,
    serve,
)
from benchmarks.log_ingest import CHILD_PYTHON, write_child

MODES = ("sse", "batches", "lines")
SHOWN = (
    "clients_with_every_line",
    "seq_gaps",
    "latency_ms",
    "server_rss_delta_mb",
    "healthz_ms",
    "server_cpu_seconds",
    "delivery_seconds",
)
TARGET_P99_MS = 250.0
TARGET_RSS_MB = 200.0
TARGET_HEALTHZ_MS = 100.0
SAMPLE_EVERY = 20  # lines a latency sample is taken of
# The child prints once every client is in (the benchmark then creates a file it waits for),
# or after this long at most: replayed lines would count the clients' connection time as
# their latency (on a loaded machine 200 clients may take tens of seconds to get in).
CONNECT_DELAY = 120.0
BATCHES = """
subscription($id: ID!) {
  commandLogBatches(commandId: $id) { lines { seq attempt stream ts text } final }
}"""
# One line's JSON, as SSE (", " and ": ") and GraphQL (compact) write it: seq, stream, and
# the write time its text starts with (sampled: the lines whose seq is a multiple of
# SAMPLE_EVERY).
LINE = re.compile(
    rb'"seq": ?(\d+), ?"attempt": ?\d+, ?"stream": ?"(\w+)", '
    rb'?"ts": ?"[^"]*", ?"text": ?"(?:t=([0-9.]+) )?'
)
SEQ = re.compile(rb'"seq": ?(\d+)')
STDOUT = (b'"stream": "STDOUT"', b'"stream":"STDOUT"')
WRITTEN = re.compile(rb'"t=([0-9.]+) ')
LINES = """
subscription($id: ID!) { commandLogs(commandId: $id) { seq attempt stream ts text } }"""


# -- the clients (in worker processes) ----------------------------------------------------


class Tally:
    """What one subscriber received: its stdout lines, seq gaps and repeats, samples."""

    def __init__(self) -> None:
        self.lines = self.gaps = self.repeats = 0
        self.last_seq = 0
        self.final = False
        self.error: str | None = None
        self.latencies: list[float] = []
        self.sampled: list[int] = []  # the seq of each latency sample

    def lines_in(self, raw: bytes, now: float) -> None:
        """Count the lines a message or chunk carries, read off its bytes (no JSON objects:
        the clients share the machine with the server they measure). The common case, the
        next seqs in order, is checked by counting and by the first and last seq (reading
        every line with a regular expression cost the clients four times the server's CPU
        and set the pace, issue 16); anything else is read line by line."""
        count = raw.count(b'"seq":')
        if not count:
            return
        first = SEQ.match(raw, raw.find(b'"seq":'))
        last = SEQ.match(raw, raw.rfind(b'"seq":'))
        if (
            first is None
            or last is None
            or int(first[1]) != self.last_seq + 1
            or int(last[1]) != self.last_seq + count
        ):
            self._lines_one_by_one(raw, now)
            return
        start, self.last_seq = self.last_seq + 1, self.last_seq + count
        # The lines whose seq is a multiple of SAMPLE_EVERY, found by their seq: a `find`
        # every SAMPLE_EVERY lines, not a regular expression every line.
        seq_field = first[0][: first.start(1) - first.start()]
        position = 0
        for seq in range(start + (-start) % SAMPLE_EVERY, self.last_seq + 1, SAMPLE_EVERY):
            position = raw.find(b"%s%d," % (seq_field, seq), position)
            written = WRITTEN.search(raw, position, position + 200)
            if written is not None:
                self.latencies.append((now - float(written[1])) * 1000)
                self.sampled.append(seq)
        # One pass, not one per spelling: SSE (events end in CRLF) writes one, GraphQL
        # (a JSON message, no raw CRLF) the other.
        self.lines += raw.count(STDOUT[0] if raw.find(b"\r\n", 0, 64) >= 0 else STDOUT[1])

    def _lines_one_by_one(self, raw: bytes, now: float) -> None:
        for seq_text, stream, written in LINE.findall(raw):
            seq = int(seq_text)
            if seq <= self.last_seq:
                self.repeats += 1
                continue
            if seq != self.last_seq + 1:
                self.gaps += 1
            self.last_seq = seq
            if stream.lower() != b"stdout":
                continue
            self.lines += 1
            if written and seq % SAMPLE_EVERY == 0:
                self.latencies.append((now - float(written)) * 1000)
                self.sampled.append(seq)

    def result(self) -> dict[str, Any]:
        return {
            "lines": self.lines,
            "gaps": self.gaps,
            "repeats": self.repeats,
            "final": self.final,
            "error": self.error,
        }


class ChunkedBody:
    """The body of a chunked HTTP/1.1 response, from the bytes as they arrive (the SSE
    clients read the socket themselves: httpx and h11 cost the clients more CPU than the
    server spent on them, on the same two cores, issue 16)."""

    def __init__(self) -> None:
        self.pending = b""  # the start of a chunk's size line, not complete yet
        self.left = 0  # bytes of the current chunk's data still to come
        self.skip = 0  # bytes of the CRLF after a chunk's data still to come
        self.ended = False  # the last (empty) chunk came

    def feed(self, data: bytes, body: bytearray) -> None:
        """Append the data `data` carries to `body`."""
        if self.pending:
            data, self.pending = self.pending + data, b""
        position, size = 0, len(data)
        while position < size and not self.ended:
            if self.left:
                take = min(self.left, size - position)
                body += data[position : position + take]
                position += take
                self.left -= take
                self.skip = 0 if self.left else 2
            elif self.skip:
                take = min(self.skip, size - position)
                position += take
                self.skip -= take
            else:
                end = data.find(b"\r\n", position)
                if end < 0:
                    self.pending = data[position:]
                    return
                self.left = int(data[position:end].split(b";", 1)[0], 16)
                self.ended = self.left == 0
                position = end + 2


async def sse_client(job: dict[str, Any], tally: Tally, connected: asyncio.Event) -> None:
    """One SSE subscriber on a plain asyncio stream: HTTP/1.1 request and chunked body by
    hand, events counted off the bytes (Tally.lines_in), as few copies as it takes."""
    url = httpx.URL(job["url"])
    path = f"/api/commands/{job['command_id']}/logs/stream"
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(url.host, url.port, limit=1 << 20), 30
    )
    try:
        request = (
            f"GET {path} HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
            f"Accept: text/event-stream\r\nAuthorization: Bearer {job['token']}\r\n\r\n"
        )
        writer.write(request.encode())
        head = await reader.readuntil(b"\r\n\r\n")
        connected.set()
        status = int(head.split(b" ", 2)[1])
        if status != 200:
            raise RuntimeError(f"SSE answered {status}")
        if b"transfer-encoding: chunked" not in head.lower():
            raise RuntimeError(f"not a chunked response: {head[:300]!r}")
        chunked = ChunkedBody()
        body = bytearray()
        while not chunked.ended:
            data = await reader.read(1 << 20)
            if not data:
                raise RuntimeError("the server closed the stream before its final status")
            now = time.time()
            chunked.feed(data, body)
            end = body.rfind(b"\r\n\r\n")
            if end < 0:
                continue
            events = bytes(body[:end])
            del body[: end + 4]
            tally.lines_in(events, now)
            if b"event: status" in events and b'"final": true' in events:
                tally.final = True
                return
        raise RuntimeError("the stream ended without a final status")
    finally:
        writer.close()


class WebSocketFrames:
    """The messages of a WebSocket's server-to-client frames (unmasked), from the bytes as
    they arrive: whole messages, fragments joined; control frames apart."""

    def __init__(self) -> None:
        self.buffer = bytearray()
        self.fragments: list[bytes] = []

    def feed(self, data: bytes) -> list[tuple[int, bytes]]:
        """(opcode, payload) of each message or control frame complete now."""
        buffer = self.buffer
        buffer += data
        out: list[tuple[int, bytes]] = []
        position = 0
        while len(buffer) - position >= 2:
            first, second = buffer[position], buffer[position + 1]
            if second & 0x80:
                raise RuntimeError("a masked frame from the server")
            length, header = second & 0x7F, 2
            if length == 126:
                header = 4
                if len(buffer) - position < header:
                    break
                length = int.from_bytes(buffer[position + 2 : position + 4], "big")
            elif length == 127:
                header = 10
                if len(buffer) - position < header:
                    break
                length = int.from_bytes(buffer[position + 2 : position + 10], "big")
            if len(buffer) - position < header + length:
                break
            payload = bytes(buffer[position + header : position + header + length])
            position += header + length
            opcode = first & 0x0F
            if opcode >= 8:  # control frames may come between fragments
                out.append((opcode, payload))
                continue
            self.fragments.append(payload)
            if opcode and len(self.fragments) > 1:
                raise RuntimeError("a new message inside a fragmented one")
            if first & 0x80:  # FIN
                first_opcode = opcode or self._opcode
                out.append((first_opcode, b"".join(self.fragments)))
                self.fragments = []
            elif opcode:
                self._opcode = opcode
        del buffer[:position]
        return out

    _opcode = 1


def ws_frame(opcode: int, payload: bytes) -> bytes:
    """A client's frame (FIN, masked, as RFC 6455 asks of clients)."""
    mask = os.urandom(4)
    length = len(payload)
    if length < 126:
        header = bytes([0x80 | opcode, 0x80 | length])
    elif length < 1 << 16:
        header = bytes([0x80 | opcode, 0x80 | 126]) + length.to_bytes(2, "big")
    else:
        header = bytes([0x80 | opcode, 0x80 | 127]) + length.to_bytes(8, "big")
    repeated = (mask * (length // 4 + 1))[:length]
    masked = (int.from_bytes(payload, "big") ^ int.from_bytes(repeated, "big")).to_bytes(
        length, "big"
    )
    return header + mask + masked


async def ws_client(job: dict[str, Any], tally: Tally, connected: asyncio.Event) -> None:
    """One graphql-transport-ws subscriber on a plain asyncio stream: the handshake and the
    frames by hand (the websockets library cost the clients as much CPU as the server spent
    on them, on the same two cores, issue 16); `--deflate` uses the library instead."""
    if job.get("deflate"):
        await ws_library_client(job, tally, connected)
        return
    url = httpx.URL(job["url"])
    reader, writer = await asyncio.wait_for(
        asyncio.open_connection(url.host, url.port, limit=1 << 20), 30
    )
    try:
        key = base64.b64encode(os.urandom(16)).decode()
        writer.write(
            (
                f"GET /graphql HTTP/1.1\r\nHost: {url.host}:{url.port}\r\n"
                "Upgrade: websocket\r\nConnection: Upgrade\r\n"
                f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Protocol: graphql-transport-ws\r\n\r\n"
            ).encode()
        )
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
        if not head.startswith(b"HTTP/1.1 101"):
            raise RuntimeError(f"no WebSocket: {head[:300]!r}")
        frames = WebSocketFrames()
        init = {"authorization": f"Bearer {job['token']}"}
        message = {"type": "connection_init", "payload": init}
        writer.write(ws_frame(1, json.dumps(message).encode()))
        await ws_messages(job, tally, connected, reader, writer, frames)
    finally:
        writer.close()


async def ws_messages(
    job: dict[str, Any],
    tally: Tally,
    connected: asyncio.Event,
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    frames: WebSocketFrames,
) -> None:
    batches = job["mode"] == "batches"
    while True:
        data = await reader.read(1 << 20)
        if not data:
            raise RuntimeError("the socket closed before `complete`")
        now = time.time()
        for opcode, raw in frames.feed(data):
            if opcode == 9:  # ping
                writer.write(ws_frame(10, raw))
                continue
            if opcode == 8:
                raise RuntimeError(f"the server closed the socket: {raw[:200]!r}")
            if opcode != 1:
                continue
            if raw.startswith(b'{"id":"1","type":"next","payload":{"data":{'):
                tally.lines_in(raw, now)
                if batches and raw.endswith(b'"final":true}}}}'):
                    tally.final = True
                continue
            kind = json.loads(raw)["type"]
            if kind == "connection_ack":
                query = BATCHES if batches else LINES
                payload = {"query": query, "variables": {"id": job["command_id"]}}
                subscribe = {"id": "1", "type": "subscribe", "payload": payload}
                writer.write(ws_frame(1, json.dumps(subscribe).encode()))
                connected.set()
            elif kind == "ping":
                writer.write(ws_frame(1, b'{"type":"pong"}'))
            elif kind == "complete":
                tally.final = tally.final or not batches
                return
            else:
                raise RuntimeError(f"unexpected message: {raw[:300]!r}")


async def ws_library_client(job: dict[str, Any], tally: Tally, connected: asyncio.Event) -> None:
    from websockets.asyncio.client import connect
    from websockets.typing import Subprotocol

    ws_url = job["url"].replace("http://", "ws://") + "/graphql"
    batches = job["mode"] == "batches"
    # Compact JSON, as the server writes it: `lines_in` reads the lines off the bytes.
    query = BATCHES if batches else LINES
    # No keepalive pings: a pong waits behind all the data queued before it, and clients
    # starved of CPU on a shared machine fell 20 s behind and closed (1011) mid-run.
    async with connect(
        ws_url,
        subprotocols=[Subprotocol("graphql-transport-ws")],
        max_size=None,
        open_timeout=30,
        ping_interval=None,
        compression="deflate" if job.get("deflate", True) else None,
    ) as ws:
        init = {"authorization": f"Bearer {job['token']}"}
        await ws.send(json.dumps({"type": "connection_init", "payload": init}))
        ack = json.loads(await ws.recv())
        if ack.get("type") != "connection_ack":
            raise RuntimeError(f"no connection_ack: {ack}")
        variables = {"id": job["command_id"]}
        payload = {"query": query, "variables": variables}
        await ws.send(json.dumps({"id": "1", "type": "subscribe", "payload": payload}))
        connected.set()
        async for message in ws:
            now = time.time()
            raw = message.encode() if isinstance(message, str) else message
            if raw.startswith(b'{"id":"1","type":"next","payload":{"data":{'):
                tally.lines_in(raw, now)
                if batches and raw.endswith(b'"final":true}}}}'):
                    tally.final = True
                continue
            kind = json.loads(raw)["type"]
            if kind == "ping":
                await ws.send('{"type":"pong"}')
            elif kind == "complete":
                tally.final = tally.final or not batches
                return
            else:
                raise RuntimeError(f"unexpected message: {raw[:300]!r}")
        raise RuntimeError("the socket closed before `complete`")


async def healthz_prober(job: dict[str, Any]) -> dict[str, Any]:
    latencies: list[float] = []
    failures = 0
    deadline = time.monotonic() + job["seconds"]
    async with httpx.AsyncClient(base_url=job["url"], timeout=30) as client:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                response = await client.get("/healthz")
                failures += response.status_code != 200
            except httpx.HTTPError:
                failures += 1
            latencies.append((time.perf_counter() - started) * 1000)
            await asyncio.sleep(0.1)
    return {"healthz_ms": percentiles(latencies), "healthz_failures": failures}


async def run_clients(job: dict[str, Any]) -> dict[str, Any]:
    """`job['clients']` subscribers of one mode, side by side; their tallies."""
    if job["mode"] == "healthz":
        return await healthz_prober(job)
    client = sse_client if job["mode"] == "sse" else ws_client
    tallies = [Tally() for _ in range(job["clients"])]
    events = [asyncio.Event() for _ in tallies]

    async def one(tally: Tally, connected: asyncio.Event) -> None:
        try:
            async with asyncio.timeout(job["timeout"]):
                await client(job, tally, connected)
        except Exception as exc:  # a client that failed is counted, not fatal
            tally.error = repr(exc)[:200]
            connected.set()

    tasks = [asyncio.create_task(one(t, e)) for t, e in zip(tallies, events, strict=True)]
    await asyncio.gather(*(e.wait() for e in events))
    _emit({"event": "connected"})
    await asyncio.gather(*tasks)
    _emit({"event": "done"})  # before the (large) result: not counted in the server's CPU
    return {
        "clients": [t.result() for t in tallies],
        "latencies_ms": [round(x, 2) for t in tallies for x in t.latencies],
        # The second of the run each sample's line was written in (its seq at the rate).
        "latency_seconds": [int(seq / job["rate"]) for t in tallies for seq in t.sampled],
        "client_cpu_seconds": round(time.process_time(), 2),
    }


def _emit(message: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(message) + "\n")
    sys.stdout.flush()


def worker_main() -> int:
    _emit({"event": "ready"})
    job = json.loads(sys.stdin.readline())
    try:
        result = asyncio.run(run_clients(job))
    except Exception as exc:
        _emit({"event": "failed", "error": repr(exc)})
        return 1
    _emit({"event": "result", **result})
    return 0


async def start_worker() -> Worker:
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "benchmarks.fanout",
        "--worker",
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        cwd=ROOT,
        limit=256 * 1024 * 1024,
    )
    worker = Worker(process, "fanout")
    await worker.expect("ready", timeout=60)
    return worker


# -- one mode on one server (a subprocess of the benchmark) --------------------------------


def cpu_seconds() -> float:
    """CPU time this process (the server, its runner included) has used: a figure that the
    other loads of a shared machine disturb far less than latencies."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


async def sample_rss(peak: list[float]) -> None:
    while True:
        peak[0] = max(peak[0], rss_mb())
        await asyncio.sleep(0.25)


async def run_mode(
    backend: str, mode: str, args: argparse.Namespace, workdir: Path
) -> dict[str, Any]:
    from server.app import create_app

    child = write_child(workdir)
    total = int(args.rate * args.seconds)
    overrides = {
        "sandbox_paths": [workdir, Path(sys.base_prefix)],
        "max_subscribers": args.clients + 50,
        "max_subscribers_per_client": args.clients + 50,
    }
    async with (
        backend_settings(backend, workdir, **overrides) as settings,
        serve(app := create_app(settings)) as base_url,
        httpx.AsyncClient(base_url=base_url, timeout=60, headers=auth_headers()) as http,
    ):
        broker = app.state.services.broker
        subscribed_before = broker.subscriber_count
        workers = [await start_worker() for _ in range(args.workers)]
        prober = await start_worker()
        rss_before = rss_mb()
        peak = [rss_before]
        sampler = asyncio.create_task(sample_rss(peak))
        try:
            python = shlex.quote(CHILD_PYTHON)
            go = workdir / "clients-are-in"
            command = (
                f"{python} -S {shlex.quote(str(child))} paced {total} {args.rate} {CONNECT_DELAY}"
                f" {shlex.quote(str(go))}"
            )
            command_id = await run_command(http, commandString=command)
            started = time.monotonic()
            shares = [args.clients // args.workers] * args.workers
            shares[0] += args.clients - sum(shares)
            for worker, share in zip(workers, shares, strict=True):
                job: dict[str, Any] = {"mode": mode, "url": base_url, "command_id": command_id}
                job["deflate"] = args.deflate
                job["rate"] = args.rate
                await worker.send(job | {"clients": share, "timeout": args.timeout})
            for worker in workers:
                await worker.expect("connected", timeout=CONNECT_DELAY)
            # A client is "connected" once its request or `subscribe` is sent: the run starts
            # once the server has subscribed every follower too, or the setup of 200
            # subscriptions (their replay and status reads) counts as the first lines' latency.
            while broker.subscriber_count < subscribed_before + args.clients:
                if time.monotonic() - started > CONNECT_DELAY:
                    break
                await asyncio.sleep(0.05)
            go.touch()
            connect_seconds = time.monotonic() - started
            cpu_before, go_at = cpu_seconds(), time.monotonic()
            # Throughout the run: from when it starts to print until after it should end.
            await prober.send({"mode": "healthz", "url": base_url, "seconds": args.seconds + 5})
            progress(f"{backend}/{mode}: {args.clients} clients in after {connect_seconds:.1f}s")
            for worker in workers:
                await worker.expect("done", timeout=args.timeout + 60)
            server = {
                "server_cpu_seconds": round(cpu_seconds() - cpu_before, 2),
                "delivery_seconds": round(time.monotonic() - go_at, 2),
            }
            # Decoding the workers' samples (hundreds of thousands) is the benchmark's work,
            # not the server's: after the CPU reading.
            results = [await w.expect("result", timeout=60) for w in workers]
            health = await prober.expect("result", timeout=60)
        finally:
            sampler.cancel()
            for worker in [*workers, prober]:
                await worker.close()
    summary = summarize(mode, total, results, health, peak[0] - rss_before, connect_seconds)
    return summary | server


def summarize(
    mode: str,
    total: int,
    results: list[dict[str, Any]],
    health: dict[str, Any],
    rss_delta: float,
    connect_seconds: float,
) -> dict[str, Any]:
    clients = [c for r in results for c in r["clients"]]
    latencies = [x for r in results for x in r["latencies_ms"]]
    by_second: dict[int, list[float]] = {}
    for r in results:
        for second, latency in zip(r["latency_seconds"], r["latencies_ms"], strict=True):
            by_second.setdefault(second, []).append(latency)
    complete = sum(c["lines"] == total and c["final"] for c in clients)
    summary = {
        "mode": mode,
        "clients": len(clients),
        "lines_per_client_expected": total,
        "clients_with_every_line": complete,
        "clients_with_no_line": sum(c["lines"] == 0 for c in clients),
        "lines_delivered_fraction": round(
            sum(c["lines"] for c in clients) / (total * len(clients)), 4
        ),
        "seq_gaps": sum(c["gaps"] for c in clients),
        "seq_repeats": sum(c["repeats"] for c in clients),
        "client_errors": [c["error"] for c in clients if c["error"]][:5],
        "client_error_count": sum(bool(c["error"]) for c in clients),
        "latency_ms": percentiles(latencies),
        # Where the tail is: the start (a burst), the end (a backlog) or throughout.
        "latency_ms_by_second_written": {
            second: {k: percentiles(by_second[second])[k] for k in ("p50", "p99", "max")}
            for second in sorted(by_second)
        },
        "server_rss_delta_mb": round(rss_delta, 1),
        "healthz_ms": health["healthz_ms"],
        "healthz_failures": health["healthz_failures"],
        "clients_connect_seconds": round(connect_seconds, 2),
        "client_cpu_seconds": sum(r["client_cpu_seconds"] for r in results),
    }
    p99 = summary["latency_ms"]["p99"]
    summary["meets_targets"] = {
        "every_line": complete == len(clients) and summary["seq_gaps"] == 0,
        "p99_ms": p99 is not None and p99 <= TARGET_P99_MS,
        "rss_mb": rss_delta <= TARGET_RSS_MB,
        "healthz_ms": (health["healthz_ms"]["max"] or 0) <= TARGET_HEALTHZ_MS,
    }
    return summary


# -- the benchmark ---------------------------------------------------------------------------


async def run_backend(backend: str, args: argparse.Namespace, workdir: Path) -> dict[str, Any]:
    """Each mode in a fresh process of its own (its own server, its own RSS)."""
    results: dict[str, Any] = {}
    for mode in args.modes.split(","):
        progress(f"{backend}: {mode}, {args.clients} clients, {args.rate:.0f} lines/s")
        argv = [
            *("--backend", backend, "--one-mode", mode, "--clients", str(args.clients)),
            *("--rate", str(args.rate), "--seconds", str(args.seconds)),
            *("--workers", str(args.workers), "--timeout", str(args.timeout)),
            *(["--deflate"] if args.deflate else []),
        ]
        process = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "benchmarks.fanout", *argv,
            stdout=asyncio.subprocess.PIPE, cwd=ROOT,
        )  # fmt: skip
        out, _ = await process.communicate()
        if process.returncode != 0:
            results[mode] = {"error": f"the {mode} run exited {process.returncode}"}
            continue
        results[mode] = json.loads(out)
        summary = {k: results[mode][k] for k in SHOWN}
        progress(f"  {json.dumps(summary)}")
    results["targets"] = {
        "p99_ms_max": TARGET_P99_MS,
        "rss_mb_max": TARGET_RSS_MB,
        "healthz_ms_max": TARGET_HEALTHZ_MS,
        "applies_to": ["sse", "batches"],
    }
    return results


def one_mode(args: argparse.Namespace) -> None:
    import tempfile

    from benchmarks.common import server_log

    async def main() -> dict[str, Any]:
        with (
            tempfile.TemporaryDirectory(prefix="corral-bench-fanout-") as tmp,
            server_log(Path(tmp), f"fanout-{args.one_mode}"),
        ):
            return await run_mode(args.backend, args.one_mode, args, Path(tmp))

    sys.stdout.write(json.dumps(asyncio.run(main())) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="both", help="sqlite, postgresql or both")
    parser.add_argument("--modes", default=",".join(MODES), help="of sse, batches, lines")
    parser.add_argument("--clients", type=int, default=200, help="subscribers per mode")
    parser.add_argument("--rate", type=float, default=5000, help="lines/s the run prints")
    parser.add_argument("--seconds", type=float, default=10.0, help="how long it prints")
    parser.add_argument("--workers", type=int, default=4, help="client processes")
    parser.add_argument("--timeout", type=float, default=150.0, help="a client's limit (s)")
    parser.add_argument(
        "--deflate",
        action="store_true",
        help="GraphQL clients use the websockets library and offer permessage-deflate (what "
        "compressing each subscriber's messages costs the server, with CORRAL_WS_COMPRESSION);"
        " by default they speak the protocol by hand, offering none",
    )
    parser.add_argument("--one-mode", help=argparse.SUPPRESS)
    if "--worker" in sys.argv:
        sys.exit(worker_main())
    args = parser.parse_known_args()[0]
    if args.one_mode:
        one_mode(args)
        return
    run_benchmark("fanout", parser, run_backend)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
