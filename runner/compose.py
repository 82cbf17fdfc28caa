"""Command composition: a Jinja2 template becomes an argv list, never a shell string.

Templates render in a sandbox with StrictUndefined; every `{{ ... }}` value is
shell-quoted on output, and the result is split with `shlex.split`, so a value
like `x; rm -rf ~` arrives as one literal argument of a process run without a shell.
Tokens are never in the context: they reach the child through its environment only.
"""

from __future__ import annotations

import functools
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from jinja2 import (
    StrictUndefined,
    Template,
    TemplateError,
    TemplateSyntaxError,
    UndefinedError,
)
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment

MAX_RENDERED = 256 * 1024
MAX_POWER_EXPONENT = 64


class CompositionError(Exception):
    """The template cannot become a command; the message says why (shown to the user)."""


class _CommandEnvironment(SandboxedEnvironment):
    intercepted_binops = frozenset({"**"})

    def call_binop(self, context: Any, operator_name: str, left: Any, right: Any) -> Any:
        if operator_name == "**" and (not isinstance(right, int) or right > MAX_POWER_EXPONENT):
            raise SecurityError("the ** operator is limited to small integer exponents")
        return super().call_binop(context, operator_name, left, right)


def _quote(value: Any) -> str:
    if value is None:
        raise CompositionError("a value rendered into the command is null")
    if isinstance(value, bool):
        return "true" if value else "false"
    return shlex.quote(str(value))


def make_environment() -> SandboxedEnvironment:
    """The sandboxed Jinja2 environment every command template renders in."""
    env = _CommandEnvironment(
        undefined=StrictUndefined,
        finalize=_quote,
        autoescape=False,
        keep_trailing_newline=False,
    )
    return env


_ENVIRONMENT = make_environment()


@functools.lru_cache(maxsize=256)
def _compiled(source: str) -> Template:
    """Templates compile once (a run re-renders its template at every attempt)."""
    return _ENVIRONMENT.from_string(source)


def template_syntax_error(source: str) -> str | None:
    """A readable description of the template's syntax error, or None when it parses."""
    try:
        _ENVIRONMENT.parse(source)
    except TemplateSyntaxError as exc:
        return f"line {exc.lineno}: {exc.message}"
    return None


def render_argv(source: str, context: Mapping[str, Any]) -> list[str]:
    """Render `source` with `context` and split it into an argv list (raises CompositionError)."""
    try:
        rendered = _compiled(source).render(**context)
    except TemplateSyntaxError as exc:
        raise CompositionError(
            f"template does not parse: line {exc.lineno}: {exc.message}"
        ) from exc
    except UndefinedError as exc:
        raise CompositionError(f"template uses an unknown variable: {exc.message}") from exc
    except SecurityError as exc:
        raise CompositionError(f"template was refused by the sandbox: {exc}") from exc
    except (TemplateError, ArithmeticError, TypeError, ValueError) as exc:
        raise CompositionError(f"template failed to render: {exc}") from exc
    if len(rendered) > MAX_RENDERED:
        raise CompositionError(f"the rendered command is longer than {MAX_RENDERED} characters")
    try:
        argv = shlex.split(rendered)
    except ValueError as exc:
        raise CompositionError(
            f"the rendered command does not split into arguments: {exc}"
        ) from exc
    if not argv:
        raise CompositionError("the rendered command is empty")
    if "\x00" in rendered:  # execve cannot pass it, PostgreSQL cannot store it
        raise CompositionError("the rendered command contains a NUL character")
    return argv


@dataclass(frozen=True)
class ParameterProblem:
    name: str
    message: str


@dataclass
class CheckedParams:
    values: dict[str, Any] = field(default_factory=dict)
    problems: list[ParameterProblem] = field(default_factory=list)


def _fits(kind: str, value: Any, choices: list[str]) -> str | None:
    if kind == "string":
        return None if isinstance(value, str) else "must be a string"
    if kind == "int":
        ok = isinstance(value, int) and not isinstance(value, bool)
        return None if ok else "must be an integer"
    if kind == "bool":
        return None if isinstance(value, bool) else "must be true or false"
    if value not in choices:
        return f"must be one of {', '.join(choices)}"
    return None


def check_params(declared: list[dict[str, Any]], given: Mapping[str, Any]) -> CheckedParams:
    """Validate `given` against a template's declared parameters, filling defaults."""
    result = CheckedParams()
    known = {param["name"]: param for param in declared}
    for name in given:
        if name not in known:
            result.problems.append(ParameterProblem(name, f"unknown parameter {name!r}"))
    for name, param in known.items():
        if name not in given or given[name] is None:
            if param.get("default") is not None:
                result.values[name] = param["default"]
            elif param.get("required"):
                result.problems.append(ParameterProblem(name, f"parameter {name!r} is required"))
            else:
                result.values[name] = None
            continue
        problem = _fits(param.get("type", "string"), given[name], param.get("choices") or [])
        if problem:
            result.problems.append(ParameterProblem(name, f"parameter {name!r} {problem}"))
        else:
            result.values[name] = given[name]
    return result
