"""GitHub: `GET {baseUrl}/rate_limit` (free: it does not count against the budget)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import httpx

from server.providers.common import (
    Observation,
    epoch_time,
    header_int,
    is_rate_limited,
    provider_message,
    retry_after,
    unauthorized,
)


class GitHubProvider:
    """The core REST budget of a token (`resources.core`)."""

    default_base_url = "https://api.github.com"

    async def probe(self, base_url: str, token: str, client: httpx.AsyncClient) -> Observation:
        """Ask `/rate_limit` with the token."""
        response = await client.get(
            f"{base_url.rstrip('/')}/rate_limit",
            headers={
                "Authorization": f"Bearer {token}",
                "Accept": "application/vnd.github+json",
            },
        )
        if response.status_code == 401:
            return unauthorized(response)
        if is_rate_limited(response):
            reset = epoch_time(header_int(response, "x-ratelimit-reset"))
            return Observation(
                remaining=0,
                limit=header_int(response, "x-ratelimit-limit"),
                reset_at=reset or retry_after(response, datetime.now(UTC)),
                detail=provider_message(response),
            )
        if response.status_code != 200:
            return Observation(detail=provider_message(response))
        return _core_budget(response)


def _core_budget(response: httpx.Response) -> Observation:
    try:
        body: Any = response.json()
        core = body["resources"]["core"]
        remaining, limit, reset = core["remaining"], core["limit"], core.get("reset")
    except (ValueError, KeyError, TypeError):
        return Observation(detail="HTTP 200 without resources.core in the answer")
    if not all(isinstance(value, int) for value in (remaining, limit)):
        return Observation(detail="HTTP 200 with resources.core figures that are not integers")
    return Observation(
        remaining=remaining,
        limit=limit,
        reset_at=epoch_time(reset if isinstance(reset, int) else None),
        token_valid=True,
    )
