"""Browser run: time to first page and memory of a Playwright script run through Corral
(profile + proxy sidecar) against the same script run bare with playwright-core; and the
proxy sidecar's start time.

    .venv/bin/python -m benchmarks.browser_run [--runs N] [--chromium PATH]

Everything is on 127.0.0.1: a local site (tests/fixtures/netfakes.LocalSite), an upstream
HTTP proxy that demands basic auth (netfakes.UpstreamHttpProxy) and, for the bare run, an
unauthenticated SOCKS5 proxy (below). Corral is the real app (create_app + its lifespan, the
embedded runner, SQLite in a temp data dir), driven in-process through GraphQL (httpx's
ASGI transport): a profile with the upstream proxy attached, and the template

    corral-playwright --profile {{ profile.dir }} --proxy {{ proxy.url }}
        -- first_page.mjs {{ params.url }} {{ params.hold }}

so each run is: queue -> claim -> v2ray sidecar (SOCKS on 127.0.0.1, dials the upstream with
its credentials) -> corral-playwright -> Chromium -> sidecar -> upstream -> site.

The script (benchmarks/scripts/first_page.mjs) emits `first_page` with Date.now() when
page.goto() resolved, and its own process start (performance.timeOrigin). Bare, the same
file launches the same persistent context with playwright-core directly (same flags and
launch options as the host), twice per round: through the local SOCKS5 proxy (`bare`, the
like-for-like baseline: one proxy, the same Chromium proxy path) and direct (`bare_direct`).
Rounds alternate the order of the three; round 1 is on fresh profiles (cold), the rest warm.
Then a memory phase (the page held open while /proc is sampled) and direct sidecar starts.
Prints one JSON object on stdout; progress on stderr.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import re
import shutil
import socket
import statistics
import tempfile
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from benchmarks.common import (
    FINAL_STATUSES,
    auth_headers,
    backend_settings,
    decode_command_pk,
    graphql,
    issue_admin_token,
    machine,
    observer_engine,
    percentiles,
    print_result,
    progress,
    run_command,
    server_log,
)

SCRIPTS = Path(__file__).resolve().parent / "scripts"
SCRIPT = SCRIPTS / "first_page.mjs"
DEBIAN_CHROMIUM_BINARY = "/usr/lib/chromium/chromium"
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"
USER, PASSWORD = "bench-user", "bench-Pa55-secret"
TEMPLATE = (
    "corral-playwright --profile {{ profile.dir }} --proxy {{ proxy.url }} -- "
    "first_page.mjs {{ params.url }} {{ params.hold }}"
)
TARGET_RATIO_MAX = 1.15
TARGET_SIDECAR_MS_MAX = 50.0
RUN_TIMEOUT = 90.0
MEMORY_RUNS = 3
HOLD_MS = 1500
SAMPLE_SECONDS = 0.05
BARE_MARKER = "CORRAL_BENCH_BARE_RUN"
SIDECAR_LINE = re.compile(r"proxy sidecar for .* listening on \S+ \(started in (\d+) ms\)")
VARIANTS = ("bare", "bare_direct", "corral")


# -- the bare run's proxy ----------------------------------------------------------------


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(Exception):
        writer.close()


@dataclass
class LocalSocks5:
    """An unauthenticated SOCKS5 proxy (CONNECT only) on 127.0.0.1 that dials directly.

    The bare run's stand-in for the upstream proxy: Chromium cannot answer a proxy's
    credentials challenge on its own (and not at all for SOCKS), so the bare run uses a
    proxy without any; with a socks5 proxy Playwright gives Chromium the same switches as
    through Corral's sidecar (remote DNS, loopback not bypassed)."""

    connects: list[str] = field(default_factory=list)
    server: Any = None

    def start(self) -> LocalSocks5:
        from tests.fixtures.netfakes import ThreadedServer

        self.server = ThreadedServer(self._handle).start()
        return self

    @property
    def url(self) -> str:
        return f"socks5://127.0.0.1:{self.server.port}"

    def stop(self) -> None:
        if self.server is not None:
            self.server.stop()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            _version, methods = await reader.readexactly(2)
            await reader.readexactly(methods)
            writer.write(b"\x05\x00")  # no authentication
            _version, command, _reserved, kind = await reader.readexactly(4)
            if kind == 1:
                host = socket.inet_ntop(socket.AF_INET, await reader.readexactly(4))
            elif kind == 4:
                host = socket.inet_ntop(socket.AF_INET6, await reader.readexactly(16))
            else:
                size = (await reader.readexactly(1))[0]
                host = (await reader.readexactly(size)).decode()
            port = int.from_bytes(await reader.readexactly(2), "big")
            if command != 1:
                writer.write(b"\x05\x07\x00\x01" + bytes(6))
                writer.close()
                return
            up_reader, up_writer = await asyncio.open_connection(host, port)
        except (asyncio.IncompleteReadError, OSError, UnicodeDecodeError):
            writer.close()
            return
        self.connects.append(f"{host}:{port}")
        writer.write(b"\x05\x00\x00\x01" + bytes(6))
        await writer.drain()
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


