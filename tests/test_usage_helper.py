"""The Playwright host's `reportUsage`: a real Node run (Chromium for a Playwright
APIResponse, fetch for a Response) against the fake providers; the lines it prints are
usage events the runner accepts, with the figures of the headers."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from pathlib import Path

from runner.events import parse_event
from tests.fixtures.fake_providers import FakeAnswer, FakeProviders
from tests.test_playwright_host import EVENT_PREFIX, HOST, RUN_TIMEOUT, host_env

SCRIPT = """
export default async function ({ page, env, reportUsage, args }) {
  const [github, openai] = args;
  const api = await page.request.get(`${github}/rate_limit`,
    { headers: { Authorization: `Bearer ${env.GITHUB_TOKEN}` } });
  reportUsage('github', api);
  const limited = await fetch(`${openai}/models`,
    { headers: { Authorization: `Bearer ${env.OPENAI_API_KEY}` } });
  reportUsage('openai', limited, { units: 2 });
}
"""


async def test_report_usage_turns_rate_limit_headers_into_usage_events(
    fake_providers: FakeProviders, tmp_path: Path
) -> None:
    fake_providers.answers["gh-token"] = FakeAnswer(remaining=4321, limit=5000, reset_in=600)
    fake_providers.answers["oa-token"] = FakeAnswer(status=429, limit=60, reset_in=90)
    script = tmp_path / "limits.mjs"
    script.write_text(SCRIPT)
    env = host_env(GITHUB_TOKEN="gh-token", OPENAI_API_KEY="oa-token")
    process = await asyncio.create_subprocess_exec(
        str(HOST), "--profile", str(tmp_path / "P"), "--", str(script),
        fake_providers.github, fake_providers.openai,
        cwd=tmp_path, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    stdout, stderr = await asyncio.wait_for(process.communicate(), RUN_TIMEOUT)
    assert process.returncode == 0, stderr.decode()
    payloads = [
        line.removeprefix(EVENT_PREFIX)
        for line in stdout.decode().splitlines()
        if line.startswith(EVENT_PREFIX)
    ]
    reports = [parse_event(p, {"github": 1, "openai": 2}) for p in payloads]
    usage = [r.usage for r in reports if r is not None and r.usage is not None]
    github, openai = usage
    assert (github.service_id, github.remaining, github.limit, github.units) == (1, 4321, 5000, 1)
    assert github.reset_at is not None
    assert abs(github.reset_at - datetime.now(UTC) - timedelta(seconds=600)) < timedelta(seconds=5)
    assert (openai.service_id, openai.remaining, openai.limit, openai.units) == (2, 0, 60, 2)
    assert openai.reset_at is not None
    assert abs(openai.reset_at - datetime.now(UTC) - timedelta(seconds=90)) < timedelta(seconds=5)
    assert fake_providers.authorizations() == ["Bearer gh-token", "Bearer oa-token"]
