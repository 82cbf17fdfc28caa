"""Every statement the runner sends, named and kept together, in each dialect's form.

Where the two dialects differ (placeholders, `FOR UPDATE ... SKIP LOCKED`, JSON lists as
`json_each` against arrays as `= ANY`), a statement is written once with `{}` or `?`
slots and rendered here for each. runner/store_sqlite.py and runner/store_postgres.py run
them; nothing else in the runner holds SQL text (tests/test_layers.py looks for it). The
rate-limit gate (runner/gate.py) asks for its reads by name: GATE_READS.
"""

from __future__ import annotations

import functools
import json
import re
from datetime import datetime
from typing import Any

from sqlalchemy import JSON, bindparam, insert, or_, select, tuple_, update
from sqlalchemy.dialects import postgresql
from sqlalchemy.sql import Select, Update

from runner.claims import ClaimedCommand
from runner.gate import ReadName
from server.db import sqlite_timestamp
from server.models import (
    Command,
    CommandEvent,
    CommandService,
    CommandStatus,
    Service,
    ServiceUsage,
    UsageSource,
)

# -- claims --------------------------------------------------------------------------------

# Columns: what runner.claims.choose reads, then the profile's runner affinity (one this
# runner answers to: its name or `label:<one of its labels>`) and whether
# the command has services (only then does the gate read anything), then its proxy.
_CANDIDATES = (
    "SELECT c.id, c.profile_id, c.profile_name, c.status, c.wait_reason,"
    " c.next_attempt_at, c.created_at, p.runner_affinity,"
    " EXISTS (SELECT 1 FROM command_services s WHERE s.command_id = c.id), c.proxy_id"
    " FROM commands c"
    " LEFT OUTER JOIN profiles p ON p.id = c.profile_id"
    " WHERE c.status IN ('QUEUED', 'WAITING')"
    " AND (c.next_attempt_at IS NULL OR c.next_attempt_at <= {now})"
    " AND (p.runner_affinity IS NULL OR p.runner_affinity {affinities})"
    " ORDER BY c.priority DESC, c.id LIMIT {limit}"
)
PG_CANDIDATES = _CANDIDATES.format(now="$1", affinities="= ANY($2::text[])", limit="$3") + (
    " FOR UPDATE OF c SKIP LOCKED"
)
SQLITE_CANDIDATES = _CANDIDATES.format(
    now="?", affinities="IN (SELECT value FROM json_each(?))", limit="?"
)
BUSY_PROFILES = (
    "SELECT profile_id, id FROM commands WHERE status = 'RUNNING' AND profile_id IS NOT NULL"
)
_MARK_WAITING = "UPDATE commands SET status = ?, wait_reason = ?, next_attempt_at = ? WHERE id = ?"
# The hold policy's proxies: the flagged ones, and the via links of chains.
_FLAGGED = (
    "SELECT id, name, health_failures, health_error FROM proxies WHERE health_failures >= {n}"
)
PG_FLAGGED = _FLAGGED.format(n="$1")
SQLITE_FLAGGED = _FLAGGED.format(n="?")
VIA_LINKS = "SELECT id, via_id FROM proxies WHERE via_id IS NOT NULL"
# It returns ClaimedCommand's fields, then whether the command has services.
_CLAIM = (
    "UPDATE commands SET status = 'RUNNING', attempts = attempts + 1, runner_id = {runner},"  # noqa: S608
    " runner_host = {host}, lease_expires_at = {lease}, started_at = {now}, wait_reason = NULL,"
    " next_attempt_at = NULL, pgid = NULL, fence = fence + 1 WHERE id {chosen} RETURNING "
    + ", ".join(ClaimedCommand.__slots__)
    + ", EXISTS (SELECT 1 FROM command_services s WHERE s.command_id = commands.id)"
)
PG_CLAIM = _CLAIM.format(
    chosen="= ANY($1::integer[])", runner="$2", host="$3", lease="$4", now="$5"
)
SQLITE_CLAIM = _CLAIM.format(
    runner="?", host="?", lease="?", now="?", chosen="IN (SELECT value FROM json_each(?))"
)


