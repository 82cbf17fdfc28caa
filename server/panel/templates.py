"""Command templates: list, editor with a live preview of the composed argv, delete.

The editor's parameter declarations are rows of inputs (`p0.name`, `p0.type`, `p0.default`,
`p0.choices`, `p0.required`, `p0.description`; a blank row is ignored, two blank rows follow
the declared ones), its environment one `NAME=value` per line. The preview composes the
unsaved form through server/commands.compose_draft, the code GraphQL's composeCommand runs:
it reads only, and tokens never reach a template's context (only env var names are shown).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.requests import Request
from starlette.responses import Response

from server import commands as command_service
from server import templates as template_service
from server.access import principal_of
from server.commands import Composition, RunRequest
from server.errors import InvalidInput, UserError
from server.login import read_form
from server.models import Command, CommandTemplate, Profile
from server.panel.common import (
    PAGE_SIZE,
    Change,
    ObjectKind,
    app_services,
    apply_change,
    delete_object,
    error_page,
    errors_by_field,
    not_found,
    page_number,
    paged,
    reading,
    redirect_with_flash,
    refuse_viewer,
    render_view,
    show_object,
    update_object,
)

PARAMETER_ROW_FIELDS = ("name", "type", "default", "choices", "required", "description")
BLANK_ROWS = 2
PROFILE_CHOICES = 200  # profiles offered in a preview's select

TEMPLATE = ObjectKind("CommandTemplate", "template", "template_id", "/templates")


# --- form <-> domain values ------------------------------------------------------------


def typed_number(raw: str, kind: type[int] | type[float]) -> int | float | str:
    """The number typed, or the text as typed for the domain to refuse."""
    try:
        return kind(raw) if raw.isascii() and len(raw) < 20 else raw
    except ValueError:
        return raw


def _default(kind: str, raw: str) -> Any:
    if not raw.strip():
        return None
    if kind == "int":
        return typed_number(raw.strip(), int)
    if kind == "bool" and raw.strip().lower() in ("true", "false"):
        return raw.strip().lower() == "true"
    return raw


def parameter_rows(fields: dict[str, str]) -> list[dict[str, str]]:
    """The typed parameter rows (blank ones dropped), in order."""
    indices = sorted(
        {int(key[1:].split(".")[0]) for key in fields if _is_row_key(key)},
    )
    rows = []
    for index in indices:
        row = {name: fields.get(f"p{index}.{name}", "") for name in PARAMETER_ROW_FIELDS}
        if any(row[name].strip() for name in ("name", "default", "choices", "description")):
            rows.append(row)
    return rows


def _is_row_key(key: str) -> bool:
    head, _, name = key.partition(".")
    return head[:1] == "p" and head[1:].isdigit() and len(head) < 6 and name in PARAMETER_ROW_FIELDS


def _declaration(row: dict[str, str]) -> dict[str, Any]:
    kind = row["type"] or "string"
    return {
        "name": row["name"].strip(),
        "type": kind,
        "default": _default(kind, row["default"]),
        "required": row["required"] == "on",
        "choices": [choice.strip() for choice in row["choices"].split(",") if choice.strip()],
        "description": row["description"].strip() or None,
    }


def _env(raw: str) -> dict[str, str]:
    env: dict[str, str] = {}
    for line in raw.splitlines():
        if line.strip():
            name, _, value = line.partition("=")
            env[name.strip()] = value
    return env


def template_values(fields: dict[str, str]) -> dict[str, Any]:
    """The editor's form as create_template/update_template take it (they validate)."""
    values: dict[str, Any] = {
        "name": fields.get("name", ""),
        "description": fields.get("description", "").strip() or None,
        "template": fields.get("template", ""),
        "parameters": [_declaration(row) for row in parameter_rows(fields)],
        "env": _env(fields.get("env", "")),
    }
    timeout = fields.get("timeoutSeconds", "").strip()
    values["timeoutSeconds"] = typed_number(timeout, int) if timeout else None
    for name, kind in (("maxAttempts", int), ("backoffSeconds", float)):
        raw = fields.get(name, "").strip()
        if raw:
            values[name] = typed_number(raw, kind)
    return values


