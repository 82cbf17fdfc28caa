"""Where the panel's pages load htmx from: the pinned copy under static/vendor/htmx/, or
(CORRAL_PANEL_ASSETS=cdn) the same version from unpkg.com with SRI, falling back to the
local copy when the CDN does not answer (static/htmx-fallback.js)."""

from __future__ import annotations

from dataclasses import dataclass

HTMX_VERSION = "2.0.11"
HTMX_INTEGRITY = "sha384-2OatzQy1H+Zd/IIrjr1TcuDGqLXeHhbooAyJY1KdQMKnr4LZ22k31GBLdYKHmVjg"
HTMX_LOCAL_URL = "/static/vendor/htmx/htmx.min.js"
HTMX_CDN_ORIGIN = "https://unpkg.com"
HTMX_CDN_URL = f"{HTMX_CDN_ORIGIN}/htmx.org@{HTMX_VERSION}/dist/htmx.min.js"
HTMX_FALLBACK_URL = "/static/htmx-fallback.js"


@dataclass(frozen=True)
class PanelAssets:
    """What base.html needs to write htmx's script tags."""

    cdn: bool
    htmx_integrity: str = HTMX_INTEGRITY
    htmx_local: str = HTMX_LOCAL_URL
    htmx_cdn: str = HTMX_CDN_URL
    htmx_fallback: str = HTMX_FALLBACK_URL


def panel_assets(mode: str) -> PanelAssets:
    """The assets of a CORRAL_PANEL_ASSETS mode (`local` or `cdn`)."""
    return PanelAssets(cdn=mode == "cdn")


def csp_origins(mode: str) -> list[str]:
    """The origins the CSP must allow for the panel's scripts in this mode."""
    return [HTMX_CDN_ORIGIN] if mode == "cdn" else []
