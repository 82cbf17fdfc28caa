"""Command composition: a Jinja2 template becomes an argv list, never a shell string.

Templates render in a sandbox with StrictUndefined; every `{{ ... }}` value is
shell-quoted on output, and the result is split with `shlex.split`, so a value
like `x; rm -rf ~` arrives as one literal argument of a process run without a shell.
Tokens are never in the context: they reach the child through its environment only.

The sandbox also refuses operations that would allocate without bound (`'a' * 10**9`,
`2 ** 10**9`) before they run, and stops the output at MAX_RENDERED characters while it
is generated. What no check can foresee (a loop that never ends, a filter that allocates)
is bounded by the worker process the server renders in (runner/renderpool.py).
"""

from __future__ import annotations

import functools
import shlex
from collections.abc import Mapping
from typing import Any

from jinja2 import Template, TemplateError, TemplateSyntaxError, UndefinedError
from jinja2.exceptions import SecurityError

from runner.template_checks import quoted_placeholder_problem
from runner.template_env import ENVIRONMENT, MAX_RENDERED, TOO_LONG, CompositionError


@functools.lru_cache(maxsize=256)
def _compiled(source: str) -> Template:
    """Templates compile once (a run re-renders its template at every attempt)."""
    problem = quoted_placeholder_problem(source)
    if problem is not None:
        raise CompositionError(problem)
    return ENVIRONMENT.from_string(source)


def _generate(template: Template, context: Mapping[str, Any]) -> str:
    """Render, stopping as soon as the output passes MAX_RENDERED (before it is built)."""
    parts: list[str] = []
    size = 0
    for part in template.generate(**context):
        size += len(part)
        if size > MAX_RENDERED:
            raise CompositionError(TOO_LONG)
        parts.append(part)
    return "".join(parts)


def render_argv(source: str, context: Mapping[str, Any]) -> list[str]:
    """Render `source` with `context` and split it into an argv list (raises CompositionError).

    This runs the template in the calling process: the server calls it through a
    RenderPool (runner/renderpool.py), which bounds its time and memory.
    """
    try:
        rendered = _generate(_compiled(source), context)
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
    return _split(rendered)


# What starts Jinja syntax in a template; a source with none of it renders as itself.
_SYNTAX_OPENERS = tuple(
    opener
    for opener in (
        ENVIRONMENT.block_start_string,
        ENVIRONMENT.variable_start_string,
        ENVIRONMENT.comment_start_string,
        ENVIRONMENT.line_statement_prefix,
        ENVIRONMENT.line_comment_prefix,
    )
    if opener
)


def literal_argv(source: str) -> list[str] | None:
    """The argv of a template without any Jinja syntax, exactly as `render_argv` would
    make it (CompositionError included), or None when it has some and must render.

    Such a template runs no code: its render is the text itself (one trailing newline
    dropped, as Jinja does), so it needs no worker process and its limits. Sources with a
    carriage return are left to Jinja, which rewrites line endings.
    """
    if "\r" in source or any(opener in source for opener in _SYNTAX_OPENERS):
        return None
    rendered = source[:-1] if source.endswith("\n") else source
    if len(rendered) > MAX_RENDERED:
        raise CompositionError(TOO_LONG)
    return _split(rendered)


def _split(rendered: str) -> list[str]:
    """A rendered command line as an argv (raises CompositionError)."""
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
