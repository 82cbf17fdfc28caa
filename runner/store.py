"""The runner's store gateway: every read and write of the runner's own, as named, typed
operations, with one implementation per database (runner/store_sqlite.py,
runner/store_postgres.py) behind the `RunnerStore` Protocol. Their statements are named in
runner/statements.py; no other module of the runner holds SQL text or a driver object.

A flush of the log store is one `write_batch`: its lines, command values (an attempt's
start, argv and final state ride here) and events, then its jobs in the same transaction.
A job is a `ClaimRequest` (the runner's claim: `claim` runs it) or, for tests and tools, a
function of a SQLAlchemy connection.

Fencing (issue 14): a share of a flush carries its attempt's fence token (`LogWriter.fence`,
from the claim). The flush locks the rows of its fenced commands and compares their tokens
first; a share whose token no longer matches (the attempt was recovered, maybe claimed
again) writes nothing (no line, value or event) and `write_batch` names its command in
`Written.refused`. A lease renewal likewise names the attempts it no longer holds
(`Renewal.lost`). Whoever hears it treats the attempt as lost (runner/attempt.py).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import asdict, dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from sqlalchemy import Connection
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from runner import statements, statements_runners
from runner.claims import ClaimedCommand, ClaimRequest, ClaimResult
from server.commands import choose_tokens, own_tokens
from server.models import LogLine, LogStream, Profile, Proxy, Service, utcnow
from server.proxies import proxy_chain
from server.routing import run_routing
from server.runners import no_runner_reason
from server.secretbox import SecretBox
from xray.hops import Hop
from xray.routing import Routing

if TYPE_CHECKING:
    from runner.logwriter import Share
    from server.messages import LineRun
    from server.models import Command

# A job that rides in a flush: the runner's claim, or a function of the transaction's
# SQLAlchemy connection (tests and tools).
StoreJob = ClaimRequest | Callable[[Connection], Any]
T = TypeVar("T")
FunctionJob = Callable[[Connection], T]  # a function job whose result is a T
UpdateKey = tuple[tuple[str, ...], bool]  # (columns, guarded by the runner's id)


@dataclass(slots=True)
class EventRow:
    """A child's checked event, and the usage row it carries (if any), as stored."""

    event: dict[str, Any]
    usage: dict[str, Any] | None


@dataclass
class WriteBatch:
    """What one flush writes, built for its database (`RunnerStore.build_batch`)."""

    sqlite_chunks: list[list[Any]] = field(default_factory=list)
    pg_copy: list[tuple[int, str]] = field(default_factory=list)  # (command id, COPY text)
    pg_rows: list[tuple[int, LineRun]] = field(default_factory=list)
    updates: dict[UpdateKey, list[dict[str, Any]]] = field(default_factory=dict)
    events: list[EventRow] = field(default_factory=list)
    fences: dict[int, int] = field(default_factory=dict)  # command id -> its share's token

    def without(self, refused: Collection[int]) -> WriteBatch:
        """The batch less the shares of these commands (their fence was refused)."""
        updates = {
            key: kept
            for key, rows in self.updates.items()
            if (kept := [row for row in rows if row["_id"] not in refused])
        }
        return WriteBatch(
            [chunk for chunk in self.sqlite_chunks if chunk[0] not in refused],
            [copy for copy in self.pg_copy if copy[0] not in refused],
            [row for row in self.pg_rows if row[0] not in refused],
            updates,
            [row for row in self.events if row.event["command_id"] not in refused],
            {key: fence for key, fence in self.fences.items() if key not in refused},
        )


@dataclass(frozen=True, slots=True)
class Written:
    """What `write_batch` did: each job's result, in order, and the commands whose shares
    it refused (their fence token no longer matched: nothing of theirs was written)."""

    results: list[Any]
    refused: list[int] = field(default_factory=list)


@dataclass(frozen=True, slots=True)
class Renewal:
    """What a lease renewal found: the attempts someone asked to cancel, and those whose
    fence no longer matches (recovered elsewhere: this runner has lost them)."""

    cancel: list[int]
    lost: list[int]


@dataclass
class AttemptRows:
    """What an attempt reads besides its command row: profile, proxy chain and routing,
    services and the tokens it would use (decrypted)."""

    profile: Profile | None
    proxy: Proxy | None
    services: list[Service]
    own: set[int]
    tokens: dict[str, str | None]
    chain: list[Hop]
    routing: Routing | None


@dataclass(frozen=True, slots=True)
class RunnerInfo:
    """What a supervisor registers about itself (the runners table)."""

    runner_id: str
    name: str
    labels: list[str]
    version: str
    max_concurrency: int
    host: str
    pid: int


# A runner silent this long (stopped, or dead and flagged) leaves the runners table when
# another registers.
FORGET_RUNNERS_AFTER = timedelta(days=1)

# What recovery does to one command RUNNING elsewhere: None when it is not orphaned; else it
# has changed the command (runner/recovery.py) and returns the note for its log.
Recover = Callable[["Command"], str | None]


