"""Corral's one settings object: every field is an environment variable `CORRAL_<NAME>`."""

from __future__ import annotations

import socket
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SQLITE_FILENAME = "corral.db"
# Listening on these means "every interface": no one Host name follows from them.
WILDCARD_ADDRESSES = frozenset({"", "0.0.0.0", "::", "[::]", "*"})  # noqa: S104
RUNNER_NAME_MAX = 200  # server.models.NAME_MAX: a profile's runner affinity holds it
RUNNER_LABEL_MAX = RUNNER_NAME_MAX - len("label:")
SIDECAR_LEVELS = ("debug", "info", "warning", "error", "none")  # xray.config.LOG_LEVELS


def _split_hosts(value: str) -> list[str]:
    return [part.strip().lower() for part in value.split(",") if part.strip()]


def _is_wildcard(pattern: str) -> bool:
    return pattern == "*" or (pattern.startswith("*.") and len(pattern) > 2)


class Settings(BaseSettings):
    """Typed settings, read from `CORRAL_*` environment variables (or passed explicitly)."""

    model_config = SettingsConfigDict(env_prefix="CORRAL_", extra="forbid")

    data_dir: Path = Field(
        default=Path(".corral"),
        description="Corral's private folder (mode 0700): the embedded SQLite database and "
        "the secret key file (both 0600). Commands never see it.",
    )
    workspace_dir: Path | None = Field(
        default=None,
        description="Folder of what commands may touch: their working directories "
        "(`commands/<id>`) and profiles' default user-data-dirs (`profiles/<id>`). "
        "Unset: `<data dir>-work` beside the data dir.",
    )
    database_url: str | None = Field(
        default=None,
        description="SQLAlchemy async URL, e.g. postgresql+asyncpg://user@host/db. "
        "Unset: SQLite in the data dir (the embedded default).",
    )
    secret_key: SecretStr | None = Field(
        default=None,
        description="Fernet key(s) that encrypt tokens and proxy credentials at rest; "
        "comma-separated for rotation (the first encrypts). Unset: the key file "
        "`secret.key` in the data dir, created (0600) on the embedded default.",
    )
    host: str = Field(default="127.0.0.1", description="Address `corral serve` listens on.")
    port: int = Field(default=8000, ge=0, le=65535, description="Port `corral serve` listens on.")
    allowed_hosts: str | None = Field(
        default=None,
        description="Comma-separated Host names the API answers to (`*.example.com` for "
        "subdomains, `*` for any); others get 400, which stops DNS rebinding. Unset: "
        "localhost, 127.0.0.1, [::1] and CORRAL_HOST when it is not a wildcard address.",
    )
    max_request_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="Largest HTTP request body and WebSocket message, in bytes; a larger "
        "body gets 413 before it is read.",
    )
    ws_compression: bool = Field(
        default=False,
        description="permessage-deflate on GraphQL WebSockets when a client offers it: "
        "smaller frames for the server's CPU (at fan-out it doubled the CPU a batch costs); "
        "off by default, for a control plane on its own network.",
    )
    auto_migrate: bool | None = Field(
        default=None,
        description="Migrate the database when `corral serve` starts. Unset: yes on the "
        "embedded SQLite, no on an external database (run `corral migrate`).",
    )
    log_level: str = Field(default="info", description="Log level: debug, info, warning, error.")
    graphql_max_depth: int = Field(
        default=12, ge=1, description="Deepest GraphQL selection a query may have."
    )
    graphql_max_aliases: int = Field(
        default=30, ge=1, description="Most aliases one GraphQL operation may use."
    )
    page_size_max: int = Field(
        default=1000, ge=1, description="Largest `first` a connection accepts."
    )
    graphql_max_cost: int = Field(
        default=20_000,
        ge=1,
        description="Budget of one GraphQL operation: the objects it may ask for, each list "
        "counting as many items as its `first`; a query over it is refused before it runs, "
        "with its cost in the error. Lists without `first` are also counted as they come: "
        "past the budget the operation ends in the same error.",
    )
    graphql_cost_list_size: int = Field(
        default=5,
        ge=1,
        description="Items a list without a `first` argument (Profile.proxies, "
        "Proxy.profiles, Service.profiles, ...) counts as in a query's cost.",
    )
    graphql_max_query_bytes: int = Field(
        default=32 * 1024,
        ge=1024,
        description="Longest GraphQL query text (bytes, UTF-8), over HTTP and WebSocket; "
        "a longer one is refused before it is parsed.",
    )
    graphql_max_tokens: int = Field(
        default=2000,
        ge=100,
        description="Most tokens (names, punctuation, values, comments) a GraphQL query text "
        "may hold; the parser stops at the next one and the query is refused.",
    )
    graphql_introspection: bool = Field(
        default=True,
        description="Answer introspection queries (`__schema`, `__type`); off: they get a "
        "validation error (`__typename` still works).",
    )
    graphiql: bool = Field(
        default=True,
        description="Show the GraphiQL IDE to a browser at GET /graphql; off: 404 there.",
    )
    graphiql_cdn: bool = Field(
        default=False,
        description="Load GraphiQL's scripts and styles from unpkg.com (pinned, with SRI) "
        "instead of the copies Corral serves under /static/graphiql/.",
    )
    panel_assets: Literal["local", "cdn"] = Field(
        default="local",
        description="Where the panel loads htmx from: `local` (the pinned copy under "
        "/static/vendor/htmx/, works offline) or `cdn` (unpkg.com, pinned with SRI, and the "
        "local copy when the CDN does not answer).",
    )
    graphql_max_response_bytes: int = Field(
        default=8 * 1024 * 1024,
        ge=1024,
        description="Largest GraphQL result (bytes of JSON; each subscription event on its "
        "own); a larger one is replaced by an error.",
    )
    max_subscribers: int = Field(
        default=500,
        ge=1,
        description="Most live subscribers (SSE log streams and GraphQL subscriptions) the "
        "server keeps at once; one more is refused (SSE: 429, GraphQL: an error).",
    )
    max_subscribers_per_client: int = Field(
        default=50,
        ge=1,
        description="Most live subscribers one client may keep at once (a client: its API "
        "token or user; its address without credentials).",
    )
    subscriber_buffer_bytes: int = Field(
        default=1024 * 1024,
        ge=64 * 1024,
        le=64 * 1024 * 1024,
        description="Memory one live subscriber may hold for lines it has not sent yet; "
        "one that falls further behind re-reads them from the database when its client "
        "reads again (its replays read pages of a quarter of this).",
    )

    stream_pool_size: int = Field(
        default=8,
        ge=1,
        le=100,
        description="Database connections that live log streams (SSE, GraphQL subscriptions) "
        "share for their replays: a pool of their own, so followers never take the "
        "connections of the runner and of requests; a replay past it waits its turn.",
    )
    follow_poll_seconds: float = Field(
        default=30.0,
        gt=0,
        description="On PostgreSQL, live followers (log streams, the panel's live statuses) "
        "also re-read the database this often: a safety net under LISTEN/NOTIFY, which "
        "brings other processes' lines and statuses at once. Not used on SQLite (one "
        "process, nothing to miss).",
    )

    embedded_runner: bool = Field(
        default=True, description="Run commands inside `corral serve` (off: only `corral runner`)."
    )
    runner_name: str | None = Field(
        default=None,
        max_length=RUNNER_NAME_MAX,
        description="This runner's name, matched against profiles' runner affinity "
        "(default: the host name).",
    )
    runner_labels: str = Field(
        default="",
        description="This runner's labels, comma-separated (e.g. `gpu,eu`): a profile whose "
        "runner affinity is `label:gpu` runs only on runners labelled `gpu`.",
    )
    max_concurrency: int = Field(
        default=4, ge=1, le=256, description="Most commands one runner runs at once."
    )
    default_timeout_seconds: int | None = Field(
        default=3600,
        ge=1,
        description="Timeout of a command whose template and request name none (empty: none).",
    )
    kill_grace_seconds: float = Field(
        default=5.0,
        ge=0,
        description="Between SIGTERM and SIGKILL when a command times out, is cancelled "
        "or the runner stops.",
    )
    lease_seconds: float = Field(
        default=30.0,
        gt=0,
        description="How long a runner's claim on a running command lasts without renewal; "
        "after that another runner recovers the command.",
    )
    drain_seconds: float = Field(
        default=30.0,
        ge=0,
        description="When a runner drains (SIGTERM or SIGINT to `corral runner` or "
        "`corral serve`, or `corral runner --drain`), how long its running commands may "
        "go on to finish; then they are stopped (their process groups: TERM, grace, KILL) "
        "and put back in the queue without the attempt counting. A second signal stops "
        "them at once.",
    )
    claim_poll_seconds: float = Field(
        default=5.0,
        gt=0,
        description="On PostgreSQL, a runner also looks for queued commands this often: a "
        "safety net under LISTEN/NOTIFY, whose queue wake-ups bring new and re-queued "
        "commands to every runner at once (while its broker connection is down, a runner "
        "looks every 0.5 s). On SQLite: the in-process wake-ups and a 0.5 s tick.",
    )
    max_runner_losses: int = Field(
        default=2,
        ge=0,
        le=100,
        description="How many times a command whose runner died is queued again without the "
        "attempt counting against its maxAttempts (a command that kills its runner cannot "
        "loop: after these, a lost attempt counts).",
    )
    max_host_shortages: int = Field(
        default=5,
        ge=0,
        le=100,
        description="How many times a command whose child could not start because the host "
        "was short of processes, memory or file descriptors (EAGAIN, ENOMEM, EMFILE, ENFILE) "
        "is queued again after a backoff without the attempt counting against its "
        "maxAttempts, while it has fewer uncounted attempts than this (a host that stays "
        "short cannot loop: after these, such an attempt counts as a failed one).",
    )
    backoff_max_seconds: float = Field(
        default=600.0, ge=0, description="Longest wait between two attempts of a command."
    )
    max_line_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="Longest stored log line; longer lines are cut with a marker.",
    )

    render_timeout_seconds: float = Field(
        default=2.0,
        gt=0,
        le=600,
        description="Longest time one command template may take to render; a render "
        "that takes longer is stopped (its worker process killed) and refused. Also the "
        "longest wait for a free worker.",
    )
    render_memory_bytes: int = Field(
        default=256 * 1024 * 1024,
        ge=64 * 1024 * 1024,
        description="Address space of a template render worker process; a template that "
        "needs more is refused.",
    )
    render_workers: int = Field(
        default=2,
        ge=1,
        le=64,
        description="Most template render worker processes (started on first use, kept warm).",
    )

    xray_bin: str | None = Field(
        default=None,
        description="Xray-compatible binary for proxy sidecars (default: `xray` on PATH, "
        "else `v2ray`).",
    )
    xray_assets_dir: Path | None = Field(
        default=None,
        description="Folder holding geoip.dat and geosite.dat for `geoip:`/`geosite:` routing "
        "matchers (unset: those matchers are refused).",
    )
    default_routing_rules: list[dict[str, Any]] | None = Field(
        default=None,
        description="Routing rules a new proxy starts with (JSON list of rules as "
        '`setRoutingRules` takes them, e.g. `[{"domains": ["domain:gvt1.com"], "action": '
        '"BLOCK"}]`; no VIA); unset: block the background Google endpoints Chromium calls; '
        "`[]`: none.",
    )
    chromium_path: str = Field(
        default="/usr/bin/chromium",
        description="Chromium binary the Playwright host launches (CORRAL_CHROMIUM_PATH in "
        "the child).",
    )
    scripts_dir: Path | None = Field(
        default=None,
        description="Folder relative script paths of `corral-playwright` resolve in.",
    )
    sandbox: Literal["auto", "bwrap", "user", "none"] = Field(
        default="auto",
        description="How commands are walled off from Corral's files: `bwrap` (a bubblewrap "
        "sandbox that shows a command only read-only system paths, its working directory and "
        "its profile's dir), `user` (run as CORRAL_RUN_AS), `none`, or `auto` (bwrap when it "
        "works here, else `user` when CORRAL_RUN_AS is set and Corral runs as root, else none).",
    )
    run_as: str | None = Field(
        default=None,
        description="Unprivileged user commands run as when Corral runs as root (`user` mode, "
        "and inside the bwrap sandbox too).",
    )
    sandbox_paths: list[Path] = Field(
        default_factory=list,
        description="More folders a bwrap-sandboxed command may read (JSON list, e.g. "
        '`["/opt/tools"]`); system paths, the runner\'s code and the scripts dir are always '
        "readable.",
    )
    proxy_check_url: str = Field(
        default="https://api.ipify.org?format=json",
        description="URL `checkProxy` fetches through a proxy (its exit IP is recorded when "
        "the answer names one).",
    )
    proxy_check_interval: float = Field(
        default=600,
        ge=0,
        description="Seconds between scheduled health checks of each proxy (±10% jitter; a "
        "new proxy is first checked one interval after it was created); `never` or 0: no "
        "scheduled checks (checkProxy still works).",
    )
    proxy_check_concurrency: int = Field(
        default=2,
        ge=1,
        le=32,
        description="Most scheduled proxy checks one runner runs at once (each starts a sidecar).",
    )
    proxy_flag_after: int = Field(
        default=3,
        ge=1,
        description="A proxy that failed this many checks in a row is flagged.",
    )
    hold_on_flagged_proxy: bool = Field(
        default=False,
        description="Hold queued commands whose proxy (or a hop of its chain) is flagged: "
        "they wait as WAITING, with the reason, until a check of that proxy passes "
        "(off: they run, and fail if the proxy is down).",
    )
    schedules: bool = Field(
        default=True,
        description="Run the scheduled work of a runner (services' probes every "
        "`probeIntervalSeconds` of their policy, proxy checks every "
        "`CORRAL_PROXY_CHECK_INTERVAL`). `false` stops every schedule (tests); "
        "`probeService` and `checkProxy` still work.",
    )
    probe_timeout: float = Field(
        default=10.0, gt=0, description="Seconds a provider probe may take (one request)."
    )
    probe_concurrency: int = Field(
        default=4,
        ge=1,
        description="Tokens one probe of a service asks its provider about at once.",
    )
    sidecar_start_timeout: float = Field(
        default=10.0, gt=0, description="How long a proxy sidecar may take to listen."
    )
    sidecar_log_level: str = Field(
        default="warning",
        description="Which of a proxy sidecar's own lines go into a run's log: debug, info, "
        "warning, error or none. Upstream failures (credentials refused, connection refused, "
        "DNS, TLS, timeout) are always added as one readable line per kind, whatever the level.",
    )
    routing_trace: bool = Field(
        default=False,
        description="Put each connection a proxy sidecar routes (`route <destination> → "
        "<outbound>`, from its access log, redacted) into the run's system log, at most 1,000 "
        "lines per run.",
    )
    proxy_probe_timeout: float = Field(
        default=5.0,
        gt=0,
        le=120,
        description="How long the pre-flight handshake with a proxy's first hop may take "
        "before a run or `checkProxy` reports it as not answering.",
    )
    secrets_refresh_seconds: float = Field(
        default=2.0,
        gt=0,
        description="How often a runner re-reads the stored secrets it masks in every "
        "command's output (changes made through the API apply at once: on PostgreSQL "
        "through any `corral serve` process).",
    )

    session_idle_seconds: float = Field(
        default=8 * 3600,
        gt=0,
        description="A panel login ends after this long without a request.",
    )
    session_max_seconds: float = Field(
        default=24 * 3600,
        gt=0,
        description="A panel login ends this long after it began, used or not.",
    )
    login_max_failures: int = Field(
        default=5,
        ge=1,
        description="Bad passwords allowed per user name and per client address within "
        "CORRAL_LOGIN_WINDOW_SECONDS; the next attempt is refused without checking it.",
    )
    login_window_seconds: float = Field(
        default=60.0, gt=0, description="The window CORRAL_LOGIN_MAX_FAILURES counts in."
    )
    metrics_allow: list[str] = Field(
        default_factory=list,
        description='Client addresses or networks (JSON list, e.g. `["127.0.0.1", '
        '"10.0.0.0/8"]`) that may read /metrics without an API token.',
    )

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.lower()
        if level not in {"debug", "info", "warning", "error", "critical"}:
            raise ValueError("must be one of debug, info, warning, error, critical")
        return level

    @field_validator("sidecar_log_level")
    @classmethod
    def _known_sidecar_level(cls, value: str) -> str:
        level = value.strip().lower()
        if level not in SIDECAR_LEVELS:
            raise ValueError(f"{value!r} is not one of {', '.join(SIDECAR_LEVELS)}")
        return level

    @field_validator("runner_labels")
    @classmethod
    def _runner_labels(cls, value: str) -> str:
        for label in value.split(","):
            if len(label.strip()) > RUNNER_LABEL_MAX:
                raise ValueError(f"a label is at most {RUNNER_LABEL_MAX} characters")
        return value

    @field_validator("proxy_check_interval", mode="before")
    @classmethod
    def _never(cls, value: Any) -> Any:
        if isinstance(value, str) and value.strip().lower() in {"never", "off"}:
            return 0
        return value

    @field_validator("allowed_hosts")
    @classmethod
    def _host_patterns(cls, value: str | None) -> str | None:
        if value is None:
            return None
        for pattern in _split_hosts(value):
            if "*" in pattern[1:] or (pattern.startswith("*") and not _is_wildcard(pattern)):
                raise ValueError(f"{pattern!r}: a wildcard must be `*` or like `*.example.com`")
        if not _split_hosts(value):
            raise ValueError("names no host (unset it for the default, or `*` for any)")
        return value

    @property
    def allowed_host_names(self) -> list[str]:
        """Host header names the app answers to (lower case; `*` allows any)."""
        if self.allowed_hosts is not None:
            return _split_hosts(self.allowed_hosts)
        names = ["localhost", "127.0.0.1", "[::1]"]
        host = self.host.strip().lower()
        if host not in WILDCARD_ADDRESSES:
            name = f"[{host}]" if ":" in host and not host.startswith("[") else host
            if name not in names:
                names.append(name)
        return names

    @property
    def resolved_runner_name(self) -> str:
        """The runner's name (the host name unless set)."""
        return self.runner_name or socket.gethostname()

    @property
    def resolved_runner_labels(self) -> list[str]:
        """The runner's labels, in the order given, without blanks or repeats."""
        labels = (part.strip() for part in self.runner_labels.split(","))
        return list(dict.fromkeys(label for label in labels if label))

    @property
    def is_embedded(self) -> bool:
        """True when Corral runs on its embedded SQLite default."""
        return self.database_url is None

    @property
    def resolved_database_url(self) -> str:
        """The database URL in force (the embedded SQLite file when none is set)."""
        if self.database_url is not None:
            return self.database_url
        return f"sqlite+aiosqlite:///{(self.data_dir / SQLITE_FILENAME).resolve()}"

    @property
    def secret_key_file(self) -> Path:
        """Where the embedded default keeps its generated key."""
        return self.data_dir / "secret.key"

    @property
    def resolved_workspace_dir(self) -> Path:
        """The workspace in force: the setting, else `<data dir>-work` beside the data dir."""
        if self.workspace_dir is not None:
            return self.workspace_dir.resolve()
        data_dir = self.data_dir.resolve()
        return data_dir.with_name(f"{data_dir.name}-work")

    @property
    def commands_dir(self) -> Path:
        """Parent folder of commands' working directories."""
        return self.resolved_workspace_dir / "commands"

    @property
    def profiles_dir(self) -> Path:
        """Parent folder of profiles' default user-data-dirs."""
        return self.resolved_workspace_dir / "profiles"

    @property
    def should_auto_migrate(self) -> bool:
        """Whether `corral serve` migrates on start."""
        return self.is_embedded if self.auto_migrate is None else self.auto_migrate
