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


@cache
def page_environment() -> Environment:
    """The pages' Jinja2 environment (every `{{ }}` HTML-escaped)."""
    return Environment(
        loader=FileSystemLoader(TEMPLATES_DIR),
        autoescape=True,
        undefined=StrictUndefined,
        auto_reload=False,
    )


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