# -- memory ------------------------------------------------------------------------------


def _rollup(pid: int) -> tuple[int, int] | None:
    """(Rss, Pss) of a process in kB from smaps_rollup (Pss = Rss without smaps_rollup)."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
    except FileNotFoundError:
        try:
            rss_pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            return None
        rss = rss_pages * os.sysconf("SC_PAGE_SIZE") // 1024
        return rss, rss
    except OSError:
        return None
    values = {}
    for line in text.splitlines():
        name, _, rest = line.partition(":")
        if name in ("Rss", "Pss"):
            values[name] = int(rest.split()[0])
    if "Rss" not in values:
        return None  # a kernel thread or an exiting process
    return values["Rss"], values.get("Pss", values["Rss"])


def process_kind(cmdline: str) -> str:
    """A short name for a run's process: node, chromium:<type>, crashpad, sidecar, sh."""
    name = Path(cmdline.split(" ", 1)[0]).name
    if name == "chrome_crashpad_handler":
        return "crashpad"
    if name in ("chromium", "exe") or "--type=" in cmdline:  # zygote children: /proc/self/exe
        match = re.search(r"--type=(\S+)", cmdline)
        kind = match.group(1) if match else "browser"
        sub = re.search(r"--utility-sub-type=(\S+)", cmdline)
        return f"chromium:{kind}" + (f":{sub.group(1).split('.')[0]}" if sub else "")
    if name in ("v2ray", "xray"):
        return "sidecar"
    return name or "?"


def parent_pid(pid: int) -> int | None:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    fields = stat.rsplit(")", 1)[1].split()
    return None if fields[0] == "Z" else int(fields[1])


class TreeSampler(threading.Thread):
    """Samples, every SAMPLE_SECONDS, the Rss and Pss of a run's processes: those whose
    environment `classify` labels (a run's processes inherit a marker, including Chromium's
    crashpad handlers, which are re-parented to init) and their descendants; keeps the
    peaks, and which processes made up the peak."""

    def __init__(self, classify: Callable[[list[bytes]], str | None]) -> None:
        super().__init__(daemon=True)
        self.classify = classify
        self.labels: dict[int, str | None] = {}
        self.kinds: dict[int, str] = {}
        self.peak_pss_kb = 0
        self.peak_rss_kb = 0
        self.peak_by_label: dict[str, dict[str, int]] = {}
        self.at_peak: dict[str, dict[str, float]] = {}
        self.samples = 0
        self.max_processes = 0
        self.launcher_flags = False
        self._halt = threading.Event()

    def _own_label(self, pid: int) -> str | None:
        """The label the process's own environment gives (None: ask its parent)."""
        if pid not in self.labels:
            try:
                environ = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
            except OSError:
                return None
            self.labels[pid] = self.classify(environ)
        return self.labels[pid]

    def _members(self) -> dict[int, str]:
        """This moment's processes of the run: those whose environment carries the marker
        and their descendants (Chromium's zygote children overwrite their environment
        with their process title, so the marker is gone from theirs)."""
        parents = {}
        for entry in os.scandir("/proc"):
            if entry.name.isdigit():
                ppid = parent_pid(int(entry.name))
                if ppid is not None:
                    parents[int(entry.name)] = ppid
        found: dict[int, str | None] = {}

        def label(pid: int, depth: int = 0) -> str | None:
            if pid not in found:
                own = self._own_label(pid)
                if own is None and pid in parents and depth < 32:
                    own = label(parents[pid], depth + 1)
                found[pid] = own
            return found[pid]

        return {pid: name for pid in parents if (name := label(pid)) is not None}

    def _kind(self, pid: int) -> str:
        # A shell (Debian's chromium launcher) exec's Chromium under the same PID: look again.
        if pid not in self.kinds or self.kinds[pid] == "sh":
            with contextlib.suppress(OSError):
                raw = Path(f"/proc/{pid}/cmdline").read_bytes()
                cmdline = raw.replace(b"\0", b" ").decode(errors="replace")
                self.kinds[pid] = process_kind(cmdline)
                # A flag only Debian's /usr/bin/chromium launcher adds (/etc/chromium.d).
                self.launcher_flags |= "--enable-gpu-rasterization" in cmdline
        return self.kinds.get(pid, "?")

    def sample(self) -> None:
        totals: dict[str, list[int]] = {}
        kinds: dict[str, dict[str, float]] = {}
        for pid, label in self._members().items():
            usage = _rollup(pid)
            if usage is None:
                continue
            total = totals.setdefault(label, [0, 0])
            total[0] += usage[0]
            total[1] += usage[1]
            kind = kinds.setdefault(self._kind(pid), {"count": 0, "pss_mb": 0.0})
            kind["count"] += 1
            kind["pss_mb"] += usage[1] / 1024
        self.samples += 1
        self.max_processes = max(self.max_processes, sum(int(k["count"]) for k in kinds.values()))
        self.peak_rss_kb = max(self.peak_rss_kb, sum(t[0] for t in totals.values()))
        pss = sum(t[1] for t in totals.values())
        if pss > self.peak_pss_kb:
            self.peak_pss_kb = pss
            self.at_peak = kinds
        for label, (rss, label_pss) in totals.items():
            peak = self.peak_by_label.setdefault(label, {"rss_kb": 0, "pss_kb": 0})
            peak["rss_kb"] = max(peak["rss_kb"], rss)
            peak["pss_kb"] = max(peak["pss_kb"], label_pss)

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(SAMPLE_SECONDS)

    def finish(self) -> dict[str, Any]:
        self._halt.set()
        self.join(5)
        return {
            "peak_pss_mb": round(self.peak_pss_kb / 1024, 1),
            "peak_rss_sum_mb": round(self.peak_rss_kb / 1024, 1),
            "by_label": {
                label: {k.replace("_kb", "_mb"): round(v / 1024, 1) for k, v in peak.items()}
                for label, peak in self.peak_by_label.items()
            },
            "processes_at_peak": {
                kind: {"count": int(v["count"]), "pss_mb": round(v["pss_mb"], 1)}
                for kind, v in sorted(self.at_peak.items())
            },
            "samples": self.samples,
            "max_processes": self.max_processes,
            "debian_launcher_flags": self.launcher_flags,
        }


