"""Provider plug-ins: ask an outside service for a token's rate-limit budget.

A provider is keyed by the service's `kind` (`github`, `openai`); `probe` makes one cheap
request with the token and reads the figures off the answer. Adding one: write a module
here with a class that has `default_base_url` and `async probe(base_url, token, client)`
(see `github.py`), and add an instance to `PROVIDERS` below.
"""

from __future__ import annotations

from typing import Protocol

import httpx

from server.providers.common import Observation
from server.providers.github import GitHubProvider
from server.providers.openai import OpenAIProvider

__all__ = ["PROVIDERS", "Observation", "Provider", "provider_for"]


class Provider(Protocol):
    """Reads a token's budget from one kind of service."""

    default_base_url: str

    async def probe(self, base_url: str, token: str, client: httpx.AsyncClient) -> Observation:
        """One cheap authenticated request; the token's figures (or why there are none).
        May raise httpx errors: the caller turns them into an observation with a detail."""
        ...


PROVIDERS: dict[str, Provider] = {
    "github": GitHubProvider(),
    "openai": OpenAIProvider(),
}


def provider_for(kind: str) -> Provider | None:
    """The provider of a service `kind` (case does not matter), or None."""
    return PROVIDERS.get(kind.strip().lower())
