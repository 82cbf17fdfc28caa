"""A failed Playwright-host run's error names the cause the host printed (issue 12)."""

from __future__ import annotations

import pytest

from runner.host_cause import MAX_CAUSE_CHARS, HostCause
from server.settings import Settings
from tests.conftest import GraphQLClient
from tests.fixtures.commands import run, wait_final
from tests.test_supervisor import LINK, SERVICE, SHARED, profile


@pytest.fixture
def settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"kill_grace_seconds": 0.5})


def test_the_first_line_naming_a_cause_is_kept() -> None:
    cause = HostCause()
    cause.see(["plain output", "corral-playwright: warning: TZ is odd"])
    cause.see(["corral-playwright: cannot launch Chromium: it crashed during start (signal X)"])
    cause.see(["corral-playwright:   chromium: ERROR x.cc(1): detail", "corral-playwright: later"])
    assert cause.explain("exited with status 3", str) == (
        "exited with status 3: cannot launch Chromium: it crashed during start (signal X)"
    )
    assert HostCause().explain("exited with status 3", str) == "exited with status 3"


def test_a_long_cause_is_redacted_before_it_is_shortened() -> None:
    secret = "s3cret-" * 10
    cause = HostCause()
    # The secret straddles the cut: shortened first, its start would escape the redactor.
    cause.see(["corral-playwright: " + "x" * (MAX_CAUSE_CHARS - 30) + secret])
    error = cause.explain("exited with status 1", lambda text: text.replace(secret, "[redacted]"))
    assert "s3cret" not in error
    assert error.endswith("[redacted]")


async def test_the_command_error_names_the_hosts_cause_redacted(gql: GraphQLClient) -> None:
    service_id = (await gql(SERVICE, t=SHARED))["createService"]["service"]["id"]
    profile_id = await profile(gql, "p")
    await gql(LINK, p=profile_id, s=service_id, t=None)
    script = (
        "sh -c 'echo noise >&2; echo corral-playwright: warning: minor >&2;"
        ' echo "corral-playwright: cannot launch Chromium: refused $GITHUB_TOKEN" >&2;'
        " echo corral-playwright:   chromium: detail >&2; exit 3'"
    )
    command_id = await run(gql, commandString=script, profileId=profile_id)
    final = await wait_final(gql, command_id)
    assert (final["status"], final["exitCode"]) == ("FAILED", 3)
    assert final["error"] == "exited with status 3: cannot launch Chromium: refused [redacted]"


async def test_a_cause_printed_by_a_command_that_then_succeeds_is_no_error(
    gql: GraphQLClient,
) -> None:
    script = "sh -c 'echo corral-playwright: script failed: boom >&2; exit 0'"
    final = await wait_final(gql, await run(gql, commandString=script))
    assert (final["status"], final["error"]) == ("SUCCEEDED", None)