# The rate-limit gate's reads (runner/gate.py asks for them by name) and writes, with `?`
# placeholders; `[ids]` stands for a list of ints (json_each on SQLite, = ANY on PostgreSQL).
GATE_READS: dict[ReadName, str] = {
    "uses": (
        "SELECT cs.command_id, s.id, s.name, s.rate_limit_policy, ps.rate_limit_policy,"
        " ps.token_encrypted IS NOT NULL, c.profile_id, c.profile_name"
        " FROM command_services cs JOIN services s ON s.id = cs.service_id"
        " JOIN commands c ON c.id = cs.command_id"
        " LEFT OUTER JOIN profile_services ps"
        " ON ps.profile_id = c.profile_id AND ps.service_id = cs.service_id"
        " WHERE cs.command_id [ids]"
    ),
    "lock": "SELECT pg_advisory_xact_lock(?, ?)",
    # Running commands and their services: bounded by the runners' concurrency.
    "running": (
        "SELECT cs.service_id, c.profile_id, ps.token_encrypted IS NOT NULL"
        " FROM commands c CROSS JOIN command_services cs"
        " LEFT OUTER JOIN profile_services ps"
        " ON ps.profile_id = c.profile_id AND ps.service_id = cs.service_id"
        " WHERE c.status = 'RUNNING' AND cs.command_id = c.id"
    ),
    "observed_shared": (
        'SELECT remaining, "limit", reset_at, token_valid, observed_at, detail FROM service_usage'
        " WHERE service_id = ? AND profile_id IS NULL ORDER BY observed_at DESC LIMIT 1"
    ),
    "observed_own": (
        'SELECT remaining, "limit", reset_at, token_valid, observed_at, detail FROM service_usage'
        " WHERE service_id = ? AND profile_id = ? ORDER BY observed_at DESC LIMIT 1"
    ),
    "spent_shared": (
        "SELECT count(*), min(started_at) FROM service_spend"
        " WHERE service_id = ? AND profile_id IS NULL AND started_at > ?"
    ),
    "spent_own": (
        "SELECT count(*), min(started_at) FROM service_spend"
        " WHERE service_id = ? AND profile_id = ? AND started_at > ?"
    ),
}
_SPEND = (
    "INSERT INTO service_spend (service_id, profile_id, command_id, started_at) VALUES (?, ?, ?, ?)"
)
_FAIL_AT_GATE = (
    "UPDATE commands SET status = 'FAILED', error = ?, finished_at = ?, wait_reason = NULL,"
    " next_attempt_at = NULL, last_seq = last_seq + 1 WHERE id = ? RETURNING id, last_seq, attempts"
)
_FAIL_LINE = (
    "INSERT INTO log_lines (command_id, seq, attempt, stream, ts, text)"
    " VALUES (?, ?, ?, 'system', ?, ?)"
)


def pg(statement: str) -> str:
    """A statement with `?` placeholders (and `[ids]`, a list of ints) for asyncpg."""
    statement = statement.replace("[ids]", "= ANY(?::integer[])")
    parts = statement.split("?")
    return "".join(f"{part}${index}" for index, part in enumerate(parts[:-1], 1)) + parts[-1]


def sqlite(statement: str) -> str:
    """A statement with `?` placeholders (and `[ids]`, a JSON list of ints) for sqlite3."""
    return statement.replace("[ids]", "IN (SELECT value FROM json_each(?))")


def sqlite_params(params: tuple[Any, ...]) -> tuple[Any, ...]:
    """Parameters as sqlite3 takes them: timestamps as SQLite keeps them, lists as JSON."""
    return tuple(
        sqlite_timestamp(value)
        if isinstance(value, datetime)
        else json.dumps(value)
        if isinstance(value, list)
        else value
        for value in params
    )