class RunnerStore(Protocol):
    """The runner's database, one implementation per dialect."""

    dialect: str
    flush_lines: int  # most lines of one command a flush takes (see LogWriter.take)

    def start(self) -> None:
        """Open what the store keeps for itself (a connection, a thread)."""

    async def connect(self) -> None:
        """Open the store's connection now rather than at the first flush: a starting
        runner does it while it registers and recovers, not in its first claim."""

    async def close(self) -> None:
        """Close it."""

    def build_batch(self, shares: Sequence[Share]) -> WriteBatch:
        """The rows of a flush, in the form its database takes fastest."""

    async def write_batch(self, batch: WriteBatch, jobs: Sequence[StoreJob]) -> Written:
        """One transaction: the batch's lines, command values and events, then the jobs
        (each one's result, in order), less the shares whose fence is refused (named in the
        result). A failing job raises JobFailed (rolled back)."""

    async def claim(self, request: ClaimRequest) -> ClaimResult:
        """A claim in a transaction of its own."""

    async def renew_leases(
        self, runner_id: str, fences: dict[int, int], expires: datetime
    ) -> Renewal:
        """Extend the leases of the runner's attempts (command id -> fence token): those
        someone asked to cancel, and those whose token no longer matches (lost)."""

    async def recover_orphans(self, runner_id: str, recover: Recover) -> list[tuple[int, str]]:
        """Put back (or fail) what dead runners left: (id, new status) of each."""

    async def load_attempt(self, command: ClaimedCommand, box: SecretBox) -> AttemptRows:
        """The profile, proxy chain, routing, services and tokens of a claimed command."""

    async def register_runner(
        self, info: RunnerInfo, dead_before: datetime
    ) -> list[tuple[str, int]]:
        """Add this runner to the runners table, replacing earlier runs of it that stopped
        or whose heartbeat ended before `dead_before`, and forgetting any runner silent for
        FORGET_RUNNERS_AFTER; the earlier runs of it still in the table (runner id, pid)."""

    async def heartbeat(self, runner_id: str, running: int) -> bool:
        """The runner is alive, running this many commands; whether it was asked to drain."""

    async def mark_runner_draining(self, runner_id: str) -> None:
        """The runner drains: it claims nothing more (pinned commands wait for another)."""

    async def mark_runner_stopped(self, runner_id: str) -> None:
        """The runner stopped cleanly."""

    async def wait_for_runners(self, alive_since: datetime) -> list[int]:
        """Queued commands pinned (by profile affinity) to no runner alive since then wait,
        saying which runner they wait for: the ids whose state or reason changed."""


def open_store(
    engine: AsyncEngine, sessionmaker: async_sessionmaker[AsyncSession], runner_id: str | None
) -> RunnerStore:
    """The gateway for this engine's database."""
    if engine.dialect.name == "sqlite":
        from runner.store_sqlite import SqliteStore

        return SqliteStore(engine, sessionmaker, runner_id)
    from runner.store_postgres import PostgresStore

    return PostgresStore(engine, sessionmaker, runner_id)


