"""The runners table as the API and panel read it: which runners exist and which are alive.

A runner is alive while its last heartbeat (written with each lease pass, every third of a
lease) is within three leases and it has not stopped; one that is neither stopped nor alive
stopped heartbeating (killed, paused, cut off), and is flagged. A runner asked to drain
(`corral runner --drain`, or SIGTERM) claims nothing more, lets its commands finish up to its
deadline (CORRAL_DRAIN_SECONDS), puts back the rest and stops.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from server.models import Runner, utcnow

LABEL_PREFIX = "label:"  # a profile's runner affinity `label:gpu` names a label, not a runner
ALIVE_LEASES = 3  # a runner is alive while its last heartbeat is within this many leases


@dataclass(frozen=True, slots=True)
class RunnerState:
    """A runner's row and whether it is alive."""

    row: Runner
    alive: bool

    @property
    def lost(self) -> bool:
        """It did not stop, yet its heartbeat stopped."""
        return not self.alive and self.row.stopped_at is None

    @property
    def draining(self) -> bool:
        """It was asked to drain and has not stopped yet."""
        return self.row.drain_requested_at is not None and self.row.stopped_at is None


def alive_window(lease_seconds: float) -> timedelta:
    """How recent a heartbeat an alive runner has."""
    return timedelta(seconds=lease_seconds * ALIVE_LEASES)


def is_alive(row: Runner, lease_seconds: float, now: datetime) -> bool:
    """Whether the runner heartbeat within three leases and did not stop."""
    return row.stopped_at is None and row.last_heartbeat_at >= now - alive_window(lease_seconds)


async def list_runners(
    session: AsyncSession, lease_seconds: float, include_stopped: bool = False
) -> list[RunnerState]:
    """Runners by name, then start; those that stopped cleanly only when asked for."""
    stmt = select(Runner).order_by(Runner.name, Runner.started_at, Runner.id)
    if not include_stopped:
        stmt = stmt.where(Runner.stopped_at.is_(None))
    now = utcnow()
    rows = await session.scalars(stmt)
    return [RunnerState(row, is_alive(row, lease_seconds, now)) for row in rows]


async def request_drain(session: AsyncSession, name: str, lease_seconds: float) -> list[Runner]:
    """Ask the alive runners of this name to drain (those already draining too): the rows
    asked. Each hears it at its next heartbeat, or at once through a DRAIN_TOPIC wake-up
    the caller announces after its commit."""
    now = utcnow()
    alive_since = now - alive_window(lease_seconds)
    rows = await session.scalars(
        update(Runner)
        .where(
            Runner.name == name,
            Runner.stopped_at.is_(None),
            Runner.last_heartbeat_at >= alive_since,
        )
        .values(drain_requested_at=func.coalesce(Runner.drain_requested_at, now))
        .returning(Runner)
        .execution_options(synchronize_session=False)
    )
    found = list(rows)
    await session.flush()
    return found


async def still_running(session: AsyncSession, runner_ids: Sequence[str]) -> list[Runner]:
    """Those of these runners that have not stopped (nor died: their heartbeat goes on)."""
    if not runner_ids:
        return []
    rows = await session.scalars(
        select(Runner)
        .where(Runner.runner_id.in_(runner_ids), Runner.stopped_at.is_(None))
        .execution_options(populate_existing=True)
    )
    return list(rows)


def runner_affinities(name: str, labels: Sequence[str]) -> list[str]:
    """A runner's name and its labels as affinities (`label:<label>`)."""
    return [name, *(LABEL_PREFIX + label for label in labels)]


def no_runner_reason(affinity: str, alive: Sequence[tuple[str, Sequence[str]]]) -> str | None:
    """Why a command pinned to this affinity waits when no alive runner matches it (None:
    one does). `alive` holds each alive runner's name and labels."""
    if any(affinity in runner_affinities(name, labels) for name, labels in alive):
        return None
    if affinity.startswith(LABEL_PREFIX):
        label = affinity[len(LABEL_PREFIX) :]
        return f"waiting for a runner labelled {label!r} (none alive)"
    return f"waiting for a runner named {affinity!r} (none alive)"
