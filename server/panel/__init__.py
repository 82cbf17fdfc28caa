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
from server.panel.compose import compose_page, compose_preview, compose_run
from server.panel.dashboard import dashboard
from server.panel.live_statuses import run_statuses
from server.panel.profile_links import (
    attach_proxy,
    default_proxy,
    detach_proxy,
    link_service,
    profile_service_token,
    unlink_service,
)
from server.panel.profiles import (
    profile_create,
    profile_delete,
    profile_delete_page,
    profile_list,
    profile_page,
    profile_update,
)
from server.panel.proxies import (
    proxy_check,
    proxy_create,
    proxy_delete,
    proxy_delete_page,
    proxy_import,
    proxy_list,
    proxy_page,
    proxy_routing,
    proxy_update,
)
from server.panel.run_files import run_file
from server.panel.runs import run_cancel, run_list, run_log, run_page, run_retry
from server.panel.services import (
    service_create,
    service_delete,
    service_delete_page,
    service_list,
    service_page,
    service_token,
    service_update,
)
from server.panel.tail import run_tail
from server.panel.templates import (
    template_create,
    template_delete,
    template_delete_page,
    template_list,
    template_new,
    template_page,
    template_preview,
    template_update,
)
from server.panel.usage import usage_page, usage_probe
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
        Route("/proxies", proxy_list, methods=["GET"]),
        Route("/proxies", proxy_create, methods=["POST"]),
        Route("/proxies/import", proxy_import, methods=["POST"]),
        Route("/proxies/{proxy_id}", proxy_page, methods=["GET"]),
        Route("/proxies/{proxy_id}", proxy_update, methods=["POST"]),
        Route("/proxies/{proxy_id}/check", proxy_check, methods=["POST"]),
        Route("/proxies/{proxy_id}/routing", proxy_routing, methods=["POST"]),
        Route("/proxies/{proxy_id}/delete", proxy_delete_page, methods=["GET"]),
        Route("/proxies/{proxy_id}/delete", proxy_delete, methods=["POST"]),
        Route("/runs", run_list, methods=["GET"]),
        Route("/runs/statuses", run_statuses, methods=["GET"]),
        Route("/runs/{command_id}", run_page, methods=["GET"]),
        Route("/runs/{command_id}/log", run_log, methods=["GET"]),
        Route("/runs/{command_id}/files/{path:path}", run_file, methods=["GET"]),
        Route("/runs/{command_id}/tail", run_tail, methods=["GET"]),
        Route("/runs/{command_id}/cancel", run_cancel, methods=["POST"]),
        Route("/runs/{command_id}/retry", run_retry, methods=["POST"]),
        Route("/templates", template_list, methods=["GET"]),
        Route("/templates", template_create, methods=["POST"]),
        Route("/templates/new", template_new, methods=["GET"]),
        Route("/templates/preview", template_preview, methods=["POST"]),
        Route("/templates/{template_id}", template_page, methods=["GET"]),
        Route("/templates/{template_id}", template_update, methods=["POST"]),
        Route("/templates/{template_id}/delete", template_delete_page, methods=["GET"]),
        Route("/templates/{template_id}/delete", template_delete, methods=["POST"]),
        Route("/compose", compose_page, methods=["GET"]),
        Route("/compose/preview", compose_preview, methods=["POST"]),
        Route("/compose/run", compose_run, methods=["POST"]),
        Route("/services", service_list, methods=["GET"]),
        Route("/services", service_create, methods=["POST"]),
        Route("/services/{service_id}", service_page, methods=["GET"]),
        Route("/services/{service_id}", service_update, methods=["POST"]),
        Route("/services/{service_id}/token", service_token, methods=["POST"]),
        Route("/services/{service_id}/delete", service_delete_page, methods=["GET"]),
        Route("/services/{service_id}/delete", service_delete, methods=["POST"]),
        Route("/profiles/{profile_id}/services", link_service, methods=["POST"]),
        Route(
            "/profiles/{profile_id}/services/{service_id}/token",
            profile_service_token,
            methods=["POST"],
        ),
        Route(
            "/profiles/{profile_id}/services/{service_id}/unlink", unlink_service, methods=["POST"]
        ),
        Route("/profiles/{profile_id}/proxies", attach_proxy, methods=["POST"]),
        Route("/profiles/{profile_id}/proxies/{proxy_id}/default", default_proxy, methods=["POST"]),
        Route("/profiles/{profile_id}/proxies/{proxy_id}/detach", detach_proxy, methods=["POST"]),
        Route("/usage", usage_page, methods=["GET"]),
        Route("/usage/{service_id}/probe", usage_probe, methods=["POST"]),
        Route("/audit", audit_list, methods=["GET"]),
        Route("/tokens", token_list, methods=["GET"]),
        Route("/tokens", token_create, methods=["POST"]),
        Route("/tokens/{token_id}/revoke", token_revoke_page, methods=["GET"]),
        Route("/tokens/{token_id}/revoke", token_revoke, methods=["POST"]),
    ]
