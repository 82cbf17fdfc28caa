"""What an attempt needs before its child starts: its rows (through the store gateway),
secrets decrypted, the proxy sidecar, the rendered argv and the child's environment.
The supervisor (runner/supervisor.py) holds one `AttemptSetup`; runner/attempt.py uses it.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from runner.claims import Claimed, ClaimedCommand
from runner.logwriter import LogWriter
from runner.markers import (
    RUN_MARKER,
    SIDECAR_MARKER,
    run_marker,
)
from runner.renderpool import RenderPool
from runner.sandbox import Sandbox, choose_sandbox
from runner.store import RunnerStore
from runner.template_env import CompositionError
from runner.workdirs import Workdirs
from server.commands import (
    PROXY_URL_ENV,
    browser_settings,
    command_context,
)
from server.models import (
    LogStream,
    Profile,
    Proxy,
    Service,
)
from server.secretbox import SecretBox
from server.settings import Settings
from xray.binary import XrayBinary, XrayBinaryError, find_binary
from xray.hops import Hop
from xray.probe import url_target
from xray.routing import Routing
from xray.sidecar import SidecarError, SidecarProcess

RUNNER_BIN = Path(__file__).resolve().parent / "bin"
RUNNER_JS = Path(__file__).resolve().parent / "js"
# What a sandboxed command may read of Corral's own code: its tools and the Playwright host
# (node_modules may be a symlink to elsewhere: its real place is readable too).
RUNNER_CODE = (RUNNER_BIN, RUNNER_JS, RUNNER_JS / "node_modules")


def runner_sandbox(settings: Settings) -> Sandbox:
    """The protection this host gives commands (bwrap is probed once per process)."""
    return choose_sandbox(settings, RUNNER_CODE)


SYSTEM_PATH = "/usr/local/bin:/usr/bin:/bin"


@dataclass
class Loaded:
    """What an attempt needs from the database, secrets decrypted."""

    command: ClaimedCommand
    profile: Profile | None
    proxy: Proxy | None
    services: list[Service]
    tokens: dict[str, str | None]
    chain: list[Hop]
    secrets: list[str]
    service_ids: dict[str, int]
    routing: Routing | None = None
    own_token_services: frozenset[int] = frozenset()  # used with the profile's own token


@dataclass
class Prepared:
    argv: list[str]
    env: dict[str, str]
    writable: list[str] = field(default_factory=list)  # besides its working directory


def child_path() -> str:
    """PATH for children: Corral's own tools first (e.g. corral-playwright), then the system."""
    return f"{RUNNER_BIN}:{SYSTEM_PATH}"