def template_form(template: CommandTemplate | None) -> dict[str, str]:
    """A template's values as the editor shows them (empty for a new one)."""
    if template is None:
        return {"maxAttempts": "1", "backoffSeconds": "5"}
    form = {
        "name": template.name,
        "description": template.description or "",
        "template": template.template,
        "timeoutSeconds": "" if template.timeout_seconds is None else str(template.timeout_seconds),
        "maxAttempts": str(template.max_attempts),
        "backoffSeconds": f"{template.backoff_seconds:g}",
        "env": "\n".join(f"{name}={value}" for name, value in template.env.items()),
    }
    for index, parameter in enumerate(template.parameters):
        default = parameter.get("default")
        shown = "" if default is None else str(default)
        shown = shown.lower() if isinstance(default, bool) else shown
        form.update(
            {
                f"p{index}.name": parameter["name"],
                f"p{index}.type": parameter["type"],
                f"p{index}.default": shown,
                f"p{index}.choices": ", ".join(parameter.get("choices") or []),
                f"p{index}.required": "on" if parameter.get("required") else "",
                f"p{index}.description": parameter.get("description") or "",
            }
        )
    return form


def editor_rows(form: dict[str, str]) -> list[dict[str, str]]:
    """The parameter rows the editor shows: the typed ones, then BLANK_ROWS empty ones."""
    rows = parameter_rows(form)
    return rows + [{"type": "string"} for _ in range(BLANK_ROWS)]


# --- preview ---------------------------------------------------------------------------


async def _preview(
    request: Request, session: AsyncSession, fields: dict[str, str]
) -> dict[str, Any]:
    """The composed argv of the form's (unsaved) template, or the errors why not."""
    services = app_services(request)
    profile_id = chosen_id(fields.get("previewProfile", ""))
    values = template_values(fields)
    try:
        composed: Composition = await command_service.compose_draft(
            session,
            services.settings,
            services.secret_box,
            services.render_pool,
            values,
            RunRequest(profile_id=profile_id),
        )
    except InvalidInput as exc:
        return refused_preview(exc)
    samples = template_service.sample_params(
        composed.template.parameters if composed.template else []
    )
    return composed_preview(composed, samples)


def composed_preview(
    composed: Composition, samples: dict[str, Any] | None = None
) -> dict[str, Any]:
    """What the preview box (_preview.html) shows of a composition."""
    return {
        "argv": composed.argv,
        "env": composed.env_names,
        "errors": [],
        "samples": samples or {},
        "note": composed.note,
        "routing": composed.routing_table,
    }


def refused_preview(exc: InvalidInput) -> dict[str, Any]:
    """The preview box of a composition refused with user errors."""
    return {
        "argv": None,
        "env": [],
        "errors": preview_errors(exc.errors),
        "samples": {},
        "note": None,
    }


# Fields whose messages already say what they are about.
SELF_EXPLAINED = ("template", "templateId", "commandString", "params")


def preview_errors(errors: list[UserError]) -> list[str]:
    """The errors as the preview box lists them, each with its field unless obvious."""
    return [
        error.message
        if not error.field or error.field[0] in SELF_EXPLAINED
        else f"{'.'.join(error.field)}: {error.message}"
        for error in errors
    ]


def chosen_id(raw: str) -> int | None:
    raw = raw.strip()
    return int(raw) if raw.isascii() and raw.isdigit() and len(raw) < 12 else None


async def _profile_choices(session: AsyncSession) -> list[Profile]:
    rows = await session.scalars(select(Profile).order_by(Profile.name_key).limit(PROFILE_CHOICES))
    return list(rows)


async def template_preview(request: Request) -> Response:
    """The preview box for the editor's form as typed (htmx), or the editor with it filled.
    A read: viewers may preview too (nothing is written, nothing secret is shown)."""
    fields = await read_form(request)
    template_id = chosen_id(fields.get("templateId", ""))
    async with reading(request) as session:
        preview = await _preview(request, session, fields)
        template = None if template_id is None else await session.get(CommandTemplate, template_id)
        profiles = await _profile_choices(session)
    return render_view(
        request,
        "template.html",
        "_preview.html",
        command_template=template,
        form=fields,
        rows=editor_rows(fields),
        errors={},
        preview=preview,
        profiles=profiles,
        types=template_service.PARAMETER_TYPES,
    )


