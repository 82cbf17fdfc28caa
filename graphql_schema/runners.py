"""GraphQL: the runners (`corral runner` processes and `corral serve`'s embedded one)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

import strawberry

from graphql_schema.context import Info
from server.runners import RunnerState, list_runners


@strawberry.type(
    description="A runner: a process that claims and runs commands, as it registered, with "
    "its last heartbeat."
)
class Runner:
    name: str = strawberry.field(
        description="Its name (CORRAL_RUNNER_NAME, default the host name), which a profile's "
        "runnerAffinity may name."
    )
    labels: list[str] = strawberry.field(
        description="Its labels (CORRAL_RUNNER_LABELS); `label:<label>` as a profile's "
        "runnerAffinity pins the profile to runners with that label."
    )
    version: str = strawberry.field(description="The Corral version it runs.")
    host: str = strawberry.field(description="The host it runs on.")
    max_concurrency: int = strawberry.field(description="Most commands it runs at once.")
    started_at: datetime = strawberry.field(description="When it started.")
    last_heartbeat_at: datetime = strawberry.field(
        description="Its last heartbeat (sent every third of a lease)."
    )
    stopped_at: datetime | None = strawberry.field(
        description="When it stopped cleanly (null while it runs, or if it died)."
    )
    running: int = strawberry.field(description="Commands it was running at its last heartbeat.")
    alive: bool = strawberry.field(
        description="Whether it heartbeat within three leases (CORRAL_LEASE_SECONDS) and did "
        "not stop; false for one that did not stop but whose heartbeat stopped."
    )
    draining: bool = strawberry.field(
        description="Whether it was asked to drain (SIGTERM, or `corral runner --drain`) and "
        "has not stopped yet: it claims nothing more, its running commands finish up to "
        "its deadline (CORRAL_DRAIN_SECONDS), then it puts back the rest and stops."
    )

    @classmethod
    def from_state(cls, state: RunnerState) -> Runner:
        row = state.row
        return cls(
            name=row.name,
            labels=list(row.labels),
            version=row.version,
            host=row.host,
            max_concurrency=row.max_concurrency,
            started_at=row.started_at,
            last_heartbeat_at=row.last_heartbeat_at,
            stopped_at=row.stopped_at,
            running=row.running,
            alive=state.alive,
            draining=state.draining,
        )


async def resolve_runners(
    info: Info,
    include_stopped: Annotated[
        bool,
        strawberry.argument(description="Also the runners that stopped cleanly."),
    ] = False,
) -> list[Runner]:
    async with info.context.reading() as session:
        states = await list_runners(session, info.context.settings.lease_seconds, include_stopped)
    return [Runner.from_state(state) for state in states]
