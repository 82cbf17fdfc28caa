"""Command templates: a Jinja2 command line with declared, typed parameters."""

from __future__ import annotations

import re
from typing import Any

from sqlalchemy import delete
from sqlalchemy.ext.asyncio import AsyncSession

from runner.template_checks import template_problem, template_save_problems
from server.errors import ErrorCode, InvalidInput, UserError
from server.models import BACKOFF_SECONDS_DEFAULT, NAME_MAX, CommandTemplate
from server.profiles import is_known_timezone
from server.validation import (
    TEXT_MAX,
    FieldInvalid,
    FieldSpec,
    apply_fields,
    clean_text,
    ensure_unique,
    env_var_field,
    float_field,
    int_field,
    text_field,
)

TEMPLATE_MAX = 100_000
PARAMETERS_MAX = 100
PARAMETER_TYPES = ("string", "int", "bool", "choice")
IDENTIFIER_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]{0,63}$")
MAX_TIMEOUT_SECONDS = 7 * 24 * 3600


def _template_source(value: Any) -> str:
    source = clean_text(value, TEMPLATE_MAX, "template")
    problem = template_problem(source)
    if problem is not None:
        raise FieldInvalid(problem)
    return source


def _default_fits(kind: str, default: Any, choices: list[str]) -> bool:
    if kind == "string":
        return isinstance(default, str)
    if kind == "int":
        return isinstance(default, int) and not isinstance(default, bool)
    if kind == "bool":
        return isinstance(default, bool)
    return default in choices


def _parameter(index: int, raw: Any) -> dict[str, Any]:
    where = f"parameter {index + 1}"
    if not isinstance(raw, dict):
        raise FieldInvalid(f"{where} must be an object")
    name = raw.get("name")
    if not isinstance(name, str) or not IDENTIFIER_RE.match(name):
        raise FieldInvalid(f"{where}: name must be an identifier (letters, digits, _)")
    kind = raw.get("type", "string")
    if kind not in PARAMETER_TYPES:
        raise FieldInvalid(f"{name}: type must be one of {', '.join(PARAMETER_TYPES)}")
    choices = raw.get("choices") or []
    if kind == "choice" and (
        not isinstance(choices, list) or not choices or not all(isinstance(c, str) for c in choices)
    ):
        raise FieldInvalid(f"{name}: a choice parameter needs a list of string choices")
    default = raw.get("default")
    if default is not None and not _default_fits(kind, default, choices):
        raise FieldInvalid(f"{name}: default {default!r} is not a valid {kind}")
    description = raw.get("description")
    if description is not None and not isinstance(description, str):
        raise FieldInvalid(f"{name}: description must be a string")
    return {
        "name": name,
        "type": kind,
        "default": default,
        "required": bool(raw.get("required", default is None)),
        "choices": choices if kind == "choice" else [],
        "description": description,
    }


def _parameters(value: Any) -> list[dict[str, Any]]:
    if not isinstance(value, list):
        raise FieldInvalid("parameters must be a list")
    if len(value) > PARAMETERS_MAX:
        raise FieldInvalid(f"at most {PARAMETERS_MAX} parameters", ErrorCode.TOO_LONG)
    parsed = [_parameter(index, raw) for index, raw in enumerate(value)]
    names = [p["name"] for p in parsed]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        raise FieldInvalid(f"parameter names repeat: {', '.join(duplicates)}")
    return parsed


