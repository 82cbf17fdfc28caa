"""The composer: pick a template (or type an ad-hoc command), a profile, a proxy and
services, fill the template's typed parameters, preview the argv, run it.

Two forms: a GET form picks the template and profile (htmx swaps the second form in when
either changes; without JS its button reloads the page with `?template=&profile=`), and a
POST form holds the rest. Preview is server/commands.compose_command (GraphQL's
composeCommand: reads only, tokens never in a template's context; viewers may preview);
Run is server/commands.run_command through actions.perform as `runCommand`, the GraphQL
mutation's role rule, unit of work (announced to the runners on commit) and audit entry.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request
from starlette.responses import Response

from server import commands as command_service
from server.commands import RunRequest
from server.errors import InvalidInput, UserError
from server.login import read_form
from server.models import (
    Command,
    CommandTemplate,
    Profile,
    ProfileProxy,
    ProfileService,
    Proxy,
    Service,
)
from server.panel.common import (
    Change,
    app_services,
    apply_change,
    reading,
    redirect_with_flash,
    refuse_viewer,
    render_view,
)
from server.panel.templates import PROFILE_CHOICES, chosen_id, preview_errors, typed_number

CHOICES = PROFILE_CHOICES  # templates, proxies and services offered in a select


@dataclass
class ComposeChoices:
    """What the composer's selects offer for the picked template and profile."""

    templates: list[CommandTemplate]
    profiles: list[Profile]
    template: CommandTemplate | None
    profile: Profile | None
    proxies: list[tuple[Proxy, bool]]
    services: list[Service]
    linked: set[int] = field(default_factory=set)


async def _choices(
    session: AsyncSession, template_id: int | None, profile_id: int | None
) -> ComposeChoices:
    templates = await session.scalars(
        select(CommandTemplate).order_by(CommandTemplate.name_key).limit(CHOICES)
    )
    profiles = await session.scalars(select(Profile).order_by(Profile.name_key).limit(CHOICES))
    template = None if template_id is None else await session.get(CommandTemplate, template_id)
    profile = None if profile_id is None else await session.get(Profile, profile_id)
    proxies_stmt = select(Proxy, ProfileProxy.is_default)
    if profile is not None:  # the domain takes only a proxy attached to the profile
        proxies_stmt = proxies_stmt.join(ProfileProxy, ProfileProxy.proxy_id == Proxy.id).where(
            ProfileProxy.profile_id == profile.id
        )
    else:
        proxies_stmt = select(Proxy, Proxy.id.is_(None))
    proxies = await session.execute(proxies_stmt.order_by(Proxy.name_key).limit(CHOICES))
    services = await session.scalars(select(Service).order_by(Service.name_key).limit(CHOICES))
    linked: set[int] = set()
    if profile is not None:
        linked = set(
            await session.scalars(
                select(ProfileService.service_id).where(ProfileService.profile_id == profile.id)
            )
        )
    return ComposeChoices(
        templates=list(templates),
        profiles=list(profiles),
        template=template,
        profile=profile,
        proxies=[(proxy, bool(is_default)) for proxy, is_default in proxies],
        services=list(services),
        linked=linked,
    )


def _param_value(kind: str, fields: dict[str, str], name: str) -> Any:
    raw = fields.get(f"param.{name}")
    if kind == "bool":
        return raw == "on"
    if raw is None or not raw.strip():
        return None  # the default, or "required"
    if kind == "int":
        return typed_number(raw.strip(), int)
    return raw


def run_request(fields: dict[str, str], template: CommandTemplate | None) -> RunRequest:
    """The composer's form as the domain takes a run (it validates every value)."""
    params: dict[str, Any] = {}
    if template is not None:
        for parameter in template.parameters:
            params[parameter["name"]] = _param_value(parameter["type"], fields, parameter["name"])
    limits: dict[str, Any] = {}
    for name in ("timeoutSeconds", "maxAttempts", "priority"):
        raw = fields.get(name, "").strip()
        limits[name] = typed_number(raw, int) if raw else None
    return RunRequest(
        template_id=None if template is None else template.id,
        command_string=None if template is not None else fields.get("commandString", ""),
        profile_id=chosen_id(fields.get("profile", "")),
        proxy_id=chosen_id(fields.get("proxy", "")),
        service_ids=[
            service_id
            for key in fields
            if key.startswith("service.") and (service_id := chosen_id(key[8:])) is not None
        ],
        params=params,
        timeout_seconds=limits["timeoutSeconds"],
        max_attempts=limits["maxAttempts"],
        priority=limits["priority"] or 0,
    )


