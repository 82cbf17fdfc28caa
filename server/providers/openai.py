"""OpenAI-style APIs: `GET {baseUrl}/models` and the `x-ratelimit-*` headers of its answer.

The request budget is the observation's figures; the token budget (`*-tokens`) goes into
its detail, since one observation row holds one budget.
"""

from __future__ import annotations

from datetime import UTC, datetime

import httpx

from server.providers.common import (
    Observation,
    after,
    header_int,
    is_rate_limited,
    parse_duration,
    provider_message,
    retry_after,
    unauthorized,
)


class OpenAIProvider:
    """Request and token budgets from the rate-limit headers of a cheap request."""

    default_base_url = "https://api.openai.com/v1"

    async def probe(self, base_url: str, token: str, client: httpx.AsyncClient) -> Observation:
        """List the models with the token and read the headers."""
        response = await client.get(
            f"{base_url.rstrip('/')}/models", headers={"Authorization": f"Bearer {token}"}
        )
        now = datetime.now(UTC)
        if response.status_code == 401:
            return unauthorized(response)
        reset = after(_reset_seconds(response, "requests"), now)
        if is_rate_limited(response):
            return Observation(
                remaining=0,
                limit=header_int(response, "x-ratelimit-limit-requests"),
                reset_at=reset or retry_after(response, now),
                detail=provider_message(response),
            )
        if response.status_code != 200:
            return Observation(detail=provider_message(response))
        return Observation(
            remaining=header_int(response, "x-ratelimit-remaining-requests"),
            limit=header_int(response, "x-ratelimit-limit-requests"),
            reset_at=reset,
            token_valid=True,
            detail=_tokens_detail(response),
        )


def _reset_seconds(response: httpx.Response, budget: str) -> float | None:
    return parse_duration(response.headers.get(f"x-ratelimit-reset-{budget}", ""))


def _tokens_detail(response: httpx.Response) -> str | None:
    """`tokens: 39000 of 40000 left, resets in 1.2s` when the answer has a token budget."""
    remaining = header_int(response, "x-ratelimit-remaining-tokens")
    limit = header_int(response, "x-ratelimit-limit-tokens")
    if remaining is None and limit is None:
        return None
    text = f"tokens: {remaining if remaining is not None else '?'} of {limit or '?'} left"
    seconds = _reset_seconds(response, "tokens")
    return text if seconds is None else f"{text}, resets in {seconds:g}s"