def env_classifier(markers: dict[str, str]) -> Callable[[list[bytes]], str | None]:
    """Label a process by the first `NAME=value-prefix` (→ label) its environment carries."""
    wanted = [(prefix.encode(), label) for prefix, label in markers.items()]

    def classify(environ: list[bytes]) -> str | None:
        for prefix, label in wanted:
            if any(item.startswith(prefix) for item in environ):
                return label
        return None

    return classify


# -- runs --------------------------------------------------------------------------------


def ms(seconds: float) -> float:
    return round(seconds * 1000, 1)


def epoch(value: datetime) -> float:
    """A database timestamp as epoch seconds (naive ones are UTC)."""
    if value.tzinfo is None:
        value = value.replace(tzinfo=UTC)
    return value.timestamp()


def first_page_event(stdout: str) -> dict[str, Any]:
    for line in stdout.splitlines():
        if line.startswith("::corral::"):
            event: dict[str, Any] = json.loads(line[len("::corral::") :])
            if event.get("type") == "first_page":
                return event
    raise RuntimeError(f"no first_page event in {stdout[-500:]!r}")


def script_steps(event: dict[str, Any]) -> dict[str, float]:
    """The run's steps inside Node (epoch milliseconds from the script)."""
    return {
        "node_start_to_script_loaded": round(event["module_at"] - event["node_start"], 1),
        "script_loaded_to_page_ready": round(event["called_at"] - event["module_at"], 1),
        "goto": round(event["at"] - event["called_at"], 1),
    }


@dataclass
class Bench:
    """What every run needs."""

    http: Any
    observer: Any
    workdir: Path
    site_url: str
    socks_url: str
    bare_chromium: str
    supervisor: Any
    ids: dict[str, str]
    bare_profiles: dict[str, Path]