def audited_fields(run: RunRequest) -> list[str]:
    """The names of the runCommand input's given fields, as GraphQL's audit records them."""
    given = {
        "templateId": run.template_id,
        "commandString": run.command_string,
        "profileId": run.profile_id,
        "proxyId": run.proxy_id,
        "serviceIds": run.service_ids,
        "params": run.params or None,
        "timeoutSeconds": run.timeout_seconds,
        "maxAttempts": run.max_attempts,
        "priority": run.priority or None,
    }
    return sorted(name for name, value in given.items() if value is not None)


def compose_errors(errors: list[UserError]) -> dict[str, list[str]]:
    """User errors keyed by the composer's inputs: `param.NAME`, `serviceIds`, ..."""
    found: dict[str, list[str]] = {}
    for error in errors:
        head = error.field[0] if error.field else ""
        key = f"param.{error.field[1]}" if head == "params" and len(error.field) > 1 else head
        found.setdefault(key, []).append(error.message)
    return found


def default_form(choices: ComposeChoices) -> dict[str, str]:
    """A fresh composer: the template's defaults, the profile's linked services."""
    form: dict[str, str] = {}
    if choices.template is not None:
        for parameter in choices.template.parameters:
            default = parameter.get("default")
            if parameter["type"] == "bool":
                form[f"param.{parameter['name']}"] = "on" if default else ""
            elif default is not None:
                form[f"param.{parameter['name']}"] = str(default)
    for service_id in choices.linked:
        form[f"service.{service_id}"] = "on"
    return form


async def _show(
    request: Request,
    fields: dict[str, str] | None,
    *,
    template_id: int | None,
    profile_id: int | None,
    partial: str = "_compose_form.html",
    errors: dict[str, list[str]] | None = None,
    preview: dict[str, Any] | None = None,
    status_code: int = 200,
) -> Response:
    async with reading(request) as session:
        choices = await _choices(session, template_id, profile_id)
    form = default_form(choices) if fields is None else fields
    return render_view(
        request,
        "compose.html",
        partial,
        status_code=status_code,
        choices=choices,
        form=form,
        errors=errors or {},
        preview=preview,
    )


async def compose_page(request: Request) -> Response:
    """The composer; `?template=ID&profile=ID` picks (the htmx swap of the second form)."""
    query = request.query_params
    return await _show(
        request,
        None,
        template_id=chosen_id(query.get("template", "")),
        profile_id=chosen_id(query.get("profile", "")),
    )


async def _run_of(request: Request, fields: dict[str, str]) -> RunRequest:
    """The form's run; a template deleted meanwhile is left for the domain to report."""
    template_id = chosen_id(fields.get("template", ""))
    template = None
    if template_id is not None:
        async with reading(request) as session:
            template = await session.get(CommandTemplate, template_id)
    run = run_request(fields, template)
    if template is None and template_id is not None:
        run.template_id, run.command_string = template_id, None
    return run


async def compose_preview(request: Request) -> Response:
    """The argv the form would run (a read: viewers may preview)."""
    fields = await read_form(request)
    services = app_services(request)
    run = await _run_of(request, fields)
    try:
        async with reading(request) as session:
            composed = await command_service.compose_command(
                session, services.settings, services.secret_box, services.render_pool, run
            )
    except InvalidInput as exc:
        preview: dict[str, Any] = {
            "argv": None,
            "env": [],
            "errors": preview_errors(exc.errors),
            "samples": {},
        }
    else:
        preview = {
            "argv": composed.argv,
            "env": composed.env_names,
            "errors": [],
            "samples": {},
            "routing": composed.routing_table,
        }
    return await _show(
        request,
        fields,
        template_id=run.template_id,
        profile_id=run.profile_id,
        partial="_preview.html",
        preview=preview,
    )


async def compose_run(request: Request) -> Response:
    """Queue the composed command (runCommand) and land on its run page."""
    fields = await read_form(request)
    run = await _run_of(request, fields)
    change = Change("runCommand", audited_fields(run), object_type="Command")
    refused = await refuse_viewer(request, change)
    if refused is not None:
        return refused
    services = app_services(request)

    async def work(session: AsyncSession) -> Command:
        return await command_service.run_command(
            session, services.settings, services.secret_box, services.render_pool, run
        )

    try:
        command: Command = await apply_change(request, change, work)
    except InvalidInput as exc:
        return await _show(
            request,
            fields,
            template_id=run.template_id,
            profile_id=run.profile_id,
            errors=compose_errors(exc.errors),
            status_code=422,
        )
    return redirect_with_flash(request, f"/runs/{command.id}", f"Run #{command.id} queued.")
