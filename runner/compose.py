"""Command composition: a Jinja2 template becomes an argv list, never a shell string.

Templates render in a sandbox with StrictUndefined; every `{{ ... }}` value is
shell-quoted on output, and the result is split with `shlex.split`, so a value
like `x; rm -rf ~` arrives as one literal argument of a process run without a shell.
"""

from __future__ import annotations

import shlex
from typing import Any

from jinja2 import StrictUndefined, TemplateSyntaxError
from jinja2.sandbox import SandboxedEnvironment


def _quote(value: Any) -> str:
    if value is None:
        raise TypeError("None cannot be rendered into a command")
    if isinstance(value, bool):
        return "true" if value else "false"
    return shlex.quote(str(value))


def make_environment() -> SandboxedEnvironment:
    """The sandboxed Jinja2 environment every command template renders in."""
    return SandboxedEnvironment(
        undefined=StrictUndefined,
        finalize=_quote,
        autoescape=False,
        keep_trailing_newline=False,
    )


def template_syntax_error(source: str) -> str | None:
    """A readable description of the template's syntax error, or None when it parses."""
    try:
        make_environment().parse(source)
    except TemplateSyntaxError as exc:
        return f"line {exc.lineno}: {exc.message}"
    return None
