"""The admin panel's pages: dashboard, profiles, runs (issue #17, first slice).

Server-rendered Jinja2 (web_templates/) with htmx on top: a page is one template that
includes its `_partial.html` pieces, and a request with `HX-Request` gets the partial alone,
rendered by the same view function. Every page also works as a plain link and every form as
a plain POST (303 on success, the page again with the errors next to the fields on failure).

Reads go through one read-only session per request; changes call the domain services in
server/ (they own validation) in one transaction, recorded in the audit log like GraphQL's
mutations. Everyone logged in reads; only admins change (a forged POST from a viewer is
refused 403 here, and CSRF is checked by server/csrf.py before a route runs).
"""

from __future__ import annotations

from starlette.routing import Route

from server.panel.admin import (
    audit_list,
    token_create,
    token_list,
    token_revoke,
    token_revoke_page,
)
from server.panel.dashboard import dashboard
from server.panel.profiles import (
    profile_create,
    profile_delete,
    profile_delete_page,
    profile_list,
    profile_page,
    profile_update,
)
from server.panel.runs import run_cancel, run_list, run_page, run_retry
from server.panel.tail import run_tail
from server.settings import Settings


def panel_routes(_settings: Settings) -> list[Route]:
    """The panel's pages (behind AccessControl; CSRF checked by CsrfProtection)."""
    return [
        Route("/", dashboard, methods=["GET"]),
        Route("/profiles", profile_list, methods=["GET"]),
        Route("/profiles", profile_create, methods=["POST"]),
        Route("/profiles/{profile_id}", profile_page, methods=["GET"]),
        Route("/profiles/{profile_id}", profile_update, methods=["POST"]),
        Route("/profiles/{profile_id}/delete", profile_delete_page, methods=["GET"]),
        Route("/profiles/{profile_id}/delete", profile_delete, methods=["POST"]),
        Route("/runs", run_list, methods=["GET"]),
        Route("/runs/{command_id}", run_page, methods=["GET"]),
        Route("/runs/{command_id}/tail", run_tail, methods=["GET"]),
        Route("/runs/{command_id}/cancel", run_cancel, methods=["POST"]),
        Route("/runs/{command_id}/retry", run_retry, methods=["POST"]),
        Route("/audit", audit_list, methods=["GET"]),
        Route("/tokens", token_list, methods=["GET"]),
        Route("/tokens", token_create, methods=["POST"]),
        Route("/tokens/{token_id}/revoke", token_revoke_page, methods=["GET"]),
        Route("/tokens/{token_id}/revoke", token_revoke, methods=["POST"]),
    ]
