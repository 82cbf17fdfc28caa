"""The runners table's statements (a runner's row, heartbeat, drain and stop; the commands
pinned to no alive runner), named as runner/statements.py names the others; run by
runner/store.py's session operations."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import and_, delete, insert, or_, select, update
from sqlalchemy.sql import Select, Update

from server.models import Command, CommandStatus, Profile, Runner


def earlier_runs(name: str, host: str) -> Select[str, int]:
    """Earlier runs of this runner (same name, same host) still in the table: the runner id
    (its run markers begin with it) and pid of each."""
    return select(Runner.runner_id, Runner.pid).where(Runner.name == name, Runner.host == host)


def forget_runners(name: str, host: str, dead_before: datetime, forget_before: datetime) -> Any:
    """Rows of earlier runs of this runner (same name, same host) that stopped, cleanly or
    by dying (a restart replaces them), and of any runner silent since `forget_before`."""
    return delete(Runner).where(
        or_(
            and_(
                Runner.name == name,
                Runner.host == host,
                or_(Runner.stopped_at.is_not(None), Runner.last_heartbeat_at < dead_before),
            ),
            Runner.last_heartbeat_at < forget_before,
        )
    )


def insert_runner() -> Any:
    return insert(Runner)


def runner_heartbeat(runner_id: str, running: int, now: datetime) -> Any:
    """The heartbeat; it returns when the runner was asked to drain (null: it was not)."""
    return (
        update(Runner)
        .where(Runner.runner_id == runner_id)
        .values(last_heartbeat_at=now, running=running)
        .returning(Runner.drain_requested_at)
    )


def runner_draining(runner_id: str, now: datetime) -> Update:
    """The runner drains (kept from the first request)."""
    return (
        update(Runner)
        .where(Runner.runner_id == runner_id, Runner.drain_requested_at.is_(None))
        .values(drain_requested_at=now)
    )


def runner_stopped(runner_id: str, now: datetime) -> Update:
    return (
        update(Runner)
        .where(Runner.runner_id == runner_id)
        .values(stopped_at=now, last_heartbeat_at=now, running=0)
    )


def alive_runners(alive_since: datetime) -> Select[str, list[str]]:
    """Name and labels of the runners that heartbeat since then and did not stop (nor
    drain: a draining runner claims nothing more)."""
    return select(Runner.name, Runner.labels).where(
        Runner.stopped_at.is_(None),
        Runner.drain_requested_at.is_(None),
        Runner.last_heartbeat_at >= alive_since,
    )


def pinned_affinities() -> Select[str | None]:
    """The runner affinities of the profiles of queued or waiting commands."""
    return (
        select(Profile.runner_affinity)
        .join(Command, Command.profile_id == Profile.id)
        .where(
            Command.status.in_((CommandStatus.QUEUED.value, CommandStatus.WAITING.value)),
            Profile.runner_affinity.is_not(None),
        )
        .distinct()
    )


def wait_for_runner(affinity: str, reason: str) -> Update:
    """Queued commands pinned to this affinity wait with the reason (when it changes)."""
    pinned = select(Profile.id).where(Profile.runner_affinity == affinity)
    return (
        update(Command)
        .where(
            Command.status.in_((CommandStatus.QUEUED.value, CommandStatus.WAITING.value)),
            Command.profile_id.in_(pinned.scalar_subquery()),
            or_(
                Command.status != CommandStatus.WAITING.value,
                Command.wait_reason.is_(None),
                and_(Command.wait_reason.is_not(None), Command.wait_reason != reason),
            ),
        )
        .values(status=CommandStatus.WAITING.value, wait_reason=reason)
        .returning(Command.id)
    )