def _env(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        raise FieldInvalid("env must be an object of NAME: value")
    env: dict[str, str] = {}
    for key, item in value.items():
        try:
            name = env_var_field(key)
        except FieldInvalid as problem:
            raise FieldInvalid(f"env: {problem.message}") from problem
        if not isinstance(item, str) or len(item) > 4096:
            raise FieldInvalid(f"env {name}: value must be a string of at most 4096 characters")
        if name == "TZ":
            _check_tz(item)
        env[name] = item
    return env


def _check_tz(value: str) -> None:
    """Chromium silently ignores a TZ it does not know and runs in the host's zone (issue 12):
    refuse it here, where the value is known. A leading ':' is the C library's own syntax."""
    if not is_known_timezone(value.removeprefix(":")):
        raise FieldInvalid(
            f"env TZ: {value!r} is not a known time zone; Chromium ignores it "
            "(use an IANA name such as Europe/Berlin, or UTC)"
        )


def check_template_uses(template: CommandTemplate) -> None:
    """Refuse what the template and its parameters get wrong together, known without values
    (issue 12, item 6): an undeclared `params.x`, an unknown filter, an unsplittable line."""
    names = [parameter["name"] for parameter in template.parameters or []]
    problems = template_save_problems(template.template, names)
    if problems:
        raise InvalidInput([UserError(("template",), p, ErrorCode.INVALID) for p in problems])


TEMPLATE_FIELDS = [
    FieldSpec("name", "name", text_field(NAME_MAX, label="name"), required=True),
    FieldSpec("template", "template", _template_source, required=True),
    FieldSpec(
        "description", "description", text_field(TEXT_MAX, blank_ok=True, label="description")
    ),
    FieldSpec("parameters", "parameters", _parameters),
    FieldSpec(
        "timeoutSeconds",
        "timeout_seconds",
        int_field(1, MAX_TIMEOUT_SECONDS, label="timeoutSeconds"),
    ),
    FieldSpec("maxAttempts", "max_attempts", int_field(1, 100, label="maxAttempts")),
    FieldSpec("backoffSeconds", "backoff_seconds", float_field(0, 86_400, label="backoffSeconds")),
    FieldSpec("env", "env", _env),
]


# What a preview of an unsaved template checks: everything but its name and description.
DRAFT_FIELDS = [spec for spec in TEMPLATE_FIELDS if spec.api_name not in ("name", "description")]
SAMPLE_VALUES: dict[str, Any] = {"int": 0, "bool": False}


def _blank_template() -> CommandTemplate:
    """A template with every default (one attempt, the shared backoff), nothing else set."""
    return CommandTemplate(
        parameters=[], env={}, max_attempts=1, backoff_seconds=BACKOFF_SECONDS_DEFAULT
    )


def draft_template(values: dict[str, Any]) -> CommandTemplate:
    """An unsaved template from `values`, checked as create_template checks them (its name
    aside): what the panel's editor previews while the admin types. Never added to a session."""
    template = _blank_template()
    drafted = {key: value for key, value in values.items() if key not in ("name", "description")}
    apply_fields(template, drafted, DRAFT_FIELDS, creating=True)
    check_template_uses(template)
    return template


def sample_params(parameters: list[dict[str, Any]]) -> dict[str, Any]:
    """A stand-in value for each required parameter without a default (a preview has none
    typed): 0, false, the first choice, or `<name>` for a string."""
    samples: dict[str, Any] = {}
    for parameter in parameters:
        if parameter.get("default") is None and parameter.get("required"):
            kind = parameter["type"]
            choices = parameter.get("choices") or []
            samples[parameter["name"]] = (
                choices[0]
                if kind == "choice"
                else SAMPLE_VALUES.get(kind, f"<{parameter['name']}>")
            )
    return samples


async def get_template(
    session: AsyncSession, template_id: int, *, field: str = "id"
) -> CommandTemplate:
    """The template with this id, or a NOT_FOUND error on `field`."""
    template = await session.get(CommandTemplate, template_id)
    if template is None:
        raise InvalidInput.one(field, "no such command template", ErrorCode.NOT_FOUND)
    return template


async def create_template(session: AsyncSession, values: dict[str, Any]) -> CommandTemplate:
    """Validate (including Jinja2 syntax) and add a command template."""
    template = _blank_template()
    apply_fields(template, values, TEMPLATE_FIELDS, creating=True)
    check_template_uses(template)
    await ensure_unique(
        session, CommandTemplate.name_key, template.name, field="name", label="command template"
    )
    session.add(template)
    await session.flush()
    return template


async def update_template(
    session: AsyncSession, template_id: int, values: dict[str, Any]
) -> CommandTemplate:
    """Apply changes to a command template."""
    template = await get_template(session, template_id)
    apply_fields(template, values, TEMPLATE_FIELDS, creating=False)
    if "template" in values or "parameters" in values:
        check_template_uses(template)
    if "name" in values:
        await ensure_unique(
            session,
            CommandTemplate.name_key,
            template.name,
            field="name",
            label="command template",
            exclude_id=template.id,
        )
    await session.flush()
    return template


async def delete_template(session: AsyncSession, template_id: int) -> list[str]:
    """Delete a template; commands made from it keep their argv and history."""
    template = await get_template(session, template_id)
    await session.execute(delete(CommandTemplate).where(CommandTemplate.id == template.id))
    return [f"command template {template.name!r} deleted; commands made from it are kept"]