async def bare_run(bench: Bench, variant: str, hold_ms: int = 0) -> dict[str, Any]:
    """The script with playwright-core directly: spawn -> first page."""
    token = uuid.uuid4().hex
    argv = [
        shutil.which("node") or "node",
        str(SCRIPT),
        "--bare",
        "--profile",
        str(bench.bare_profiles[variant]),
        "--chromium",
        bench.bare_chromium,
    ]
    if variant == "bare":
        argv += ["--proxy", bench.socks_url]
    argv += ["--", f"{bench.site_url}/", str(hold_ms)]
    env = {
        "PATH": SYSTEM_PATH,
        "HOME": os.environ.get("HOME", "/tmp"),  # noqa: S108 - a fallback HOME only
        "LANG": os.environ.get("LANG", "C.UTF-8"),
        BARE_MARKER: token,
    }
    sampler = None
    if hold_ms:  # a memory run
        sampler = TreeSampler(env_classifier({f"{BARE_MARKER}={token}": "node+chromium"}))
        sampler.start()
    cpu = time.process_time()
    spawned = time.time()
    process = await asyncio.create_subprocess_exec(
        *argv,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
        env=env,
        cwd=bench.workdir,
        start_new_session=True,
    )
    try:
        out, err = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT)
    finally:
        if process.returncode is None:
            process.kill()
            await process.wait()
    exited = time.time()
    cpu = time.process_time() - cpu
    memory = sampler.finish() if sampler is not None else None
    if process.returncode != 0:
        raise RuntimeError(f"bare run ({variant}) exited {process.returncode}: {err.decode()}")
    event = first_page_event(out.decode())
    return {
        "to_first_page": round(event["at"] - spawned * 1000, 1),
        "node_start_to_first_page": round(event["at"] - event["node_start"], 1),
        "node_start_to_page_ready": round(event["called_at"] - event["node_start"], 1),
        "total": ms(exited - spawned),
        "python_cpu": ms(cpu),
        "steps": {"spawn_to_node_start": round(event["node_start"] - spawned * 1000, 1)}
        | script_steps(event),
        "memory": memory,
    }


async def wait_final(bench: Bench, pk: int) -> str:
    """Wait for the command's attempt task in the embedded runner (no database polling,
    whose CPU would compete with the browser); then read its final status."""
    from sqlalchemy import select

    from server.models import Command

    async def status() -> str | None:
        async with bench.observer.connect() as connection:
            value = await connection.scalar(select(Command.status).where(Command.id == pk))
        return None if value is None else str(value)

    deadline = time.monotonic() + RUN_TIMEOUT
    attempts = bench.supervisor.attempts
    checked = time.monotonic()
    while time.monotonic() < deadline:
        attempt = attempts.get(pk)
        if attempt is not None and attempt.task is not None:
            with contextlib.suppress(Exception):
                await asyncio.wait_for(asyncio.shield(attempt.task), RUN_TIMEOUT)
        elif time.monotonic() - checked < 0.5:
            await asyncio.sleep(0.005)
            continue
        checked = time.monotonic()
        final = await status()
        if final in FINAL_STATUSES:
            return str(final)
    raise TimeoutError(f"command {pk} not final in {RUN_TIMEOUT:.0f}s")


async def corral_run(bench: Bench, hold_ms: int = 0) -> dict[str, Any]:
    """runCommand -> claim -> sidecar -> corral-playwright -> first page."""
    from sqlalchemy import select

    from server.models import Command, CommandEvent, LogLine

    sampler = None
    if hold_ms:  # a memory run
        sampler = TreeSampler(
            env_classifier(
                {
                    f"CORRAL_SIDECAR_OF={bench.supervisor.runner_id}/": "sidecar",
                    f"CORRAL_RUN={bench.supervisor.runner_id}/": "node+chromium",
                }
            )
        )
        sampler.start()
    cpu = time.process_time()
    sent = time.time()
    command_id = await run_command(
        bench.http,
        templateId=bench.ids["template"],
        profileId=bench.ids["profile"],
        params={"url": f"{bench.site_url}/", "hold": str(hold_ms)},
    )
    accepted = time.time()
    pk = decode_command_pk(command_id)
    status = await wait_final(bench, pk)
    cpu = time.process_time() - cpu
    memory = sampler.finish() if sampler is not None else None
    async with bench.observer.connect() as connection:
        row = (
            await connection.execute(
                select(
                    Command.created_at, Command.started_at, Command.finished_at, Command.error
                ).where(Command.id == pk)
            )
        ).one()
        system = (
            await connection.execute(
                select(LogLine.ts, LogLine.text)
                .where(LogLine.command_id == pk, LogLine.stream == "system")
                .order_by(LogLine.seq)
            )
        ).all()
        events = (
            await connection.execute(
                select(CommandEvent.data).where(
                    CommandEvent.command_id == pk, CommandEvent.type == "first_page"
                )
            )
        ).all()
        stderr = (
            await connection.execute(
                select(LogLine.text).where(LogLine.command_id == pk, LogLine.stream == "stderr")
            )
        ).all()
    if status != "SUCCEEDED" or not events:
        lines = [text for _ts, text in system] + [text for (text,) in stderr]
        raise RuntimeError(f"Corral run {pk} ended {status}: {row.error}; {lines[-8:]}")
    event: dict[str, Any] = events[0][0]
    sidecar = next(((ts, t) for ts, t in system if SIDECAR_LINE.search(t)), None)
    attempt = next(((ts, t) for ts, t in system if t.startswith("attempt ")), None)
    if sidecar is None or attempt is None:
        raise RuntimeError(f"Corral run {pk}: no sidecar/attempt SYSTEM line in {system}")
    match = SIDECAR_LINE.search(sidecar[1])
    assert match is not None
    created, started = epoch(row.created_at), epoch(row.started_at)
    sidecar_at, spawn_at = epoch(sidecar[0]), epoch(attempt[0])
    return {
        "to_first_page": round(event["at"] - created * 1000, 1),
        "sent_to_first_page": round(event["at"] - sent * 1000, 1),
        "spawn_to_first_page": round(event["at"] - spawn_at * 1000, 1),
        "node_start_to_first_page": round(event["at"] - event["node_start"], 1),
        "node_start_to_page_ready": round(event["called_at"] - event["node_start"], 1),
        "total": ms(epoch(row.finished_at) - created),
        "python_cpu": ms(cpu),
        "runcommand_latency": ms(accepted - sent),
        "sidecar_start_logged": int(match.group(1)),
        "steps": {
            "queued_to_claimed": ms(started - created),
            # Loading the command, profile, proxy chain (decrypted) and starting the log
            # writer: claimed -> sidecar listening, minus the sidecar's own start.
            "load_and_prepare": round(ms(sidecar_at - started) - int(match.group(1)), 1),
            "sidecar_start": float(match.group(1)),
            "sidecar_listening_to_spawn": ms(spawn_at - sidecar_at),
            "spawn_to_node_start": round(event["node_start"] - spawn_at * 1000, 1),
        }
        | script_steps(event),
        "memory": memory,
    }


