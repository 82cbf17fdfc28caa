"""The Playwright host (runner/bin/corral-playwright) with real Chromium and real processes.

A small site runs in-test on 127.0.0.1 (a persistent cookie, a page showing the cookies it
received, a login form). Each test runs the host as Corral would: a subprocess in its own
working directory, on a temp profile dir.
"""

from __future__ import annotations

import contextlib
import fcntl
import html
import json
import os
import queue
import selectors
import shutil
import signal
import socket
import socketserver
import struct
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

ROOT = Path(__file__).resolve().parents[1]
HOST = ROOT / "runner" / "bin" / "corral-playwright"
JS_DIR = ROOT / "runner" / "js"
EXAMPLES = JS_DIR / "examples"
EVENT_PREFIX = "::corral::"
RUN_TIMEOUT = 60.0

COOKIE = "corral_test"

VISIT = """
export default async function ({ page, emit, args }) {
  const response = await page.goto(args[0]);
  emit('page', {
    status: response.status(),
    title: await page.title(),
    text: await page.locator('body').innerText(),
  });
}
"""

# Waits until a file named `go` appears in its working directory, then visits args[0].
WAIT_FOR_GO = """
import fs from 'node:fs';
export default async function ({ page, emit, args }) {
  if (args[0]) await page.goto(args[0]);
  emit('ready', {pid: process.pid});
  while (!fs.existsSync('go')) await new Promise((r) => setTimeout(r, 50));
  await page.goto(args[1]);
  emit('page', {text: await page.locator('body').innerText()});
}
"""

SETTINGS = """
export default async function ({ page, emit }) {
  await page.goto('about:blank');
  emit('browser', await page.evaluate(() => ({
    userAgent: navigator.userAgent,
    language: navigator.language,
    innerWidth: window.innerWidth,
    innerHeight: window.innerHeight,
    timezone: Intl.DateTimeFormat().resolvedOptions().timeZone,
  })));
}
"""


# ------------------------------------------------------------------ the test site


@dataclass
class Site:
    base_url: str
    logins: list[dict[str, str]] = field(default_factory=list)
    cookies_seen: list[str] = field(default_factory=list)

    def url(self, path: str) -> str:
        return self.base_url + path


def _handler(site: Site) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, format: str, *args: Any) -> None:
            pass

        def _page(self, title: str, body: str, headers: dict[str, str] | None = None) -> None:
            payload = (
                f"<!doctype html><html><head><title>{html.escape(title)}</title></head>"
                f"<body>{body}</body></html>"
            ).encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(payload)))
            for name, value in (headers or {}).items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)

        def do_GET(self) -> None:
            parts = urlsplit(self.path)
            if parts.path == "/set":
                value = parse_qs(parts.query).get("v", ["yes"])[0]
                cookie = f"{COOKIE}={value}; Max-Age=3600; Path=/; SameSite=Lax"
                self._page("set", "<h1>cookie set</h1>", {"Set-Cookie": cookie})
            elif parts.path == "/show":
                received = self.headers.get("Cookie", "")
                site.cookies_seen.append(received)
                self._page("show", f"<pre id='cookies'>cookies:{html.escape(received)}</pre>")
            elif parts.path == "/login":
                self._page(
                    "Sign in",
                    "<form method='post' action='/login'>"
                    "<label>User <input name='username' autocomplete='username'></label>"
                    "<label>Password <input name='password' type='password'></label>"
                    "<button type='submit'>Sign in</button></form>",
                )
            else:
                self._page("Corral test page", "<h1>Hello from the test site</h1>")

        def do_POST(self) -> None:
            length = int(self.headers.get("Content-Length", "0"))
            form = parse_qs(self.rfile.read(length).decode())
            if urlsplit(self.path).path != "/login":
                self.send_error(404)
                return
            login = {key: values[0] for key, values in form.items()}
            site.logins.append(login)
            user = html.escape(login.get("username", ""))
            self._page(f"Welcome {login.get('username', '')}", f"<h1>Hello {user}</h1>")

    return Handler