# --- list ------------------------------------------------------------------------------


async def template_list(request: Request) -> Response:
    stmt = select(CommandTemplate)
    async with reading(request) as session:
        paging = await paged(session, stmt, page_number(request))
        rows = list(
            await session.scalars(
                stmt.order_by(CommandTemplate.name_key, CommandTemplate.id)
                .offset(paging.offset)
                .limit(PAGE_SIZE)
            )
        )
        used = dict(
            (
                await session.execute(
                    select(Command.template_id, func.count())
                    .where(Command.template_id.in_([row.id for row in rows]))
                    .group_by(Command.template_id)
                )
            ).all()
        )
    return render_view(
        request,
        "templates.html",
        "_templates_table.html",
        templates=rows,
        used=used,
        paging=paging,
    )


# --- editor ----------------------------------------------------------------------------


async def _show_editor(
    request: Request,
    template: CommandTemplate | None,
    *,
    form: dict[str, str] | None = None,
    errors: dict[str, list[str]] | None = None,
    status_code: int = 200,
    page: str = "template.html",
) -> Response:
    shown = template_form(template) if form is None else form
    async with reading(request) as session:
        profiles = await _profile_choices(session)
        if "previewProfile" not in shown and profiles:
            shown = {**shown, "previewProfile": str(profiles[0].id)}
        preview = await _preview(request, session, shown) if shown.get("template") else None
        run_count = (
            0
            if template is None
            else await session.scalar(
                select(func.count()).where(Command.template_id == template.id)
            )
        )
    return render_view(
        request,
        page,
        "_template_form.html",
        status_code=status_code,
        command_template=template,
        form=shown,
        rows=editor_rows(shown),
        errors=errors or {},
        preview=preview,
        profiles=profiles,
        run_count=int(run_count or 0),
        types=template_service.PARAMETER_TYPES,
    )


async def template_new(request: Request) -> Response:
    principal = principal_of(request.scope)
    if principal is None or not principal.is_admin:
        return error_page(request, 403, "Not allowed", "Only an admin can create templates.")
    return await _show_editor(request, None)


async def _saved_template_page(request: Request, page: str) -> Response:
    return await show_object(request, TEMPLATE, _show_saved_editor, page=page)


async def template_page(request: Request) -> Response:
    """The editor (admins) or the template read-only (viewers), with its preview."""
    return await _saved_template_page(request, "template.html")


async def template_create(request: Request) -> Response:
    fields = await read_form(request)
    values = template_values(fields)
    change = Change("createCommandTemplate", sorted(values), object_type="CommandTemplate")
    refused = await refuse_viewer(request, change)
    if refused is not None:
        return refused
    try:
        template: CommandTemplate = await apply_change(
            request, change, lambda session: template_service.create_template(session, values)
        )
    except InvalidInput as exc:
        return await _show_editor(
            request, None, form=fields, errors=errors_by_field(exc.errors), status_code=422
        )
    return redirect_with_flash(
        request, f"/templates/{template.id}", f"Template {template.name} created."
    )


async def _show_saved_editor(request: Request, template_id: int, **options: Any) -> Response:
    async with reading(request) as session:
        current = await session.get(CommandTemplate, template_id)
    if current is None:
        return not_found(request, "template")
    return await _show_editor(request, current, **options)


async def template_update(request: Request) -> Response:
    return await update_object(
        request,
        TEMPLATE,
        template_values,
        template_service.update_template,
        _show_saved_editor,
        lambda _: "Template saved.",
    )


# --- delete ----------------------------------------------------------------------------


async def template_delete_page(request: Request) -> Response:
    """The confirmation: runs made from the template keep their argv and history."""
    return await _saved_template_page(request, "template_delete.html")


async def template_delete(request: Request) -> Response:
    # (one notice: joined as the others' are)
    return await delete_object(request, TEMPLATE, template_service.delete_template)
