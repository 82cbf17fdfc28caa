"""Corral's relational model (SQLAlchemy 2 typed ORM), the same on SQLite and PostgreSQL.

Deletion rules, chosen on purpose:
- deleting a profile cascades its links (services, proxies) and sets its commands'
  `profile_id` to NULL; a command keeps `profile_name`, so history stays readable;
- deleting a proxy detaches it from profiles (the delete payload says which) and
  sets commands' `proxy_id` to NULL; a proxy that is another proxy's `via` hop
  cannot be deleted (RESTRICT), since the chain would silently lose a hop;
- deleting a service cascades its profile links and usage rows;
- deleting a template sets commands' `template_id` to NULL.
"""

from __future__ import annotations

import enum
import unicodedata
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import (
    JSON,
    Boolean,
    DateTime,
    Enum,
    Float,
    ForeignKey,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    String,
    Text,
    TypeDecorator,
    text,
)
from sqlalchemy.engine import Dialect
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, validates

NAME_MAX = 200
HOST_MAX = 255
PATH_MAX = 1024
URL_MAX = 2048
ENV_VAR_MAX = 128

NAMING_CONVENTION = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


def utcnow() -> datetime:
    """Timezone-aware now, the only clock the models use."""
    return datetime.now(UTC)


class UTCDateTime(TypeDecorator[datetime]):
    """A DateTime that is always stored and read back as timezone-aware UTC.

    SQLite has no time zones: values are stored naive in UTC and tagged on the way out.
    """

    impl = DateTime(timezone=True)
    cache_ok = True

    def process_bind_param(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        if value.tzinfo is None:
            raise ValueError("naive datetime given to a UTC column")
        value = value.astimezone(UTC)
        return value.replace(tzinfo=None) if dialect.name == "sqlite" else value

    def process_result_value(self, value: datetime | None, dialect: Dialect) -> datetime | None:
        if value is None:
            return None
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING_CONVENTION)
    type_annotation_map = {datetime: UTCDateTime(), dict[str, Any]: JSON, list[str]: JSON}


def name_key(name: str) -> str:
    """The form names are unique in: Unicode case-folded (`Straße` = `STRASSE`), NFKC."""
    return unicodedata.normalize("NFKC", name).casefold()


class NamedMixin:
    """A unique name, compared case-folded through `name_key` (a unique index)."""

    name: Mapped[str] = mapped_column(String(NAME_MAX))
    name_key: Mapped[str] = mapped_column(String(NAME_MAX * 3), unique=True)

    @validates("name")
    def _set_name_key(self, _key: str, value: str) -> str:
        self.name_key = name_key(value)
        return value


class TimestampMixin:
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)


# The first retry's delay when a template says nothing: the one default that templates,
# ad-hoc commands and the runner's retry policy share (issue 15, item 5).
BACKOFF_SECONDS_DEFAULT = 5.0


class ProxyProtocol(enum.StrEnum):
    HTTP = "http"
    HTTPS = "https"
    SOCKS5 = "socks5"
    SHADOWSOCKS = "shadowsocks"
    VMESS = "vmess"
    VLESS = "vless"
    TROJAN = "trojan"


class CommandStatus(enum.StrEnum):
    QUEUED = "QUEUED"
    WAITING = "WAITING"
    RUNNING = "RUNNING"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
    TIMED_OUT = "TIMED_OUT"
    CANCELLED = "CANCELLED"

    @property
    def is_final(self) -> bool:
        return self in FINAL_STATUSES


FINAL_STATUSES = frozenset(
    {
        CommandStatus.SUCCEEDED,
        CommandStatus.FAILED,
        CommandStatus.TIMED_OUT,
        CommandStatus.CANCELLED,
    }
)


def enum_column(enum_class: type[enum.StrEnum], length: int) -> Enum:
    """A column holding `enum_class`'s values, read back as its members.

    Stored as the VARCHAR(length) the column always was (no native ENUM type, no CHECK
    constraint: no migration), so raw SQL (the runner's statements) reads and writes the
    same strings as before.
    """
    return Enum(
        enum_class,
        native_enum=False,
        create_constraint=False,
        length=length,
        values_callable=lambda members: [member.value for member in members],
    )


class LogStream(enum.StrEnum):
    STDOUT = "stdout"
    STDERR = "stderr"
    SYSTEM = "system"


class Meta(Base):
    """Key/value facts about this database (e.g. the secret-key check value)."""

    __tablename__ = "corral_meta"

    key: Mapped[str] = mapped_column(String(64), primary_key=True)
    value: Mapped[str] = mapped_column(Text)


