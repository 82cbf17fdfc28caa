"""Proxy health checks: fetch a URL through a sidecar, measure latency, read the exit IP."""

from __future__ import annotations

import ipaddress
import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

import httpx

from xray.binary import XrayBinary
from xray.config import Hop
from xray.sidecar import SidecarError, SidecarProcess

CHECK_TIMEOUT = 15.0
IP_IN_TEXT = re.compile(r"(?:^|[\s=:\"])(\d{1,3}(?:\.\d{1,3}){3}|[0-9a-fA-F:]{3,39})(?:$|[\s\",])")


@dataclass(frozen=True)
class HealthResult:
    ok: bool
    latency_ms: float | None = None
    error: str | None = None
    exit_ip: str | None = None


def exit_ip_of(body: str) -> str | None:
    """The IP address an echo service reports: JSON {"ip": ...}, `ip=...`, or the bare body."""
    candidates: list[str] = []
    try:
        data = json.loads(body)
        if isinstance(data, dict):
            candidates += [str(data[k]) for k in ("ip", "origin", "query") if k in data]
    except ValueError:
        pass
    candidates += IP_IN_TEXT.findall(body[:2000])
    for candidate in candidates:
        try:
            return str(ipaddress.ip_address(candidate.strip()))
        except ValueError:
            continue
    return None


async def check_chain(
    binary: XrayBinary, chain: Sequence[Hop], url: str, *, start_timeout: float = 10.0
) -> HealthResult:
    """Start a sidecar for `chain`, fetch `url` through it; never raises for proxy trouble."""
    try:
        async with SidecarProcess(binary, chain, start_timeout=start_timeout) as sidecar:
            began = time.monotonic()
            async with httpx.AsyncClient(proxy=sidecar.url, timeout=CHECK_TIMEOUT) as client:
                response = await client.get(url)
            latency = (time.monotonic() - began) * 1000
    except SidecarError as exc:
        return HealthResult(ok=False, error=str(exc))
    except httpx.HTTPError as exc:
        return HealthResult(ok=False, error=f"fetching {url} through the proxy failed: {exc!r}")
    if response.status_code >= 400:
        return HealthResult(
            ok=False, latency_ms=latency, error=f"{url} answered HTTP {response.status_code}"
        )
    return HealthResult(ok=True, latency_ms=round(latency, 1), exit_ip=exit_ip_of(response.text))
