"""Server-rendered pages: one Jinja2 environment over web_templates/ (autoescaped), and the
session's CSRF token handed to every page (base.html puts it where htmx and forms find it)."""

from __future__ import annotations

from functools import cache
from pathlib import Path
from typing import Any

from jinja2 import Environment, FileSystemLoader, StrictUndefined
from starlette.responses import HTMLResponse

from server.auth import Principal

TEMPLATES_DIR = Path(__file__).resolve().parent.parent / "web_templates"


# Explicit bidi embeddings, overrides and isolates (and the marks): in a run's file name or
# event, U+202E turns "invoice\u202egpj.exe" into "invoiceexe.jpg" on screen.
BIDI_CONTROLS = frozenset(
    "\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069"
)


def bidi_visible(value: object) -> str:
    """`value` as text with its bidi controls shown as `[U+202E]` (the `bidi_visible`
    filter: for what a command wrote, which must not reorder what the page shows)."""
    text = str(value)
    if not BIDI_CONTROLS.intersection(text):
        return text
    return "".join(f"[U+{ord(ch):04X}]" if ch in BIDI_CONTROLS else ch for ch in text)


@cache
def page_environment() -> Environment:
    """The pages' Jinja2 environment (every `{{ }}` HTML-escaped)."""
    environment = Environment(
        loader=FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,
        undefined=StrictUndefined,
        auto_reload=False,
    )
    environment.filters["bidi_visible"] = bidi_visible
    return environment


def session_user(principal: Principal | None) -> Principal | None:
    """The principal when it is a logged-in user (a session), else None."""
    return principal if principal is not None and principal.kind == "user" else None


def render_page(
    template: str,
    principal: Principal | None,
    *,
    status_code: int = 200,
    headers: dict[str, str] | None = None,
    **context: Any,
) -> HTMLResponse:
    """A full page; `user` and `csrf_token` come from the principal's session, if any."""
    user = session_user(principal)
    csrf_token = None if user is None else user.csrf_token
    html = (
        page_environment()
        .get_template(template)
        .render(user=user, csrf_token=csrf_token, **context)
    )
    # Pages carry per-session (or per-form) tokens: never kept by a cache.
    return HTMLResponse(
        html, status_code=status_code, headers={"Cache-Control": "no-store", **(headers or {})}
    )