class Profile(NamedMixin, TimestampMixin, Base):
    __tablename__ = "profiles"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)

    user_data_dir: Mapped[str | None] = mapped_column(String(PATH_MAX))
    user_agent: Mapped[str | None] = mapped_column(String(1024))
    locale: Mapped[str | None] = mapped_column(String(35))
    timezone: Mapped[str | None] = mapped_column(String(64))
    viewport_width: Mapped[int | None]
    viewport_height: Mapped[int | None]
    headless: Mapped[bool] = mapped_column(Boolean, default=True)
    tags: Mapped[list[str]] = mapped_column(default=list)
    notes: Mapped[str | None] = mapped_column(Text)
    runner_affinity: Mapped[str | None] = mapped_column(String(NAME_MAX))


class Service(NamedMixin, TimestampMixin, Base):
    __tablename__ = "services"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)

    kind: Mapped[str] = mapped_column(String(64), default="generic")
    base_url: Mapped[str | None] = mapped_column(String(URL_MAX))
    env_var: Mapped[str] = mapped_column(String(ENV_VAR_MAX))
    token_encrypted: Mapped[bytes | None] = mapped_column(LargeBinary)
    settings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    rate_limit_policy: Mapped[dict[str, Any]] = mapped_column(default=dict)
    # When the scheduled probe is due (null: never, no probeIntervalSeconds); a runner takes
    # a due probe by moving it on with one conditional UPDATE (server/probes.py).
    next_probe_at: Mapped[datetime | None]


class ProfileService(Base):
    """A profile's use of a service, with the profile's own account token (encrypted)."""

    __tablename__ = "profile_services"

    profile_id: Mapped[int] = mapped_column(
        ForeignKey("profiles.id", ondelete="CASCADE"), primary_key=True
    )
    service_id: Mapped[int] = mapped_column(
        ForeignKey("services.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    token_encrypted: Mapped[bytes | None] = mapped_column(LargeBinary)
    # Overrides the service's rate-limit policy key by key for this profile (server/policies).
    rate_limit_policy: Mapped[dict[str, Any]] = mapped_column(
        default=dict, server_default=text("'{}'")
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class Proxy(NamedMixin, TimestampMixin, Base):
    __tablename__ = "proxies"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)

    protocol: Mapped[ProxyProtocol] = mapped_column(enum_column(ProxyProtocol, 16))
    host: Mapped[str] = mapped_column(String(HOST_MAX))
    port: Mapped[int]
    # JSON {"username": ..., "password": ...} (or the protocol's id/password), Fernet-encrypted.
    credentials_encrypted: Mapped[bytes | None] = mapped_column(LargeBinary)
    # Transport/TLS settings (network, path, sni, cipher, ...); never secrets.
    settings: Mapped[dict[str, Any]] = mapped_column(default=dict)
    via_id: Mapped[int | None] = mapped_column(
        ForeignKey("proxies.id", ondelete="RESTRICT"), index=True
    )
    # Ordered routing rules, first match wins: [{"domains", "ips", "ports", "network",
    # "action": PROXY|VIA|DIRECT|BLOCK, "via_proxy_id"}] (see server/routing.py).
    routing_rules: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    health_ok: Mapped[bool | None]
    health_latency_ms: Mapped[float | None] = mapped_column(Float)
    health_error: Mapped[str | None] = mapped_column(Text)
    health_exit_ip: Mapped[str | None] = mapped_column(String(64))
    health_checked_at: Mapped[datetime | None]
    # Failed checks in a row (0 after a passing one); `CORRAL_PROXY_FLAG_AFTER` flags it.
    health_failures: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    # When the schedule checks it next (NULL: one interval after it was created).
    next_check_at: Mapped[datetime | None] = mapped_column(index=True)


class ProxyCheck(Base):
    """One health check of a proxy (the last PROXY_CHECKS_KEPT per proxy are kept)."""

    __tablename__ = "proxy_checks"
    __table_args__ = (Index("ix_proxy_checks_history", "proxy_id", "id"),)

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    proxy_id: Mapped[int] = mapped_column(ForeignKey("proxies.id", ondelete="CASCADE"))
    checked_at: Mapped[datetime] = mapped_column(default=utcnow)
    ok: Mapped[bool] = mapped_column(Boolean)
    latency_ms: Mapped[float | None] = mapped_column(Float)
    exit_ip: Mapped[str | None] = mapped_column(String(64))
    error: Mapped[str | None] = mapped_column(Text)
    trigger: Mapped[str] = mapped_column(String(16))  # schedule | manual


class Runner(Base):
    """One supervisor process, as it registered: who it is, what it can run, and its last
    heartbeat (written with each lease pass). A clean stop sets stopped_at."""

    __tablename__ = "runners"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    runner_id: Mapped[str] = mapped_column(String(255), unique=True)  # host:pid:nonce
    name: Mapped[str] = mapped_column(String(NAME_MAX), index=True)
    labels: Mapped[list[str]] = mapped_column(default=list)
    version: Mapped[str] = mapped_column(String(64))
    max_concurrency: Mapped[int]
    host: Mapped[str] = mapped_column(String(255))
    pid: Mapped[int]
    running: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_heartbeat_at: Mapped[datetime] = mapped_column(default=utcnow)
    stopped_at: Mapped[datetime | None]
    # Asked to drain (`corral runner --drain`, or a signal): it claims nothing more.
    drain_requested_at: Mapped[datetime | None]


class ProfileProxy(Base):
    """Which proxies a profile may use; at most one is its default."""

    __tablename__ = "profile_proxies"
    __table_args__ = (
        Index(
            "uq_profile_proxies_one_default",
            "profile_id",
            unique=True,
            sqlite_where=text("is_default"),
            postgresql_where=text("is_default"),
        ),
    )

    profile_id: Mapped[int] = mapped_column(
        ForeignKey("profiles.id", ondelete="CASCADE"), primary_key=True
    )
    proxy_id: Mapped[int] = mapped_column(
        ForeignKey("proxies.id", ondelete="CASCADE"), primary_key=True, index=True
    )
    is_default: Mapped[bool] = mapped_column(Boolean, default=False)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)


class CommandTemplate(NamedMixin, TimestampMixin, Base):
    __tablename__ = "command_templates"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)

    description: Mapped[str | None] = mapped_column(Text)
    template: Mapped[str] = mapped_column(Text)
    # [{"name", "type": string|int|bool|choice, "default", "required", "choices", "description"}]
    parameters: Mapped[list[dict[str, Any]]] = mapped_column(JSON, default=list)
    timeout_seconds: Mapped[int | None]
    max_attempts: Mapped[int] = mapped_column(default=1)
    backoff_seconds: Mapped[float] = mapped_column(Float, default=BACKOFF_SECONDS_DEFAULT)
    env: Mapped[dict[str, Any]] = mapped_column(default=dict)


