"""A proxy sidecar: one Xray/V2Ray process per proxied run, listening on a local SOCKS port.

Upstream credentials exist only in its config file (mode 0600, in a private folder that
is removed when the sidecar stops). The process runs in its own process group and is
stopped like every other child: TERM, grace, KILL, always reaped.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
import socket
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from runner.oskit.groups import stop_group
from runner.oskit.splitter import LineSplitter
from runner.oskit.subreaper import SPAWNED, starting_own_child
from xray.binary import XrayBinary
from xray.config import ConfigError, build_config, features_used, write_config
from xray.hops import Hop
from xray.probe import PROBE_TIMEOUT, Problem, probe_hop
from xray.routing import Routing, asset_env, build_routed_config, features_of
from xray.sidecar_log import SidecarLog, binary_level

LineSink = Callable[[str], Awaitable[None]]
SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"


class SidecarError(Exception):
    """The sidecar could not start or its upstream cannot be reached (message for the user)."""

    def __init__(self, message: str, problem: Problem | None = None) -> None:
        super().__init__(message)
        self.problem = problem


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def sidecar_url(port: int | str) -> str:
    """The URL a child reaches the sidecar on port `port` by (a preview passes a placeholder)."""
    return f"socks5://127.0.0.1:{port}"


class SidecarProcess:
    """One running sidecar. Use `async with SidecarProcess(...) as sidecar: sidecar.url`."""

    def __init__(
        self,
        binary: XrayBinary,
        chain: Sequence[Hop],
        *,
        on_line: LineSink | None = None,
        start_timeout: float = 10.0,
        grace: float = 2.0,
        env: dict[str, str] | None = None,
        routing: Routing | None = None,
        assets_dir: Path | None = None,
        log_level: str = "warning",
        trace: bool = False,
        probe_target: tuple[str, int] = ("127.0.0.1", 9),
        probe_label: str = "",
        probe_timeout: float = PROBE_TIMEOUT,
    ) -> None:
        self.binary = binary
        self.chain = list(chain)
        self.routing = routing
        self.on_line = on_line
        self.start_timeout = start_timeout
        self.grace = grace
        # Minimal: the sidecar needs no settings or keys of Corral's (only its config file).
        self.env = {**(env if env is not None else {"PATH": SYSTEM_PATH}), **asset_env(assets_dir)}
        self.log = SidecarLog(
            self.chain,
            level=log_level,
            trace=trace,
            via_chains=routing.via_chains if routing is not None else {},
        )
        self.probe_target = probe_target
        self.probe_label = probe_label
        self.probe_timeout = probe_timeout
        # What the probe found wrong that does not stop a run (the upstream cannot reach
        # `probe_target`, which the run itself may never ask for).
        self.probe_problem: Problem | None = None
        self.port = 0
        self.started_in: float | None = None
        self._process: asyncio.subprocess.Process | None = None
        self._folder: Path | None = None
        self._pumps: list[asyncio.Task[None]] = []

    @property
    def url(self) -> str:
        """The local, unauthenticated SOCKS URL children use."""
        return sidecar_url(self.port)

    async def __aenter__(self) -> SidecarProcess:
        await self.start()
        return self

    async def __aexit__(self, *_exc: object) -> None:
        await asyncio.shield(self.stop())

    async def start(self) -> None:
        """Write the config, start the binary, and wait until it listens."""
        began = time.monotonic()
        if not self.chain:
            raise SidecarError("a sidecar needs at least one proxy")
        await self._probe()  # the hop Xray dials first; fail early, closed, and say why
        self._folder = Path(tempfile.mkdtemp(prefix="corral-sidecar-"))
        try:
            self.port = free_port()
            try:
                config, needed = self._config()
                unsupported = self.binary.unsupported(needed)
            except ConfigError as exc:
                raise SidecarError(f"cannot build the proxy config: {exc}") from exc
            if unsupported:
                raise SidecarError(
                    f"{self.binary.describe()} cannot run {', '.join(unsupported)}; "
                    "install Xray-core and set CORRAL_XRAY_BIN"
                )
            path = write_config(config, self._folder)
            with starting_own_child():  # a subreaper runner must leave it to asyncio
                self._process = await asyncio.create_subprocess_exec(
                    *self.binary.run_args(path),
                    stdin=asyncio.subprocess.DEVNULL,
                    stdout=asyncio.subprocess.PIPE,
                    stderr=asyncio.subprocess.STDOUT,
                    start_new_session=True,
                    env=self.env,
                )
                SPAWNED.add(self._process.pid)
            assert self._process.stdout is not None
            self._pumps.append(asyncio.create_task(self._pump(self._process.stdout)))
            await self._wait_listening()
        except BaseException:
            await asyncio.shield(self.stop())
            raise
        self.started_in = time.monotonic() - began

    async def _probe(self) -> None:
        """Speak to the first hop; SidecarError when it refuses us or cannot be reached."""
        first = self.chain[-1]
        target, label = self.probe_target, self.probe_label
        if len(self.chain) > 1:  # it must reach the next hop, whatever the run asks for
            following = self.chain[-2]
            target = (following.host, following.port)
            label = f"the next hop {following.name!r} ({following.host}:{following.port})"
        problem = await probe_hop(first, target, label=label, timeout=self.probe_timeout)
        if problem is None:
            return
        if problem.kind == "target" and len(self.chain) == 1:
            self.probe_problem = problem
            return
        raise SidecarError(problem.message, problem)

    def _config(self) -> tuple[dict[str, Any], frozenset[str]]:
        """The config to run and the binary features it needs (ConfigError if none)."""
        level = binary_level(self.log.level)
        if self.routing is None:
            config = build_config(self.chain, self.port, log_level=level)
            needed = features_used(self.chain)
        else:
            config = build_routed_config(self.chain, self.port, self.routing, log_level=level)
            needed = features_used(self.chain) | features_of(self.routing)
        # V2Ray writes its access log to stdout unless told "none": only a trace wants it.
        if not self.log.trace:
            config["log"]["access"] = "none"
        return config, needed

    async def _wait_listening(self) -> None:
        assert self._process is not None
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self._process.returncode is not None:
                await asyncio.gather(*self._pumps, return_exceptions=True)
                raise SidecarError(
                    f"the proxy sidecar ({self.binary.flavor}) exited with status "
                    f"{self._process.returncode} before listening"
                )
            try:
                _reader, writer = await asyncio.open_connection("127.0.0.1", self.port)
            except OSError:
                await asyncio.sleep(0.005)
                continue
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()
            return
        raise SidecarError(f"the proxy sidecar did not listen within {self.start_timeout}s")

    async def _pump(self, stream: asyncio.StreamReader) -> None:
        splitter = LineSplitter(64 * 1024)
        while chunk := await stream.read(65536):
            for line in splitter.feed(chunk):
                await self._emit(line)
        for line in splitter.close():
            await self._emit(line)

    async def _emit(self, line: str) -> None:
        if not line.strip():
            return
        for text in self.log.feed(line):
            if self.on_line is not None:
                await self.on_line(text)

    async def stop(self) -> None:
        """Stop the process group and remove the config (the only copy of the credentials)."""
        process, self._process = self._process, None
        if process is not None:
            await stop_group(process.pid, process, self.grace)
            SPAWNED.discard(process.pid)
        if self._pumps:
            await asyncio.gather(*self._pumps, return_exceptions=True)
            self._pumps = []
            for text in self.log.close():
                if self.on_line is not None:
                    await self.on_line(text)
        if self._folder is not None:
            shutil.rmtree(self._folder, ignore_errors=True)
            self._folder = None