# A flush's fence check: the tokens its commands hold now. On PostgreSQL the rows stay
# locked until the flush commits, so a recovery cannot raise a token between the check and
# the writes (it skips locked rows and looks again at its next pass).
_FENCES = "SELECT id, fence FROM commands WHERE id [ids] ORDER BY id"
PG_FENCES = pg(_FENCES) + " FOR NO KEY UPDATE"
SQLITE_FENCES = sqlite(_FENCES)
PG_MARK_WAITING = pg(_MARK_WAITING)
SQLITE_MARK_WAITING = sqlite(_MARK_WAITING)
PG_GATE = {name: pg(statement) for name, statement in GATE_READS.items()}
SQLITE_GATE = {name: sqlite(statement) for name, statement in GATE_READS.items()}
PG_SPEND, SQLITE_SPEND = pg(_SPEND), sqlite(_SPEND)
PG_FAIL_AT_GATE, SQLITE_FAIL_AT_GATE = pg(_FAIL_AT_GATE), sqlite(_FAIL_AT_GATE)
PG_FAIL_LINE, SQLITE_FAIL_LINE = pg(_FAIL_LINE), sqlite(_FAIL_LINE)
CLAIMED_JSON_FIELDS = [
    index
    for index, name in enumerate(ClaimedCommand.__slots__)
    if isinstance(Command.__table__.c[name].type, JSON)
]

# -- leases and recovery -------------------------------------------------------------------


def renew_leases(runner_id: str, fences: dict[int, int], expires: datetime) -> Update:
    """Extend the leases of the runner's attempts whose fence token still matches; returns
    the ids of those it extended (the others are lost)."""
    return (
        update(Command)
        .where(
            Command.runner_id == runner_id,
            Command.status == CommandStatus.RUNNING.value,
            tuple_(Command.id, Command.fence).in_(list(fences.items())),
        )
        .values(lease_expires_at=expires)
        .returning(Command.id)
    )


def cancel_requested(runner_id: str) -> Select[int]:
    return select(Command.id).where(
        Command.runner_id == runner_id, Command.cancel_requested.is_(True)
    )


def running_elsewhere(runner_id: str, skip_locked: bool) -> Select[Command]:
    """Commands RUNNING on another runner (or none): recovery's candidates."""
    stmt = select(Command).where(
        Command.status == CommandStatus.RUNNING.value,
        or_(Command.runner_id.is_(None), Command.runner_id != runner_id),
    )
    return stmt.with_for_update(skip_locked=True) if skip_locked else stmt


def command_services(command_id: int) -> Select[Service]:
    """The services a command uses, by name."""
    return (
        select(Service)
        .join(CommandService, CommandService.service_id == Service.id)
        .where(CommandService.command_id == command_id)
        .order_by(Service.name)
    )


# -- log lines, command values and events ----------------------------------------------------

LINE_COLUMNS = ("command_id", "seq", "attempt", "stream", "ts", "text")
# One JSON text: [[command_id, attempt, stream, ts, first_seq, [text, ...]], ...]. The CTE
# reads each chunk's fields once (per line, `c.value ->> n` would parse the chunk again).
SQLITE_INSERT_LINES = (
    "INSERT INTO log_lines (command_id, seq, attempt, stream, ts, text) "
    "WITH c AS MATERIALIZED (SELECT value ->> 0 AS command_id, value ->> 1 AS attempt, "
    "value ->> 2 AS stream, value ->> 3 AS ts, value ->> 4 AS first_seq, value -> 5 AS texts "
    "FROM json_each(?)) "
    "SELECT c.command_id, c.first_seq + t.key, c.attempt, c.stream, c.ts, t.value "
    "FROM c, json_each(c.texts) AS t"
)


@functools.lru_cache(maxsize=64)
def command_update(columns: tuple[str, ...], guarded: bool) -> Update:
    """UPDATE of these columns, built once per column set."""
    stmt = update(Command).where(Command.id == bindparam("_id"))
    if guarded:
        stmt = stmt.where(Command.runner_id == bindparam("_runner"))
    return stmt.values({column: bindparam(column) for column in columns})


def insert_event() -> Any:
    return insert(CommandEvent)


def insert_usage() -> Any:
    return insert(ServiceUsage)