class Command(Base):
    __tablename__ = "commands"
    __table_args__ = (
        # The claim query: runnable commands by priority, then FIFO.
        Index("ix_commands_claim", "status", "priority", "id"),
        Index("ix_commands_profile_status", "profile_id", "status"),
        # One running command per profile (Chromium locks a user-data-dir): a claim race
        # between runners fails here instead of running two browsers on one profile.
        Index(
            "uq_commands_one_running_per_profile",
            "profile_id",
            unique=True,
            sqlite_where=text("status = 'RUNNING' AND profile_id IS NOT NULL"),
            postgresql_where=text("status = 'RUNNING' AND profile_id IS NOT NULL"),
        ),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    template_id: Mapped[int | None] = mapped_column(
        ForeignKey("command_templates.id", ondelete="SET NULL"), index=True
    )
    # The template text (snapshot, so edits don't change queued runs) or the ad-hoc string.
    source: Mapped[str] = mapped_column(Text)
    is_ad_hoc: Mapped[bool] = mapped_column(Boolean, default=False)
    argv: Mapped[list[str]] = mapped_column(default=list)
    env: Mapped[dict[str, Any]] = mapped_column(default=dict)
    profile_id: Mapped[int | None] = mapped_column(ForeignKey("profiles.id", ondelete="SET NULL"))
    profile_name: Mapped[str | None] = mapped_column(String(NAME_MAX))
    proxy_id: Mapped[int | None] = mapped_column(
        ForeignKey("proxies.id", ondelete="SET NULL"), index=True
    )
    # Set when the command goes out through a proxy: if that proxy is deleted (proxy_id
    # becomes NULL), the command fails closed instead of running direct.
    proxy_name: Mapped[str | None] = mapped_column(String(NAME_MAX))
    params: Mapped[dict[str, Any]] = mapped_column(default=dict)
    status: Mapped[CommandStatus] = mapped_column(
        enum_column(CommandStatus, 16), default=CommandStatus.QUEUED
    )
    priority: Mapped[int] = mapped_column(default=0)
    attempts: Mapped[int] = mapped_column(default=0)
    max_attempts: Mapped[int] = mapped_column(default=1)
    # Attempts not held against max_attempts: cut short by a runner shutdown, lost with
    # their runner (of which runner_losses; bounded by the max_runner_losses setting), or
    # not started for want of host resources (bounded by max_host_shortages).
    uncounted_attempts: Mapped[int] = mapped_column(default=0, server_default="0")
    runner_losses: Mapped[int] = mapped_column(default=0, server_default="0")
    timeout_seconds: Mapped[int | None]
    backoff_seconds: Mapped[float] = mapped_column(Float, default=BACKOFF_SECONDS_DEFAULT)
    exit_code: Mapped[int | None]
    error: Mapped[str | None] = mapped_column(Text)
    wait_reason: Mapped[str | None] = mapped_column(Text)
    runner_id: Mapped[str | None] = mapped_column(String(NAME_MAX))
    # Where the attempt's process group lives, so a restarted runner can stop survivors.
    runner_host: Mapped[str | None] = mapped_column(String(HOST_MAX))
    pgid: Mapped[int | None]
    # The attempt's fence token (issue 14): raised by every claim and every recovery. Each
    # write a runner makes for an attempt carries the token it was claimed with and is
    # refused once the row holds another, so a runner that comes back after its lease
    # (paused, partitioned) can neither change the newer attempt's state nor add lines.
    fence: Mapped[int] = mapped_column(default=0, server_default="0")
    cancel_requested: Mapped[bool] = mapped_column(Boolean, default=False)
    lease_expires_at: Mapped[datetime | None] = mapped_column(index=True)
    next_attempt_at: Mapped[datetime | None]
    last_seq: Mapped[int] = mapped_column(default=0)
    # Log lines the runner had to give up (unstorable, or the database stayed down as it
    # stopped); the log says which in a system line.
    lines_lost: Mapped[int] = mapped_column(default=0, server_default=text("0"))
    created_at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    started_at: Mapped[datetime | None]
    finished_at: Mapped[datetime | None]


class CommandService(Base):
    __tablename__ = "command_services"

    command_id: Mapped[int] = mapped_column(
        ForeignKey("commands.id", ondelete="CASCADE"), primary_key=True
    )
    service_id: Mapped[int] = mapped_column(
        ForeignKey("services.id", ondelete="CASCADE"), primary_key=True, index=True
    )


class LogLine(Base):
    """One stored (already redacted) line of a command's output; seq is gapless per command."""

    __tablename__ = "log_lines"

    command_id: Mapped[int] = mapped_column(
        ForeignKey("commands.id", ondelete="CASCADE"), primary_key=True
    )
    seq: Mapped[int] = mapped_column(Integer, primary_key=True)
    attempt: Mapped[int]
    stream: Mapped[str] = mapped_column(String(8))
    ts: Mapped[datetime]
    text: Mapped[str] = mapped_column(Text)


class CommandEvent(Base):
    """A structured `::corral::{json}` event a child printed (usage, progress, artifact)."""

    __tablename__ = "command_events"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    command_id: Mapped[int] = mapped_column(
        ForeignKey("commands.id", ondelete="CASCADE"), index=True
    )
    attempt: Mapped[int]
    seq: Mapped[int] = mapped_column(doc="The log seq it came after (its place in the log).")
    type: Mapped[str] = mapped_column(String(64))
    data: Mapped[dict[str, Any]] = mapped_column(default=dict)
    ts: Mapped[datetime] = mapped_column(default=utcnow)


class UsageSource(enum.StrEnum):
    """Where an observation of a token's budget came from."""

    EVENT = "event"
    PROBE = "probe"
    COUNT = "count"


class TokenRecordMixin:
    """A row about one token of a service (the shared one when profile_id is NULL), and the
    command it came from."""

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    service_id: Mapped[int] = mapped_column(ForeignKey("services.id", ondelete="CASCADE"))
    profile_id: Mapped[int | None] = mapped_column(
        ForeignKey("profiles.id", ondelete="CASCADE"), index=True
    )
    command_id: Mapped[int | None] = mapped_column(
        ForeignKey("commands.id", ondelete="SET NULL"), index=True
    )


class ServiceUsage(TokenRecordMixin, Base):
    """An observation of a service token's budget (shared token when profile_id is NULL)."""

    __tablename__ = "service_usage"
    __table_args__ = (Index("ix_service_usage_lookup", "service_id", "profile_id", "observed_at"),)

    units: Mapped[int | None]
    remaining: Mapped[int | None]
    limit: Mapped[int | None]
    reset_at: Mapped[datetime | None]
    token_valid: Mapped[bool | None]
    observed_at: Mapped[datetime] = mapped_column(default=utcnow)
    # Where the figures came from: UsageSource (a run's event, a provider probe, Corral's count).
    source: Mapped[UsageSource] = mapped_column(
        enum_column(UsageSource, 16), default=UsageSource.EVENT
    )
    # The provider's answer when it gave no figures (an error, a timeout); never a secret.
    detail: Mapped[str | None] = mapped_column(Text)


class ServiceSpend(TokenRecordMixin, Base):
    """A run started with a service's token (shared when profile_id is NULL): Corral's own
    count of what a token spent, which the gate reads per policy window (issue 13)."""

    __tablename__ = "service_spend"
    __table_args__ = (Index("ix_service_spend_lookup", "service_id", "profile_id", "started_at"),)

    started_at: Mapped[datetime] = mapped_column(default=utcnow)


class Role(enum.StrEnum):
    """What a user or an API token may do: `admin` everything; `viewer` reads all but
    secrets and changes nothing."""

    ADMIN = "admin"
    VIEWER = "viewer"


class User(Base):
    """An admin or viewer of the panel and the API, with an argon2id password hash."""

    __tablename__ = "users"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_MAX), unique=True)
    password_hash: Mapped[str] = mapped_column(String(255))
    role: Mapped[Role] = mapped_column(enum_column(Role, 16), default=Role.ADMIN)
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    updated_at: Mapped[datetime] = mapped_column(default=utcnow, onupdate=utcnow)
    last_login_at: Mapped[datetime | None]