async def sidecar_starts(upstream_port: int, count: int) -> list[float]:
    """SidecarProcess start (reachability check, config, spawn, listening) `count` times."""
    from xray.binary import find_binary
    from xray.config import Hop
    from xray.sidecar import SidecarProcess

    binary = find_binary(os.environ.get("CORRAL_XRAY_BIN") or None)
    hop = Hop("up", "http", "127.0.0.1", upstream_port, USER, PASSWORD)
    times = []
    for _ in range(count):
        sidecar = SidecarProcess(binary, [hop])
        async with sidecar:
            pass
        assert sidecar.started_in is not None
        times.append(sidecar.started_in * 1000)
    return times


# -- the whole benchmark -----------------------------------------------------------------


async def world(http: Any, upstream_port: int) -> dict[str, str]:
    """A template, the upstream proxy (with credentials) and a profile it is attached to."""
    template = await graphql(
        http,
        """mutation($t: String!) { createCommandTemplate(input: {name: "first-page",
        template: $t, parameters: [{name: "url"}, {name: "hold", default: "0"}],
        timeoutSeconds: 120}) { commandTemplate { id } userErrors { message } } }""",
        t=TEMPLATE,
    )
    proxy = await graphql(
        http,
        """mutation($port: Int!, $u: String!, $p: String!) { createProxy(input: {name: "up",
        protocol: "http", host: "127.0.0.1", port: $port, username: $u, password: $p}) {
        proxy { id } userErrors { message } } }""",
        port=upstream_port,
        u=USER,
        p=PASSWORD,
    )
    profile = await graphql(
        http,
        'mutation { createProfile(input: {name: "bench"}) { profile { id } '
        "userErrors { message } } }",
    )
    ids = {
        "template": template["createCommandTemplate"]["commandTemplate"]["id"],
        "proxy": proxy["createProxy"]["proxy"]["id"],
        "profile": profile["createProfile"]["profile"]["id"],
    }
    attached = await graphql(
        http,
        "mutation($p: ID!, $x: ID!) { attachProxy(input: {profileId: $p, proxyId: $x}) "
        "{ userErrors { message } } }",
        p=ids["profile"],
        x=ids["proxy"],
    )
    if attached["attachProxy"]["userErrors"]:
        raise RuntimeError(f"attachProxy: {attached['attachProxy']['userErrors']}")
    return ids


def host_chromium(configured: str) -> str:
    """The binary corral-playwright launches when given no path (its resolveChromium)."""
    try:
        with open(configured, "rb") as handle:
            is_script = handle.read(2) == b"#!"
    except OSError:
        is_script = False
    if is_script and os.access(DEBIAN_CHROMIUM_BINARY, os.X_OK):
        return DEBIAN_CHROMIUM_BINARY
    return configured


def p50(values: list[float]) -> float | None:
    return round(statistics.median(values), 1) if values else None