class AttemptSetup:
    """Loading, the sidecar and rendering of an attempt, given the runner's settings, its
    gateway and secret box, its id, the sandbox commands run in, the pool templates render
    in and the commands' working directories."""

    def __init__(
        self,
        settings: Settings,
        gateway: RunnerStore,
        box: SecretBox,
        runner_id: str,
        sandbox: Sandbox,
        render_pool: RenderPool,
        workdirs: Workdirs,
    ) -> None:
        self.settings = settings
        self.gateway = gateway
        self.box = box
        self.runner_id = runner_id
        self.sandbox = sandbox
        self.render_pool = render_pool
        self.workdirs = workdirs
        self._xray: XrayBinary | None = None  # found at the first proxied attempt

    def sidecar(
        self, chain: list[Hop], writer: LogWriter, command_id: int, routing: Routing | None
    ) -> SidecarProcess:
        async def on_line(line: str) -> None:
            await writer.add(LogStream.SYSTEM, line)

        if self._xray is None:
            try:
                self._xray = find_binary(self.settings.xray_bin)
            except XrayBinaryError as exc:
                raise SidecarError(str(exc)) from exc
        return SidecarProcess(
            self._xray,
            chain,
            on_line=on_line,
            start_timeout=self.settings.sidecar_start_timeout,
            grace=min(self.settings.kill_grace_seconds, 2.0),
            # The marker lets a restarted runner find and stop it after a kill -9.
            env={"PATH": SYSTEM_PATH, SIDECAR_MARKER: run_marker(self.runner_id, command_id)},
            routing=routing,
            assets_dir=self.settings.xray_assets_dir,
            log_level=self.settings.sidecar_log_level,
            trace=self.settings.routing_trace,
            # A harmless CONNECT for the pre-flight probe of the first hop's credentials.
            probe_target=url_target(self.settings.proxy_check_url),
            probe_timeout=self.settings.proxy_probe_timeout,
        )

    async def load(self, claim: Claimed) -> Loaded:
        """The command's profile, proxy chain and services' tokens (a plain command with
        none of them needs no database at all)."""
        command = claim.command
        if (
            command.profile_id is None
            and command.proxy_id is None
            and command.proxy_name is None
            and not claim.has_services
        ):
            return Loaded(command, None, None, [], {}, [], [], {})
        rows = await self.gateway.load_attempt(command, self.box)
        profile, proxy, services, tokens = rows.profile, rows.proxy, rows.services, rows.tokens
        chain, routing, own = rows.chain, rows.routing, rows.own
        if command.proxy_name is not None and proxy is None:
            raise CompositionError(
                f"its proxy {command.proxy_name!r} was deleted; refusing to run without it"
            )
        missing = [name for name, token in tokens.items() if token is None]
        if missing:
            raise CompositionError(f"no token any more for {', '.join(missing)}")
        secrets = [token for token in tokens.values() if token]
        hops = [
            *chain,
            *(hop for via in (routing.via_chains if routing else {}).values() for hop in via),
        ]
        secrets += [secret for hop in hops for secret in (hop.password, hop.username) if secret]
        return Loaded(
            command=command,
            profile=profile,
            proxy=proxy,
            services=services,
            tokens=tokens,
            chain=chain,
            routing=routing,
            secrets=secrets,
            service_ids={s.name.lower(): s.id for s in services}
            | {s.kind.lower(): s.id for s in services},
            own_token_services=frozenset(own),
        )

    async def render(self, loaded: Loaded, proxy_url: str | None) -> Prepared:
        """Render the argv (with the sidecar's URL) and build the child's environment."""
        command = loaded.command
        context = command_context(
            self.settings, loaded.profile, loaded.proxy, loaded.services, command.params, proxy_url
        )
        argv = await self.render_pool.render(command.source, context)
        env = self.child_env(command, loaded.tokens)
        if proxy_url is not None:
            env[PROXY_URL_ENV] = proxy_url
        if loaded.profile is not None:
            env["CORRAL_BROWSER_SETTINGS"] = json.dumps(browser_settings(loaded.profile))
        return Prepared(argv=argv, env=env)

    def child_env(self, command: ClaimedCommand, tokens: dict[str, str | None]) -> dict[str, str]:
        """A minimal environment: no Corral settings or keys, only what the child needs."""
        home = os.environ.get("HOME", "/tmp")  # noqa: S108 - a fallback HOME only
        if self.sandbox.protected:  # the server's HOME is not the command's to see
            home = self.workdirs.path(command.id)
        env = {
            "PATH": child_path(),
            "HOME": home,
            "LANG": os.environ.get("LANG", "C.UTF-8"),
            "CORRAL_COMMAND_ID": str(command.id),
            RUN_MARKER: run_marker(self.runner_id, command.id),
            "CORRAL_ATTEMPT": str(command.attempts),
            "CORRAL_CHROMIUM_PATH": self.settings.chromium_path,
        }
        if self.settings.scripts_dir is not None:
            env["CORRAL_SCRIPTS_DIR"] = str(self.settings.scripts_dir.resolve())
        env.update({str(k): str(v) for k, v in command.env.items()})
        env.update({name: token for name, token in tokens.items() if token is not None})
        return env