class UserSession(Base):
    """A panel login: the cookie carries a random id (signed); only its hash is stored, so
    a database dump logs nobody in. Deleted at logout, password change and user deletion."""

    __tablename__ = "user_sessions"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    id_hash: Mapped[str] = mapped_column(String(64), unique=True)
    user_id: Mapped[int] = mapped_column(ForeignKey("users.id", ondelete="CASCADE"), index=True)
    csrf_token: Mapped[str] = mapped_column(String(64))
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    last_seen_at: Mapped[datetime] = mapped_column(default=utcnow)
    client_address: Mapped[str | None] = mapped_column(String(64))


class ApiToken(Base):
    """A bearer token for GraphQL clients, SSE and scripts (`crl_...`): shown once, stored
    as a keyed hash."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    name: Mapped[str] = mapped_column(String(NAME_MAX))
    role: Mapped[Role] = mapped_column(enum_column(Role, 16), default=Role.VIEWER)
    token_hash: Mapped[str] = mapped_column(String(64), unique=True)
    preview: Mapped[str] = mapped_column(String(32))
    created_by: Mapped[str | None] = mapped_column(String(NAME_MAX))
    user_id: Mapped[int | None] = mapped_column(
        ForeignKey("users.id", ondelete="SET NULL"), index=True
    )
    created_at: Mapped[datetime] = mapped_column(default=utcnow)
    expires_at: Mapped[datetime | None]
    last_used_at: Mapped[datetime | None]
    revoked_at: Mapped[datetime | None]


class AuditEvent(Base):
    """One mutation or login: who (and through which token or session), what, on which
    object, when, with what outcome, from where. Appended only; never a secret's value."""

    __tablename__ = "audit_events"
    # The audit log is read newest first, filtered by who, what or how it ended: with these a
    # page reads its rows' index entries in order, instead of scanning or sorting the log.
    __table_args__ = (
        Index("ix_audit_events_actor_id", "actor", "id"),
        Index("ix_audit_events_action_id", "action", "id"),
        Index("ix_audit_events_outcome_id", "outcome", "id"),
    )

    id: Mapped[int] = mapped_column(Integer, primary_key=True)
    at: Mapped[datetime] = mapped_column(default=utcnow, index=True)
    actor: Mapped[str | None] = mapped_column(String(NAME_MAX))
    actor_kind: Mapped[str] = mapped_column(String(16))  # user, token, cli, system, anonymous
    token_id: Mapped[int | None]
    session_id: Mapped[int | None]
    action: Mapped[str] = mapped_column(String(64))
    object_type: Mapped[str | None] = mapped_column(String(64))
    object_id: Mapped[str | None] = mapped_column(String(64), index=True)
    outcome: Mapped[str] = mapped_column(String(16))  # ok, error, denied
    detail: Mapped[dict[str, Any] | None]
    client_address: Mapped[str | None] = mapped_column(String(64))