def pg_lines_and_updates(
    line_arrays: list[list[Any]] | None,
    updates: dict[tuple[tuple[str, ...], bool], list[dict[str, Any]]],
    fences: dict[int, int] | None = None,
) -> tuple[str, list[Any]] | None:
    """A flush's few lines and all its command updates as one PostgreSQL statement (a
    statement a round trip, and a flush of this statement alone needs no BEGIN/COMMIT of
    its own): an INSERT of the lines from arrays, and one UPDATE from arrays per column set,
    as data-modifying CTEs. None when there is nothing of the kind. (A command is in one
    column set only: a flush holds one share per command.)

    With `fences` (command id -> token) the statement first locks those commands' rows
    whose token matches; the others' lines and values are left out, and the statement
    returns their ids (an array). Without, it returns 1."""
    args: list[Any] = []

    def param(value: Any, sql_type: str) -> str:
        args.append(value)
        return f"${len(args)}::{sql_type}"

    parts = []
    keep = ""  # the condition on a command's id that leaves refused shares out
    if fences:
        ids, tokens = param(list(fences), "integer[]"), param(list(fences.values()), "integer[]")
        parts.append(
            "held AS (SELECT c.id FROM commands AS c JOIN unnest("  # noqa: S608
            f"{ids}, {tokens}) AS f(id, fence) ON c.id = f.id AND c.fence = f.fence "
            "ORDER BY c.id FOR NO KEY UPDATE OF c)"
        )
        parts.append(
            f"refused AS (SELECT r.id FROM unnest({ids}) AS r(id) "  # noqa: S608
            "WHERE r.id NOT IN (SELECT id FROM held))"
        )
        keep = " NOT IN (SELECT id FROM refused)"
    if line_arrays:
        columns = ", ".join(map(param, line_arrays, _LINE_ARRAY_TYPES))
        where = f" WHERE v.command_id{keep}" if keep else ""
        parts.append(
            f"lines AS (INSERT INTO log_lines ({', '.join(LINE_COLUMNS)}) "  # noqa: S608
            f"SELECT * FROM unnest({columns}) AS v({', '.join(LINE_COLUMNS)}){where})"
        )
    # Column sets in a fixed order: the same sets make the same text (the driver caches
    # prepared statements by their text).
    for index, ((names, guarded), rows) in enumerate(sorted(updates.items())):
        sources = [param([row["_id"] for row in rows], "integer[]")]
        for name in names:
            values = [row[name] for row in rows]
            if name in _JSON_COLUMNS:
                values = [json.dumps(value) for value in values]  # the json codec takes text
            sources.append(param(values, _command_array_type(name)))
        assignments = ", ".join(f"{name} = v.{name}" for name in names)
        where = "c.id = v._id"
        if guarded:
            where += f" AND c.runner_id = {param(rows[0]['_runner'], 'text')}"
        if keep:
            where += f" AND c.id{keep}"
        parts.append(
            f"u{index} AS (UPDATE commands AS c SET {assignments} "  # noqa: S608 - checked names
            f"FROM unnest({', '.join(sources)}) AS v(_id, {', '.join(names)}) WHERE {where})"
        )
    if not parts:
        return None
    result = "ARRAY(SELECT id FROM refused)" if fences else "1"
    return f"WITH {', '.join(parts)} SELECT {result}", args


_LINE_ARRAY_TYPES = ("integer[]", "integer[]", "integer[]", "varchar[]", "timestamptz[]", "text[]")


@functools.lru_cache(maxsize=64)
def _command_array_type(name: str) -> str:
    """The PostgreSQL array type of a commands column, without its length (a cast to
    VARCHAR(16)[] would cut a longer value silently; the column itself refuses it). A name
    not of the table is refused: names are written into the statement."""
    column = Command.__table__.c.get(name)
    if column is None or not name.isidentifier():
        raise ValueError(f"commands has no column {name!r}")
    return re.sub(r"\(.*?\)", "", column.type.compile(dialect=_PG_DIALECT)) + "[]"


_PG_DIALECT = postgresql.dialect()  # type: ignore[no-untyped-call]
_JSON_COLUMNS = frozenset(
    column.name for column in Command.__table__.c if isinstance(column.type, JSON)
)
USAGE_FROM_EVENT = UsageSource.EVENT.value