def summarize(results: list[dict[str, Any]], keys: list[str]) -> dict[str, Any]:
    """Cold (first run) and warm p50 of each timing, warm percentiles of the main one."""
    warm = results[1:]
    out: dict[str, Any] = {"cold": results[0]["to_first_page"]}
    out["warm_p50"] = p50([r["to_first_page"] for r in warm])
    out["warm"] = percentiles([r["to_first_page"] for r in warm], 1)
    for key in keys:
        out[key] = {"cold": results[0][key], "warm_p50": p50([r[key] for r in warm])}
    out["steps_cold"] = results[0]["steps"]
    out["steps_warm_p50"] = {
        step: p50([r["steps"][step] for r in warm]) for step in results[0]["steps"]
    }
    return out


def ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 3) if a is not None and b else None


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    import httpx

    from server.app import create_app
    from tests.fixtures.netfakes import LocalSite, UpstreamHttpProxy

    began = time.monotonic()
    load = os.getloadavg()[0]
    site = LocalSite().start()
    upstream = UpstreamHttpProxy(USER, PASSWORD).start()
    socks = LocalSocks5().start()
    overrides: dict[str, Any] = {"scripts_dir": SCRIPTS, "kill_grace_seconds": 3.0}
    if args.chromium:
        overrides["chromium_path"] = args.chromium
    try:
        with tempfile.TemporaryDirectory(prefix="corral-bench-browser-") as folder:
            workdir = Path(folder)
            with server_log(workdir, "browser_run"):
                async with backend_settings("sqlite", workdir, **overrides) as settings:
                    app = create_app(settings)
                    async with (
                        app.router.lifespan_context(app),
                        httpx.AsyncClient(
                            transport=httpx.ASGITransport(app=app), base_url="http://localhost"
                        ) as http,
                    ):
                        http.headers.update(auth_headers(await issue_admin_token(app)))
                        observer = observer_engine(settings)
                        try:
                            bench = Bench(
                                http=http,
                                observer=observer,
                                workdir=workdir,
                                site_url=site.url,
                                socks_url=socks.url,
                                bare_chromium=host_chromium(settings.chromium_path),
                                supervisor=app.state.supervisor,
                                ids=await world(http, upstream.port),
                                bare_profiles={
                                    v: workdir / f"profile-{v}" for v in ("bare", "bare_direct")
                                },
                            )
                            result = await measure(bench, args, upstream.port)
                        finally:
                            await observer.dispose()
                    result["corral_chromium_path"] = settings.chromium_path
    finally:
        for server in (socks, upstream, site):
            server.stop()
    result["proxy_traffic"] = {
        "upstream_connects": len(upstream.connects),
        "upstream_refused": upstream.refused,
        "socks_connects": len(socks.connects),
        "site_requests": len(site.requests),
    }
    result["machine"] = machine(load)
    result["wall_seconds"] = round(time.monotonic() - began, 1)
    return result


async def measure(bench: Bench, args: argparse.Namespace, upstream_port: int) -> dict[str, Any]:
    runs: int = args.runs
    # Warm the page cache (node, playwright-core, Chromium, v2ray) on a throwaway profile, so
    # "cold" below means a fresh profile, not a cold disk cache.
    progress("warm-up: one bare run on a throwaway profile, one sidecar start")
    spare = {**bench.bare_profiles, "bare_direct": bench.workdir / "profile-warmup"}
    await bare_run(dataclasses.replace(bench, bare_profiles=spare), "bare_direct")
    await sidecar_starts(upstream_port, 1)

    results: dict[str, list[dict[str, Any]]] = {v: [] for v in VARIANTS}
    for index in range(runs):
        shift = index % len(VARIANTS)
        order = VARIANTS[shift:] + VARIANTS[:shift]
        for variant in order:
            if variant == "corral":
                result = await corral_run(bench)
            else:
                result = await bare_run(bench, variant)
            results[variant].append(result)
        progress(
            f"round {index + 1}/{runs} ({'cold' if index == 0 else 'warm'}): "
            + ", ".join(f"{v} {results[v][-1]['to_first_page']:.0f} ms" for v in order)
        )

    progress(f"memory: {MEMORY_RUNS} x (bare, corral), page held {HOLD_MS} ms, /proc sampled")
    memory: dict[str, list[dict[str, Any]]] = {"bare": [], "corral": []}
    for _ in range(MEMORY_RUNS):
        memory["bare"].append((await bare_run(bench, "bare", HOLD_MS))["memory"])
        memory["corral"].append((await corral_run(bench, HOLD_MS))["memory"])

    direct_count = max(2 * runs, 10)
    progress(f"sidecar: {direct_count} direct SidecarProcess starts")
    direct = await sidecar_starts(upstream_port, direct_count)
    return report(bench, runs, results, memory, direct)


