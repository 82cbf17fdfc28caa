"""Claims are atomic: several runners on one database never run a command twice, and never
run two commands of one profile at once (FOR UPDATE SKIP LOCKED + a unique index)."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections import Counter

from sqlalchemy import select
from starlette.applications import Starlette

from runner.supervisor import Supervisor
from server.app_services import AppServices
from server.models import Command, LogLine
from server.settings import Settings
from tests.conftest import GraphQLClient
from tests.fixtures.commands import run

SCRIPT = "python3 -c 'import time; print(time.time()); time.sleep(0.05); print(time.time())'"


async def test_two_runners_share_one_queue_without_double_runs(
    app: Starlette, gql: GraphQLClient, settings: Settings
) -> None:
    services: AppServices = app.state.services
    second = Supervisor(
        settings.model_copy(update={"max_concurrency": 3}),
        services.sessionmaker,
        services.secret_box,
        services.broker,
    )
    await second.start()
    try:
        profiles = []
        for name in ("A", "B"):
            data = await gql(
                "mutation($n: String!) { createProfile(input: {name: $n}) { profile { id } } }",
                n=name,
            )
            profiles.append(data["createProfile"]["profile"]["id"])
        ids = [
            await run(gql, commandString=SCRIPT, profileId=profiles[i % 3] if i % 3 < 2 else None)
            for i in range(24)
        ]
        deadline = time.monotonic() + 60
        while True:
            async with services.sessionmaker() as session:
                rows = list(await session.scalars(select(Command)))
            if all(row.status == "SUCCEEDED" for row in rows) and len(rows) == len(ids):
                break
            assert time.monotonic() < deadline, Counter(row.status for row in rows)
            await asyncio.sleep(0.1)
    finally:
        await second.stop()
    assert all(row.attempts == 1 for row in rows)
    async with services.sessionmaker() as session:
        lines = list(await session.scalars(select(LogLine).order_by(LogLine.command_id)))
    starts = Counter(line.command_id for line in lines if line.text.startswith("attempt 1 of"))
    assert set(starts.values()) == {1}  # every command ran exactly once
    assert {row.runner_id for row in rows} == {None}
    # One profile never ran two commands at once.
    for profile_id in {row.profile_id for row in rows if row.profile_id}:
        spans = sorted(
            tuple(
                float(line.text)
                for line in lines
                if line.command_id == row.id and line.stream == "stdout"
            )
            for row in rows
            if row.profile_id == profile_id
        )
        for (_, end), (start, _) in itertools.pairwise(spans):
            assert start >= end