@pytest.fixture(scope="module")
def site() -> Iterator[Site]:
    site = Site("")
    server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(site))
    server.daemon_threads = True
    site.base_url = f"http://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="test-site", daemon=True)
    thread.start()
    try:
        yield site
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


@pytest.fixture(autouse=True)
def _fresh_site(site: Site) -> None:
    site.logins.clear()
    site.cookies_seen.clear()


# ------------------------------------------------------------------ a SOCKS5 proxy


TEST_HOSTNAME = "corral-site.invalid"  # resolvable only by the proxy


@dataclass
class Socks:
    url: str
    targets: list[tuple[str, int]] = field(default_factory=list)


def _socks_handler(socks: Socks, site_port: int) -> type[socketserver.BaseRequestHandler]:
    """A minimal SOCKS5 (no auth, CONNECT): records every target; serves only the test site."""

    class Handler(socketserver.BaseRequestHandler):
        def _read(self, n: int) -> bytes:
            data = b""
            while len(data) < n:
                chunk = self.request.recv(n - len(data))
                if not chunk:
                    raise ConnectionError("client went away")
                data += chunk
            return data

        def handle(self) -> None:
            self.request.settimeout(10)
            with contextlib.suppress(OSError):
                _, methods = self._read(2)
                self._read(methods)
                self.request.sendall(b"\x05\x00")
                _, command, _, kind = self._read(4)
                if kind == 1:
                    host = socket.inet_ntoa(self._read(4))
                elif kind == 3:
                    host = self._read(self._read(1)[0]).decode()
                else:
                    host = socket.inet_ntop(socket.AF_INET6, self._read(16))
                (port,) = struct.unpack("!H", self._read(2))
                socks.targets.append((host, port))
                if command != 1 or host not in (TEST_HOSTNAME, "127.0.0.1") or port != site_port:
                    self.request.sendall(b"\x05\x02\x00\x01\x00\x00\x00\x00\x00\x00")
                    return
                with socket.create_connection(("127.0.0.1", site_port), timeout=10) as upstream:
                    self.request.sendall(b"\x05\x00\x00\x01\x00\x00\x00\x00\x00\x00")
                    self._pipe(upstream)

        def _pipe(self, upstream: socket.socket) -> None:
            with selectors.DefaultSelector() as selector:
                selector.register(self.request, selectors.EVENT_READ, upstream)
                selector.register(upstream, selectors.EVENT_READ, self.request)
                while ready := selector.select(timeout=10):
                    for key, _ in ready:
                        data = key.fileobj.recv(65536)  # type: ignore[union-attr]
                        if not data:
                            return
                        key.data.sendall(data)

    return Handler


@pytest.fixture
def socks_proxy(site: Site) -> Iterator[Socks]:
    site_port = int(site.base_url.rsplit(":", 1)[1])
    socks = Socks("")
    server = socketserver.ThreadingTCPServer(("127.0.0.1", 0), _socks_handler(socks, site_port))
    server.daemon_threads = True
    socks.url = f"socks5://127.0.0.1:{server.server_address[1]}"
    thread = threading.Thread(target=server.serve_forever, name="test-socks", daemon=True)
    thread.start()
    try:
        yield socks
    finally:
        server.shutdown()
        server.server_close()
        thread.join(5)


# ------------------------------------------------------------------ running the host


