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
from xray.hops import Hop
from xray.probe import PROBE_TIMEOUT, url_target
from xray.sidecar import SidecarError, SidecarProcess

CHECK_TIMEOUT = 15.0
IP_IN_TEXT = re.compile(r"(?:^|[\s=:\"])(\d{1,3}(?:\.\d{1,3}){3}|[0-9a-fA-F:]{3,39})(?:$|[\s\",])")


@dataclass(frozen=True)
class HealthResult:
    ok: bool
    latency_ms: float | None = None
    error: str | None = None
    exit_ip: str | None = None
    binary: str | None = None  # e.g. "v2ray 4.34.0": what ran the check


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
    binary: XrayBinary,
    chain: Sequence[Hop],
    url: str,
    *,
    start_timeout: float = 10.0,
    probe_timeout: float = PROBE_TIMEOUT,
) -> HealthResult:
    """Start a sidecar for `chain`, fetch `url` through it; never raises for proxy trouble.

    A failure names its cause: what the pre-flight probe of the first hop found, else what
    the sidecar reported (`SidecarLog.problems`), else the client's own error.
    """
    used = binary.label
    sidecar = SidecarProcess(
        binary,
        chain,
        start_timeout=start_timeout,
        probe_target=url_target(url),
        probe_label=f"the check URL {url}",
        probe_timeout=probe_timeout,
    )
    try:
        async with sidecar:
            began = time.monotonic()
            async with httpx.AsyncClient(proxy=sidecar.url, timeout=CHECK_TIMEOUT) as client:
                response = await client.get(url)
            latency = (time.monotonic() - began) * 1000
    except SidecarError as exc:
        return HealthResult(ok=False, error=str(exc), binary=used)
    except httpx.HTTPError as exc:
        known = [sidecar.probe_problem, *sidecar.log.problems]
        causes = [problem.message for problem in known if problem is not None]
        error = causes[0] if causes else f"fetching {url} through the proxy failed: {_said(exc)}"
        return HealthResult(ok=False, error=error, binary=used)
    if response.status_code >= 400:
        return HealthResult(
            ok=False,
            latency_ms=latency,
            error=f"{url} answered HTTP {response.status_code}",
            binary=used,
        )
    return HealthResult(
        ok=True, latency_ms=round(latency, 1), exit_ip=exit_ip_of(response.text), binary=used
    )


def _said(exc: httpx.HTTPError) -> str:
    """The client's error in words (httpx's ConnectError('') says nothing)."""
    if isinstance(exc, httpx.TimeoutException):
        return f"no answer within {CHECK_TIMEOUT:g} s"
    return str(exc) or f"the connection closed without an answer ({type(exc).__name__})"
