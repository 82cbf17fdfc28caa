"""Corral's one settings object: every field is an environment variable `CORRAL_<NAME>`."""

from __future__ import annotations

import socket
from pathlib import Path

from pydantic import Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

SQLITE_FILENAME = "corral.db"


class Settings(BaseSettings):
    """Typed settings, read from `CORRAL_*` environment variables (or passed explicitly)."""

    model_config = SettingsConfigDict(env_prefix="CORRAL_", extra="forbid")

    data_dir: Path = Field(
        default=Path(".corral"),
        description="Folder for the embedded SQLite database, the secret key file "
        "and profiles' user-data-dirs.",
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
    max_subscribers: int = Field(
        default=500,
        ge=1,
        description="Most live subscribers (SSE log streams and GraphQL subscriptions) the "
        "server keeps at once; one more is refused (SSE: 429, GraphQL: an error).",
    )
    max_subscribers_per_client: int = Field(
        default=50,
        ge=1,
        description="Most live subscribers one client (one address) may keep at once.",
    )
    subscriber_buffer_bytes: int = Field(
        default=1024 * 1024,
        ge=64 * 1024,
        le=64 * 1024 * 1024,
        description="Memory one live subscriber may hold for lines it has not sent yet; "
        "one that falls further behind re-reads them from the database when its client "
        "reads again (its replays read pages of a quarter of this).",
    )

    embedded_runner: bool = Field(
        default=True, description="Run commands inside `corral serve` (off: only `corral runner`)."
    )
    runner_name: str | None = Field(
        default=None,
        description="This runner's name, matched against profiles' runner affinity "
        "(default: the host name).",
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
    backoff_max_seconds: float = Field(
        default=600.0, ge=0, description="Longest wait between two attempts of a command."
    )
    max_line_bytes: int = Field(
        default=1024 * 1024,
        ge=1024,
        description="Longest stored log line; longer lines are cut with a marker.",
    )

    xray_bin: str | None = Field(
        default=None,
        description="Xray-compatible binary for proxy sidecars (default: `xray` on PATH, "
        "else `v2ray`).",
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
    proxy_check_url: str = Field(
        default="https://api.ipify.org?format=json",
        description="URL `checkProxy` fetches through a proxy (its exit IP is recorded when "
        "the answer names one).",
    )
    sidecar_start_timeout: float = Field(
        default=10.0, gt=0, description="How long a proxy sidecar may take to listen."
    )

    @field_validator("log_level")
    @classmethod
    def _known_level(cls, value: str) -> str:
        level = value.lower()
        if level not in {"debug", "info", "warning", "error", "critical"}:
            raise ValueError("must be one of debug, info, warning, error, critical")
        return level

    @property
    def resolved_runner_name(self) -> str:
        """The runner's name (the host name unless set)."""
        return self.runner_name or socket.gethostname()

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
    def profiles_dir(self) -> Path:
        """Parent folder of profiles' default user-data-dirs."""
        return (self.data_dir / "profiles").resolve()

    @property
    def should_auto_migrate(self) -> bool:
        """Whether `corral serve` migrates on start."""
        return self.is_embedded if self.auto_migrate is None else self.auto_migrate