@pytest.fixture(scope="session", autouse=True)
def node_modules(tmp_path_factory: pytest.TempPathFactory) -> None:
    """The host needs runner/js/node_modules: install it from the lockfile when missing.
    Under pytest-xdist every worker comes here: a lock in the run's shared temp root lets
    one of them install while the others wait for it (two `npm ci` in one folder collide)."""
    if (JS_DIR / "node_modules" / "playwright-core").is_dir():
        return
    shared = tmp_path_factory.getbasetemp().parent  # the run's root, under xdist too
    with (shared / "npm-ci.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (JS_DIR / "node_modules" / "playwright-core").is_dir():
            return
        subprocess.run(
            ["npm", "ci", "--no-audit", "--no-fund"],
            cwd=JS_DIR,
            check=True,
            timeout=300,
            capture_output=True,
        )


def host_env(**extra: str) -> dict[str, str]:
    """The caller's environment without Corral's own variables, plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CORRAL_")}
    env.update(extra)
    return env


def run_host(
    cwd: Path, profile: Path, *argv: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [str(HOST), "--profile", str(profile), *argv],
        cwd=cwd,
        env=env if env is not None else host_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )


def events(stdout: str) -> list[dict[str, Any]]:
    return [
        json.loads(line[len(EVENT_PREFIX) :])
        for line in stdout.splitlines()
        if line.startswith(EVENT_PREFIX)
    ]


def events_of(stdout: str, kind: str) -> list[dict[str, Any]]:
    return [event for event in events(stdout) if event["type"] == kind]


def chromium_pids(profile: Path) -> list[int]:
    """Processes on this host whose command line names `profile` as their user-data-dir."""
    marker = f"--user-data-dir={profile}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in argv:
            found.append(int(entry.name))
    return found


def lock_of(profile: Path) -> Path:
    return profile / "SingletonLock"


def lock_exists(profile: Path) -> bool:
    return lock_of(profile).is_symlink() or lock_of(profile).exists()


class Running:
    """A host process in the background whose stdout lines are read by a thread."""

    def __init__(self, cwd: Path, profile: Path, *argv: str, env: dict[str, str] | None = None):
        self.process = subprocess.Popen(
            [str(HOST), "--profile", str(profile), *argv],
            cwd=cwd,
            env=env if env is not None else host_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.stdout: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.stdout.append(line)
            self.lines.put(line)
        self.lines.put(None)

    def wait_event(self, kind: str, timeout: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while True:
            try:
                line = self.lines.get(timeout=max(deadline - time.monotonic(), 0.01))
            except queue.Empty:
                raise AssertionError(f"no {kind!r} event within {timeout} s") from None
            if line is None:
                raise AssertionError(f"exited before a {kind!r} event: {self.finish(5)}")
            found = events_of(line, kind)
            if found:
                return found[0]

    def finish(self, timeout: float) -> tuple[int, str, str]:
        """Wait for the exit; returns (returncode, stdout, stderr)."""
        assert self.process.stderr is not None
        returncode = self.process.wait(timeout)
        self._reader.join(timeout)
        stderr = self.process.stderr.read()
        self.process.stderr.close()
        assert self.process.stdout is not None
        self.process.stdout.close()
        return returncode, "".join(self.stdout), stderr

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
        with contextlib.suppress(Exception):
            self.finish(10)


@pytest.fixture
def running() -> Iterator[list[Running]]:
    """Background hosts started by a test; killed if the test left them running."""
    started: list[Running] = []
    yield started
    for run in started:
        run.kill()


@pytest.fixture
def work(tmp_path: Path) -> Path:
    """The command's working directory (Corral gives each command its own)."""
    path = tmp_path / "work"
    path.mkdir()
    for name, source in {
        "visit.mjs": VISIT,
        "wait.mjs": WAIT_FOR_GO,
        "settings.mjs": SETTINGS,
    }.items():
        (path / name).write_text(source)
    return path


# ------------------------------------------------------------------ tests


def test_screenshot_example_writes_png_and_emits_artifact(
    site: Site, work: Path, tmp_path: Path
) -> None:
    result = run_host(work, tmp_path / "P", "--", str(EXAMPLES / "screenshot.mjs"), site.url("/"))

    assert result.returncode == 0, result.stderr
    png = work / "screenshot.png"
    assert png.read_bytes().startswith(b"\x89PNG\r\n\x1a\n")
    [artifact] = events_of(result.stdout, "artifact")
    assert artifact["path"] == "screenshot.png"
    assert artifact["bytes"] == png.stat().st_size > 0
    progress = events_of(result.stdout, "progress")
    assert any(event.get("title") == "Corral test page" for event in progress)
    # Events are whole lines starting with the prefix; the script's own output is plain.
    assert f"saved {png}" in result.stdout.splitlines()[-1]
    assert not lock_exists(tmp_path / "P")


def test_scripts_dir_resolves_relative_script(site: Site, work: Path, tmp_path: Path) -> None:
    env = host_env(CORRAL_SCRIPTS_DIR=str(EXAMPLES), URL=site.url("/"))
    result = run_host(work, tmp_path / "P", "--", "screenshot.mjs", env=env)

    assert result.returncode == 0, result.stderr
    assert (work / "screenshot.png").is_file()


def test_cookies_persist_per_profile(site: Site, work: Path, tmp_path: Path) -> None:
    p, q = tmp_path / "P", tmp_path / "Q"

    first = run_host(work, p, "--", "visit.mjs", site.url("/set?v=profile-p"))
    assert first.returncode == 0, first.stderr
    again = run_host(work, p, "--", "visit.mjs", site.url("/show"))
    assert again.returncode == 0, again.stderr
    other = run_host(work, q, "--", "visit.mjs", site.url("/show"))
    assert other.returncode == 0, other.stderr

    assert events_of(again.stdout, "page")[0]["text"] == f"cookies:{COOKIE}=profile-p"
    assert events_of(other.stdout, "page")[0]["text"] == "cookies:"
    assert site.cookies_seen == [f"{COOKIE}=profile-p", ""]


def test_login_example_submits_credentials(site: Site, work: Path, tmp_path: Path) -> None:
    env = host_env(LOGIN_USER="alice", LOGIN_PASSWORD="s3cret pass&word")
    result = run_host(
        work, tmp_path / "P", "--", str(EXAMPLES / "login.mjs"), site.url("/login"), env=env
    )

    assert result.returncode == 0, result.stderr
    assert site.logins == [{"username": "alice", "password": "s3cret pass&word"}]
    titles = [event.get("title") for event in events_of(result.stdout, "progress")]
    assert "Welcome alice" in titles


def test_sigterm_closes_browser_cleanly(
    site: Site, work: Path, tmp_path: Path, running: list[Running]
) -> None:
    profile = tmp_path / "P"
    run = Running(work, profile, "--", "wait.mjs", site.url("/set?v=before-term"), "about:blank")
    running.append(run)
    run.wait_event("ready")
    assert chromium_pids(profile), "a Chromium should be running on the profile"
    assert lock_exists(profile)

    started = time.monotonic()
    run.process.send_signal(signal.SIGTERM)
    returncode, _, stderr = run.finish(15)
    took = time.monotonic() - started

    assert returncode == 143, stderr
    assert took < 5, f"took {took:.1f} s to stop"
    assert chromium_pids(profile) == []
    assert not lock_exists(profile)
    # The clean close flushed the cookie set just before the signal.
    after = run_host(work, profile, "--", "visit.mjs", site.url("/show"))
    assert after.returncode == 0, after.stderr
    assert events_of(after.stdout, "page")[0]["text"] == f"cookies:{COOKIE}=before-term"


def test_stale_lock_is_cleared(site: Site, work: Path, tmp_path: Path) -> None:
    profile = tmp_path / "P"
    profile.mkdir()
    dead = subprocess.Popen(["true"])
    dead.wait()
    lock_of(profile).symlink_to(f"{socket.gethostname()}-{dead.pid}")

    result = run_host(work, profile, "--", "visit.mjs", site.url("/"))

    assert result.returncode == 0, result.stderr
    assert events_of(result.stdout, "page")[0]["title"] == "Corral test page"
    assert not lock_exists(profile)


def test_lock_of_other_host_is_left_alone(work: Path, tmp_path: Path) -> None:
    profile = tmp_path / "P"
    profile.mkdir()
    lock_of(profile).symlink_to("some-other-host-4242")

    result = run_host(work, profile, "--", "visit.mjs", "about:blank")

    assert result.returncode == 3
    assert "in use by a browser on another host" in result.stderr
    assert os.readlink(lock_of(profile)) == "some-other-host-4242"


def test_profile_in_use_fails_readably_and_first_run_goes_on(
    site: Site, work: Path, tmp_path: Path, running: list[Running]
) -> None:
    profile = tmp_path / "P"
    first = Running(work, profile, "--", "wait.mjs", site.url("/set?v=first"), site.url("/show"))
    running.append(first)
    first.wait_event("ready")
    lock_before = os.readlink(lock_of(profile))

    second = run_host(work, profile, "--", "visit.mjs", site.url("/"))

    assert second.returncode == 3
    assert second.stderr.splitlines() == [
        f"corral-playwright: profile {profile} is in use by another browser (SingletonLock)"
    ]
    assert os.readlink(lock_of(profile)) == lock_before
    (work / "go").touch()
    returncode, stdout, stderr = first.finish(30)
    assert returncode == 0, stderr
    assert events_of(stdout, "page")[0]["text"] == f"cookies:{COOKIE}=first"
    assert not lock_exists(profile)


def test_missing_script_is_one_readable_line(work: Path, tmp_path: Path) -> None:
    profile = tmp_path / "P"
    result = run_host(work, profile, "--", "no-such-script.mjs", "x")

    assert result.returncode == 2
    [line] = result.stderr.splitlines()
    assert line.startswith("corral-playwright: script not found: no-such-script.mjs")
    assert result.stdout == ""
    assert not profile.exists(), "no browser may start for a missing script"


def test_proxy_carries_everything_including_loopback_and_dns(
    site: Site, socks_proxy: Socks, work: Path, tmp_path: Path
) -> None:
    port = int(site.base_url.rsplit(":", 1)[1])
    env = host_env(CORRAL_PROXY_URL=socks_proxy.url)
    by_name = run_host(
        work, tmp_path / "P", "--", "visit.mjs", f"http://{TEST_HOSTNAME}:{port}/", env=env
    )
    assert by_name.returncode == 0, by_name.stderr
    assert events_of(by_name.stdout, "page")[0]["title"] == "Corral test page"
    # The name was resolved by the proxy, not locally (it resolves nowhere else).
    assert (TEST_HOSTNAME, port) in socks_proxy.targets

    loopback = run_host(
        work,
        tmp_path / "P",
        "--proxy",
        socks_proxy.url,
        "--",
        "visit.mjs",
        site.url("/show"),
        env=host_env(),
    )
    assert loopback.returncode == 0, loopback.stderr
    assert ("127.0.0.1", port) in socks_proxy.targets  # loopback is not bypassed


def test_dead_proxy_fails_instead_of_going_direct(site: Site, work: Path, tmp_path: Path) -> None:
    with socket.socket() as unused:
        unused.bind(("127.0.0.1", 0))
        dead = f"socks5://127.0.0.1:{unused.getsockname()[1]}"
    env = host_env(CORRAL_PROXY_URL=dead)
    result = run_host(work, tmp_path / "P", "--", "visit.mjs", site.url("/show"), env=env)

    assert result.returncode == 1
    assert "net::ERR_PROXY_CONNECTION_FAILED" in result.stderr
    assert site.cookies_seen == []


def test_browser_killed_mid_run_fails_and_next_run_recovers(
    site: Site, work: Path, tmp_path: Path, running: list[Running]
) -> None:
    profile = tmp_path / "P"
    run = Running(work, profile, "--", "wait.mjs", "about:blank", "about:blank")
    running.append(run)
    run.wait_event("ready")
    [browser] = [pid for pid in chromium_pids(profile) if b"--type=" not in _cmdline(pid)]
    os.killpg(browser, signal.SIGKILL)  # Playwright starts Chromium as a process group leader

    returncode, _, stderr = run.finish(15)
    assert returncode == 1
    assert "the browser exited unexpectedly" in stderr
    assert lock_exists(profile), "a killed Chromium leaves its SingletonLock behind"

    after = run_host(work, profile, "--", "visit.mjs", site.url("/"))
    assert after.returncode == 0, after.stderr
    assert not lock_exists(profile)


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def test_script_error_exits_1_with_stack(work: Path, tmp_path: Path) -> None:
    (work / "boom.mjs").write_text(
        "export default async function ({ page }) {\n"
        "  await page.goto('about:blank');\n"
        "  throw new Error('boom from the script');\n"
        "}\n"
    )
    result = run_host(work, tmp_path / "P", "--", "boom.mjs")

    assert result.returncode == 1
    assert "Error: boom from the script" in result.stderr
    assert "boom.mjs:3" in result.stderr  # the stack points into the script
    assert not lock_exists(tmp_path / "P")


def test_browser_settings_reach_the_page(work: Path, tmp_path: Path) -> None:
    settings = {
        "userAgent": "CorralTest/1.0 (profile UA)",
        "locale": "de-DE",
        "timezone": "Asia/Tokyo",
        "viewport": {"width": 801, "height": 599},
        "headless": True,
    }
    env = host_env(CORRAL_BROWSER_SETTINGS=json.dumps(settings))
    result = run_host(work, tmp_path / "P", "--", "settings.mjs", env=env)
    assert result.returncode == 0, result.stderr
    [seen] = events_of(result.stdout, "browser")
    assert seen == {
        "type": "browser",
        "userAgent": "CorralTest/1.0 (profile UA)",
        "language": "de-DE",
        "innerWidth": 801,
        "innerHeight": 599,
        "timezone": "Asia/Tokyo",
    }

    # Flags override the profile's settings; null fields mean Playwright's defaults.
    nulls = {"userAgent": None, "locale": None, "timezone": None, "viewport": None}
    env = host_env(CORRAL_BROWSER_SETTINGS=json.dumps(nulls))
    result = run_host(
        work,
        tmp_path / "P",
        "--locale",
        "fr-FR",
        "--viewport",
        "640x480",
        "--",
        "settings.mjs",
        env=env,
    )
    assert result.returncode == 0, result.stderr
    [seen] = events_of(result.stdout, "browser")
    assert seen["language"] == "fr-FR"
    assert (seen["innerWidth"], seen["innerHeight"]) == (640, 480)
    assert "Chrome/" in seen["userAgent"]


def test_wrapper_works_through_a_symlink(tmp_path: Path) -> None:
    link = tmp_path / "bin" / "corral-playwright"
    link.parent.mkdir()
    link.symlink_to(HOST)
    result = subprocess.run(
        ["corral-playwright", "--help"],
        env=host_env(PATH=f"{link.parent}:{os.environ['PATH']}"),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: corral-playwright --profile DIR")


def test_wrapper_without_node_modules_says_what_to_do(tmp_path: Path) -> None:
    copy = tmp_path / "runner"
    (copy / "bin").mkdir(parents=True)
    (copy / "js").mkdir()
    shutil.copy2(HOST, copy / "bin" / "corral-playwright")
    shutil.copy2(JS_DIR / "corral-playwright.mjs", copy / "js" / "corral-playwright.mjs")
    result = subprocess.run(
        [str(copy / "bin" / "corral-playwright"), "--profile", str(tmp_path / "P"), "--", "x.mjs"],
        env=host_env(),
        capture_output=True,
        text=True,
        timeout=RUN_TIMEOUT,
    )
    assert result.returncode == 3
    [line] = result.stderr.splitlines()
    assert "run npm ci in runner/js" in line


# ------------------------------------------------------------------ launch failures (issue 12, item 1)

# A host without a system or session D-Bus (containers, servers): Chromium then prints
# "Failed to connect to socket /nonexistent: No such file or directory" on every start.
NO_DBUS = {
    "DBUS_SYSTEM_BUS_ADDRESS": "unix:path=/nonexistent",
    "DBUS_SESSION_BUS_ADDRESS": "unix:path=/nonexistent-session",
}
DBUS_NOISE = (
    "[1:1:1202/101614.427015:ERROR:dbus/bus.cc:405] Failed to connect to the bus: "
    "Failed to connect to socket /nonexistent: No such file or directory"
)


def launch_lines(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The host's stderr lines without its `corral-playwright: ` prefix."""
    prefix = "corral-playwright: "
    assert all(line.startswith(prefix) for line in result.stderr.splitlines()), result.stderr
    return [line[len(prefix) :] for line in result.stderr.splitlines()]


@pytest.mark.parametrize(
    ("setting", "value", "cause"),
    [
        ("timezone", "Mars/Olympus", 'invalid timezone "Mars/Olympus"'),
        ("locale", "xx-@@bad", 'invalid locale "xx-@@bad"'),
    ],
)
def test_bad_setting_without_dbus_names_the_setting(
    work: Path, tmp_path: Path, setting: str, value: str, cause: str
) -> None:
    env = host_env(**NO_DBUS, CORRAL_BROWSER_SETTINGS=json.dumps({setting: value}))
    result = run_host(work, tmp_path / "P", "--", "visit.mjs", "about:blank", env=env)

    assert result.returncode == 3, result.stderr
    lines = launch_lines(result)
    assert lines[0].startswith(f'cannot launch Chromium: {cause} (browser setting "{setting}"')
    assert "not found" not in result.stderr
    assert "dbus" not in result.stderr.lower()
    assert result.stdout == ""


def launch_with_chromium(
    work: Path, tmp_path: Path, chromium: Path
) -> subprocess.CompletedProcess[str]:
    argv = ("--chromium", str(chromium), "--", "visit.mjs", "about:blank")
    return run_host(work, tmp_path / "P", *argv, env=host_env(**NO_DBUS))


def test_missing_chromium_is_not_found(work: Path, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-dir" / "chromium"
    result = launch_with_chromium(work, tmp_path, missing)

    assert result.returncode == 3
    assert launch_lines(result) == [
        f"cannot launch Chromium: {missing} not found (use --chromium or CORRAL_CHROMIUM_PATH)"
    ]


def test_chromium_crash_at_start_names_the_signal_and_its_lines(work: Path, tmp_path: Path) -> None:
    fake = tmp_path / "chromium-that-crashes"
    fake.write_text(
        "#!/bin/sh\n"
        f"echo '{DBUS_NOISE}' >&2\n"
        "echo '[1:1:1202/101614.5:ERROR:base/oops.cc(7)] the part that matters broke' >&2\n"
        "kill -SEGV $$\n"
    )
    fake.chmod(0o755)
    result = launch_with_chromium(work, tmp_path, fake)

    assert result.returncode == 3
    assert launch_lines(result) == [
        "cannot launch Chromium: it crashed during start (signal SIGSEGV)",
        "  chromium: ERROR base/oops.cc(7): the part that matters broke",
    ]


def test_profile_locked_in_chromiums_own_check_without_dbus(work: Path, tmp_path: Path) -> None:
    # Not a symlink: the host leaves it to Chromium, whose ProcessSingleton refuses (exit 21).
    profile = tmp_path / "P"
    profile.mkdir()
    lock_of(profile).write_text("held by something else")
    result = run_host(work, profile, "--", "visit.mjs", "about:blank", env=host_env(**NO_DBUS))

    assert result.returncode == 3
    assert launch_lines(result) == [
        f"profile {profile} is in use by another browser (SingletonLock)"
    ]


def test_normal_launch_without_dbus_still_succeeds(site: Site, work: Path, tmp_path: Path) -> None:
    result = run_host(
        work, tmp_path / "P", "--", "visit.mjs", site.url("/"), env=host_env(**NO_DBUS)
    )

    assert result.returncode == 0, result.stderr
    assert events_of(result.stdout, "page")[0]["title"] == "Corral test page"