class SessionOperations:
    """The operations both dialects run through SQLAlchemy sessions (not on the hot path)."""

    skip_locked = False  # recovery skips rows another runner holds (PostgreSQL)

    def __init__(
        self,
        engine: AsyncEngine,
        sessionmaker: async_sessionmaker[AsyncSession],
        runner_id: str | None,
    ) -> None:
        self.engine = engine
        self.sessionmaker = sessionmaker
        self.runner_id = runner_id  # command values are written only while it holds them

    async def renew_leases(
        self, runner_id: str, fences: dict[int, int], expires: datetime
    ) -> Renewal:
        if not fences:
            return Renewal([], [])
        async with self.sessionmaker() as session, session.begin():
            stmt = statements.renew_leases(runner_id, fences, expires)
            renewed = set(await session.scalars(stmt))
            cancel = list(await session.scalars(statements.cancel_requested(runner_id)))
        lost = sorted(set(fences) - renewed)
        return Renewal([command_id for command_id in cancel if command_id in renewed], lost)

    async def recover_orphans(self, runner_id: str, recover: Recover) -> list[tuple[int, str]]:
        recovered: list[tuple[int, str]] = []
        async with self.sessionmaker() as session, session.begin():
            stmt = statements.running_elsewhere(runner_id, self.skip_locked)
            for command in list(await session.scalars(stmt)):
                note = recover(command)
                if note is None:
                    continue
                session.add(_system_line(command.id, command.last_seq, command.attempts, note))
                recovered.append((command.id, command.status))
        return recovered

    async def load_attempt(self, command: ClaimedCommand, box: SecretBox) -> AttemptRows:
        async with self.sessionmaker() as session:
            profile = await session.get(Profile, command.profile_id) if command.profile_id else None
            proxy = await session.get(Proxy, command.proxy_id) if command.proxy_id else None
            services = list(await session.scalars(statements.command_services(command.id)))
            own = await own_tokens(session, command.profile_id, services)
            tokens = choose_tokens(box, services, own)
            chain = [] if proxy is None else await proxy_chain(session, box, proxy)
            routing = (
                None if proxy is None else await run_routing(session, box, proxy.routing_rules)
            )
        return AttemptRows(profile, proxy, services, set(own), tokens, chain, routing)

    async def register_runner(
        self, info: RunnerInfo, dead_before: datetime
    ) -> list[tuple[str, int]]:
        now = utcnow()
        async with self.sessionmaker() as session, session.begin():
            stmt = statements_runners.earlier_runs(info.name, info.host)
            earlier = [(row.runner_id, row.pid) for row in await session.execute(stmt)]
            forget_before = now - FORGET_RUNNERS_AFTER
            await session.execute(
                statements_runners.forget_runners(info.name, info.host, dead_before, forget_before)
            )
            await session.execute(
                statements_runners.insert_runner().values(
                    **asdict(info), running=0, started_at=now, last_heartbeat_at=now
                )
            )
        return earlier

    async def heartbeat(self, runner_id: str, running: int) -> bool:
        async with self.sessionmaker() as session, session.begin():
            stmt = statements_runners.runner_heartbeat(runner_id, running, utcnow())
            asked = await session.scalar(stmt)
        return asked is not None

    async def mark_runner_draining(self, runner_id: str) -> None:
        async with self.sessionmaker() as session, session.begin():
            await session.execute(statements_runners.runner_draining(runner_id, utcnow()))

    async def mark_runner_stopped(self, runner_id: str) -> None:
        async with self.sessionmaker() as session, session.begin():
            await session.execute(statements_runners.runner_stopped(runner_id, utcnow()))

    async def wait_for_runners(self, alive_since: datetime) -> list[int]:
        async with self.sessionmaker() as session, session.begin():
            pinned = await session.scalars(statements_runners.pinned_affinities())
            affinities = [affinity for affinity in pinned if affinity]
            if not affinities:
                return []
            alive = [
                (row.name, row.labels)
                for row in await session.execute(statements_runners.alive_runners(alive_since))
            ]
            changed: list[int] = []
            for affinity in affinities:
                reason = no_runner_reason(affinity, alive)
                if reason is not None:
                    stmt = statements_runners.wait_for_runner(affinity, reason)
                    changed += await session.scalars(stmt)
            return changed

    def group_updates(self, shares: Sequence[Share], batch: WriteBatch) -> None:
        """Each share's command values, grouped by column set (one statement a set), its
        events as rows, and its fence token."""
        guarded = self.runner_id is not None
        for share in shares:
            writer = share.writer
            if writer.fence is not None:
                batch.fences[writer.command_id] = writer.fence
            if share.values:
                key = (tuple(sorted(share.values)), guarded)
                batch.updates.setdefault(key, []).append(
                    {**share.values, "_id": writer.command_id, "_runner": self.runner_id}
                )
            for stored in share.events:
                batch.events.append(_event_row(writer, stored))


def refused_fences(fences: dict[int, int], held: dict[int, int]) -> list[int]:
    """The commands whose share's token (`fences`) is not the one their row holds now
    (`held`; a row that is gone holds none)."""
    return sorted(
        command_id for command_id, fence in fences.items() if held.get(command_id) != fence
    )


def write_events(connection: Connection, events: list[EventRow]) -> None:
    """The batch's events and usage rows (through SQLAlchemy: rare, not on the hot path)."""
    for row in events:
        connection.execute(statements.insert_event().values(**row.event))
        if row.usage is not None:
            connection.execute(statements.insert_usage().values(**row.usage))


def run_function_job(connection: Connection, job: StoreJob) -> Any:
    """A job that is a function of the SQLAlchemy connection (not a claim)."""
    assert not isinstance(job, ClaimRequest)
    return job(connection)


def _event_row(writer: Any, stored: Any) -> EventRow:
    """A checked event (runner.events: every value fits its column) and its usage row."""
    event = stored.event
    row = {
        "command_id": writer.command_id,
        "attempt": writer.attempt,
        "seq": stored.seq,
        "type": event.type,
        "data": event.data,
        "ts": stored.ts,
    }
    usage = event.usage
    if usage is None:
        return EventRow(row, None)
    return EventRow(
        row,
        {
            "service_id": usage.service_id,
            "profile_id": (
                writer.profile_id if usage.service_id in writer.own_token_services else None
            ),
            "command_id": writer.command_id,
            "units": usage.units,
            "remaining": usage.remaining,
            "limit": usage.limit,
            "reset_at": usage.reset_at,
            "token_valid": usage.token_valid,
            "detail": usage.detail,
            "observed_at": stored.ts,
            "source": statements.USAGE_FROM_EVENT,
        },
    )


def _system_line(command_id: int, seq: int, attempt: int, text: str) -> LogLine:
    return LogLine(
        command_id=command_id,
        seq=seq,
        attempt=attempt,
        stream=LogStream.SYSTEM.value,
        ts=utcnow(),
        text=text,
    )