def report(
    bench: Bench,
    runs: int,
    results: dict[str, list[dict[str, Any]]],
    memory: dict[str, list[dict[str, Any]]],
    direct: list[float],
) -> dict[str, Any]:
    common = ["node_start_to_first_page", "node_start_to_page_ready", "total", "python_cpu"]
    bare = summarize(results["bare"], common)
    direct_run = summarize(results["bare_direct"], common)
    corral = summarize(results["corral"], ["sent_to_first_page", "spawn_to_first_page", *common])
    paired = [
        c["to_first_page"] / b["to_first_page"]
        for c, b in zip(results["corral"][1:], results["bare"][1:], strict=True)
    ]
    ratio_warm = ratio(corral["warm_p50"], bare["warm_p50"])
    logged = [float(r["sidecar_start_logged"]) for r in results["corral"]]
    logged_stats = percentiles(logged, 1)
    direct_stats = percentiles(direct, 1)

    def peak(variant: str, key: str, label: str | None = None) -> float:
        """The median over the memory runs of each run's peak."""
        values = [
            (m["by_label"].get(label, {}).get(key, 0.0) if label else m[key])
            for m in memory[variant]
        ]
        return round(statistics.median(values), 1)

    memory_mb = {
        "bare_peak_pss": peak("bare", "peak_pss_mb"),
        "corral_peak_pss": peak("corral", "peak_pss_mb"),
        "corral_browser_peak_pss": peak("corral", "pss_mb", "node+chromium"),
        "sidecar_rss": peak("corral", "rss_mb", "sidecar"),
        "sidecar_pss": peak("corral", "pss_mb", "sidecar"),
        "bare_peak_rss_sum": peak("bare", "peak_rss_sum_mb"),
        "corral_peak_rss_sum": peak("corral", "peak_rss_sum_mb"),
        "runs": memory,
    }
    memory_mb["ratio_peak_pss"] = ratio(memory_mb["corral_peak_pss"], memory_mb["bare_peak_pss"])
    meets = {
        "time_ratio_warm_p50": ratio_warm is not None and ratio_warm <= TARGET_RATIO_MAX,
        "sidecar_start_p90_logged": (logged_stats["p90"] or 0) <= TARGET_SIDECAR_MS_MAX,
        "sidecar_start_p90_direct": (direct_stats["p90"] or 0) <= TARGET_SIDECAR_MS_MAX,
    }
    return {
        "benchmark": "browser_run",
        "runs": runs,
        "database": "sqlite (embedded default, in a temp data dir); app in-process "
        "(create_app + lifespan, embedded runner), GraphQL over httpx's ASGI transport",
        "time_to_first_page_ms": {
            "definitions": {
                "corral": "command row created (runCommand accepted) -> page.goto() resolved "
                "in the script (its Date.now()); sent_to_first_page counts from posting "
                "runCommand; spawn_to_first_page from the SYSTEM 'attempt' line (stamped just "
                "after the child is spawned); node_start_to_first_page from the Node "
                "process's start (performance.timeOrigin)",
                "bare": "bare run through an unauthenticated local SOCKS5 proxy: spawn of "
                "`node first_page.mjs --bare` -> page.goto() resolved",
                "bare_direct": "the same without a proxy",
                "cold": "round 1: a fresh user-data-dir for each (after a page-cache warm-up "
                "run on a throwaway profile)",
                "warm": f"rounds 2..{runs}, same profiles; order rotated each round",
                "steps": "per-run intervals between those timestamps (they add up to "
                "to_first_page); node_start_to_script_loaded differs in meaning (host: node "
                "boot + argument parsing + script import, while playwright-core loads in "
                "parallel; bare: node boot only), so compare node_start_to_page_ready (both "
                "steps: up to the launched Chromium's first page object) as a whole",
                "python_cpu": "CPU time of the benchmark's process (Corral's server and "
                "runner, the site and proxy threads, the benchmark's own polling) during "
                "the run",
            },
            "bare": bare,
            "bare_direct": direct_run,
            "corral": corral,
            "ratio_warm_p50": ratio_warm,
            "ratio_warm_paired_median": round(statistics.median(paired), 3) if paired else None,
            "ratio_warm_p50_vs_direct": ratio(corral["warm_p50"], direct_run["warm_p50"]),
            "ratio_cold": ratio(corral["cold"], bare["cold"]),
            "ratio_node_start_warm_p50": ratio(
                corral["node_start_to_first_page"]["warm_p50"],
                bare["node_start_to_first_page"]["warm_p50"],
            ),
            "target_ratio_max": TARGET_RATIO_MAX,
        },
        "memory_mb": memory_mb,
        "sidecar_start_ms": {
            "p50": logged_stats["p50"],
            "p90": logged_stats["p90"],
            "max": logged_stats["max"],
            "n": logged_stats["n"],
            "source": "the SYSTEM line 'proxy sidecar ... (started in N ms)' of every "
            "Corral run (whole ms)",
            "direct": direct_stats,
            "direct_source": "xray.sidecar.SidecarProcess(...).start() with a Hop to the "
            "local upstream proxy, started and stopped one after another (started_in)",
            "target_ms_max": TARGET_SIDECAR_MS_MAX,
        },
        "meets_targets": meets | {"all": all(meets.values())},
        "bare_chromium": bench.bare_chromium,
        "corral_browser_via_debian_launcher": any(
            m["debian_launcher_flags"] for m in memory["corral"]
        ),
        "notes": notes(bench, memory_mb),
    }


def notes(bench: Bench, memory_mb: dict[str, Any]) -> list[str]:
    out = [
        "Bare baseline = the same script with playwright-core directly, through an "
        "unauthenticated local SOCKS5 proxy that dials the site itself ('bare'), and direct "
        "('bare_direct'). Not through the upstream proxy: it demands basic auth, which "
        "Chromium cannot answer on its own (not at all for SOCKS; Playwright's proxy "
        "username/password works by intercepting every request, which would not be the same "
        "script either), and it only tunnels CONNECT while Chromium sends plain-HTTP pages to "
        "an HTTP proxy as absolute-URI GETs. So Corral's path has one hop more (the sidecar): "
        "Chromium -> v2ray SOCKS -> upstream HTTP CONNECT (auth) -> site, vs Chromium -> "
        "SOCKS5 -> site. Both get the same Chromium proxy switches from Playwright.",
        "Steps (corral): queued_to_claimed, load_and_prepare (command, profile, proxy chain "
        "decryption, log writer), sidecar_start (as logged), sidecar_listening_to_spawn "
        "(argv rendering), spawn_to_node_start (fork/exec, the runner/bin/corral-playwright "
        "sh wrapper, node boot), then the script's own timestamps.",
        f"Memory: peak of the summed Pss (smaps_rollup) of every process carrying the run's "
        f"environment marker (node, Chromium's browser/zygote/renderer/utility processes, "
        f"crashpad handlers re-parented to init, and for Corral the v2ray sidecar), sampled "
        f"every {SAMPLE_SECONDS * 1000:.0f} ms from spawn to exit with the page held open "
        f"{HOLD_MS} ms after it loaded; the median over {MEMORY_RUNS} runs each of the "
        "run's peak (all runs under memory_mb.runs). Pss shares "
        "pages with other processes on the host (other Chromiums too); the Corral server "
        "process itself is not counted (it exists with or without a run).",
        "The site, the upstream proxy and the SOCKS5 proxy are asyncio threads in the "
        "benchmark's process, which also runs Corral's server and embedded runner (one GIL); "
        "each run is awaited on the embedded runner's attempt task (Corral) or on the "
        "process (bare), without polling. Timestamps are wall clock (Python time.time(), "
        "Node Date.now(), Corral's UTC row times) on one host.",
    ]
    if any(m["debian_launcher_flags"] for m in memory_mb["runs"]["corral"]):
        out.append(
            "Corral's Chromium is started through Debian's /usr/bin/chromium launcher script: "
            "the runner passes its chromium_path setting (default /usr/bin/chromium) as "
            "CORRAL_CHROMIUM_PATH, which corral-playwright uses as given (it skips the "
            "launcher only for its own default). The bare run launches "
            f"{bench.bare_chromium}, what the host picks when nothing is set. The launcher "
            "runs a shell, greps /proc/cpuinfo, findmnt, sources /etc/chromium.d and adds "
            "flags (--enable-gpu-rasterization, --enable-remote-extensions, "
            "--load-extension=...): part of Corral's script_loaded_to_page_ready."
        )
    load = os.getloadavg()[0]
    if load > (os.cpu_count() or 1):
        out.append(f"The machine was loaded (1-minute load {load:.1f}): expect noise.")
    out.append(
        "Corral's cold run also pays the runner's one-time look-up of the v2ray binary "
        "(`v2ray -version`) in load_and_prepare."
    )
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--runs", type=int, default=20, help="rounds (bare, bare_direct, corral); >= 2"
    )
    parser.add_argument(
        "--chromium",
        help="Corral's chromium_path setting (default: Corral's default, /usr/bin/chromium)",
    )
    args = parser.parse_args()
    if args.runs < 2:
        parser.error("--runs must be at least 2 (one cold run, then warm runs)")
    result = asyncio.run(main_async(args))
    print_result(result)


if __name__ == "__main__":
    main()
