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
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from typing import Any

from jinja2 import (
    StrictUndefined,
    Template,
    TemplateError,
    TemplateSyntaxError,
    UndefinedError,
    nodes,
)
from jinja2.exceptions import SecurityError
from jinja2.sandbox import SandboxedEnvironment

# The rendered command line, in characters. Linux passes at most 128 KiB in one argument
# and about 2 MiB of argv + environment in all; a longer line is a mistake, not a command.
MAX_RENDERED = 256 * 1024
# Longest string or list an operator may build: nothing longer can be rendered anyway.
MAX_SEQUENCE = MAX_RENDERED
# Largest integer (in bits) `*` and `**` may build: 20,000 decimal digits, far more than a
# command line has use for, and Python refuses to print ints over 4,300 digits in any case.
MAX_INT_BITS = 64 * 1024
SAFE_FORM = "sh -c 'echo \"$1\"' _ {{ params.x }}"
TOO_LONG = f"the rendered command is longer than {MAX_RENDERED:,} characters"
PLACEHOLDER_SHOWN = 60


class CompositionError(Exception):
    """The template cannot become a command; the message says why (shown to the user)."""


def _size(value: Any) -> int | None:
    """The length of a string or list an operator would repeat or join (None: not one)."""
    if isinstance(value, str | bytes | list | tuple):
        return len(value)
    return None


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_multiply(left: Any, right: Any) -> None:
    for sequence, times in ((left, right), (right, left)):
        size = _size(sequence)
        if size is not None and isinstance(times, int) and size * times > MAX_SEQUENCE:
            raise SecurityError(
                f"the * operator would build {size * times:,} items; the limit is {MAX_SEQUENCE:,}"
            )
    if _is_int(left) and _is_int(right) and left.bit_length() + right.bit_length() > MAX_INT_BITS:
        raise SecurityError(f"the * operator would build an integer over {MAX_INT_BITS:,} bits")


def _check_add(left: Any, right: Any) -> None:
    left_size, right_size = _size(left), _size(right)
    if left_size is not None and right_size is not None and left_size + right_size > MAX_SEQUENCE:
        raise SecurityError(
            f"the + operator would build {left_size + right_size:,} items; "
            f"the limit is {MAX_SEQUENCE:,}"
        )


def _check_power(left: Any, right: Any) -> None:
    if not (_is_int(left) and _is_int(right)) or right <= 0 or abs(left) <= 1:
        return
    if abs(left).bit_length() * right > MAX_INT_BITS:
        raise SecurityError(f"the ** operator would build an integer over {MAX_INT_BITS:,} bits")


_OPERATOR_CHECKS = {"*": _check_multiply, "+": _check_add, "**": _check_power}


class _CommandEnvironment(SandboxedEnvironment):
    """The sandbox, with the operators that can allocate without bound checked first."""

    intercepted_binops = frozenset(_OPERATOR_CHECKS)

    def call_binop(self, context: Any, operator_name: str, left: Any, right: Any) -> Any:
        _OPERATOR_CHECKS[operator_name](left, right)
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
    problem = quoted_placeholder_problem(source)
    if problem is not None:
        raise CompositionError(problem)
    return _ENVIRONMENT.from_string(source)


def template_syntax_error(source: str) -> str | None:
    """A readable description of the template's syntax error, or None when it parses."""
    try:
        _ENVIRONMENT.parse(source)
    except TemplateSyntaxError as exc:
        return f"line {exc.lineno}: {exc.message}"
    return None


def template_problem(source: str) -> str | None:
    """Why the template cannot be saved (a syntax error, a quoted placeholder), or None."""
    problem = template_syntax_error(source)
    if problem is not None:
        return f"template does not parse: {problem}"
    return quoted_placeholder_problem(source)


# --- what a saved template must get right, known without values (issue 12, item 6) ------


def template_save_problems(source: str, parameter_names: Collection[str]) -> list[str]:
    """What is wrong with a template whatever values it gets: a `params.x` that is not
    declared, an unknown filter or test, a line that cannot be split into arguments.
    The template is not rendered (the server renders nothing itself: runner/renderpool.py);
    every value Corral renders is shell-quoted, so whether a line splits is decided by the
    template's literal text, whatever placeholder values of the declared types it gets."""
    try:
        tree = _ENVIRONMENT.parse(source)
    except TemplateSyntaxError:
        return []  # template_problem says why
    problems = [
        f"line {node.lineno}: params.{name} is not a declared parameter "
        f"(declared: {', '.join(sorted(parameter_names)) or 'none'})"
        for name, node in _params_used(tree)
        if name not in parameter_names
    ]
    for kind, known, node_type in (
        ("filter", _ENVIRONMENT.filters, nodes.Filter),
        ("test", _ENVIRONMENT.tests, nodes.Test),
    ):
        for node in tree.find_all(node_type):
            if node.name not in known:
                problems.append(f"line {node.lineno}: no {kind} named {node.name!r}")
    unsplittable = unclosed_quote_problem(source)
    return problems + ([unsplittable] if unsplittable else [])


def _params_used(tree: nodes.Template) -> list[tuple[str, nodes.Node]]:
    """The parameter names the template reads as `params.x` or `params['x']` (a method
    call such as `params.get(...)` aside), in source order, each once."""
    called = {id(call.node) for call in tree.find_all(nodes.Call)}
    seen: dict[str, nodes.Node] = {}
    for node in tree.find_all((nodes.Getattr, nodes.Getitem)):
        name = _params_key(node)
        if name is not None and id(node) not in called:
            seen.setdefault(name, node)
    return sorted(seen.items(), key=lambda item: item[1].lineno)


def _params_key(node: nodes.Node) -> str | None:
    """`x` of `params.x` or `params['x']`, else None."""
    if not isinstance(node, nodes.Getattr | nodes.Getitem):
        return None
    target = node.node
    if not (isinstance(target, nodes.Name) and target.name == "params"):
        return None
    if isinstance(node, nodes.Getattr):
        return str(node.attr)
    key = node.arg
    return key.value if isinstance(key, nodes.Const) and isinstance(key.value, str) else None


def unclosed_quote_problem(source: str) -> str | None:
    """Why the template's literal text leaves a quote open (or a final backslash), so that
    no rendering of it splits into arguments; None when it closes every quote."""
    try:
        tokens = list(_ENVIRONMENT.lex(source))
    except TemplateSyntaxError:
        return None
    state = _QuoteState()
    opened_on = 0
    for lineno, kind, value in tokens:
        if kind == "data":
            before = state.quote
            state.read(value)
            if state.quote and state.quote != before:
                opened_on = lineno
    if state.quote:
        return (
            f"line {opened_on}: a {state.quote} quote is never closed, so the command line "
            "cannot be split into arguments"
        )
    if state.escaped:
        return "the template ends with a backslash, so the command line cannot be split"
    return None


# --- placeholders inside the template's own quotes ----------------------------------------
#
# `sh -c 'echo {{ x }}'` renders as `sh -c 'echo '$(id)''`: the author's quotes cancel the
# quotes Corral put around the value, and the shell runs it (issue 10, item 8). So no
# `{{ ... }}` may sit inside quotes of the template text, nor right after a backslash.
# The literal text between Jinja tags is read the way `shlex.split` will read it; the
# text is followed in source order (a quote opened in one branch of an `{% if %}` and
# closed in another is not tracked through both).


@dataclass
class _QuoteState:
    """Where `shlex.split` stands after some literal text: inside which quote, if any."""

    quote: str | None = None
    escaped: bool = False  # a backslash outside quotes: the next character is literal

    def read(self, text: str) -> None:
        index = 0
        while index < len(text):
            char = text[index]
            index += 1
            if self.escaped:
                self.escaped = False
            elif self.quote == "'":
                self.quote = None if char == "'" else self.quote
            elif self.quote == '"':
                if char == "\\":
                    index += 1  # \" and \\ are escapes; nothing else matters inside "..."
                elif char == '"':
                    self.quote = None
            elif char == "\\":
                self.escaped = True
            elif char in "'\"":
                self.quote = char


def _placeholder_text(tokens: list[str]) -> str:
    text = "".join(tokens).strip()
    text = text[: PLACEHOLDER_SHOWN - 3] + "..." if len(text) > PLACEHOLDER_SHOWN else text
    return "{{ " + text + " }}"


def quoted_placeholder_problem(source: str) -> str | None:
    """Why a `{{ ... }}` of `source` would escape Corral's quoting, or None when none does."""
    try:
        tokens = list(_ENVIRONMENT.lex(source))
    except TemplateSyntaxError:
        return None  # the syntax check says why
    state = _QuoteState()
    for index, (lineno, kind, value) in enumerate(tokens):
        if kind == "data":
            state.read(value)
        elif kind == "variable_begin" and (state.quote or state.escaped):
            inner = []
            for _, inner_kind, inner_value in tokens[index + 1 :]:
                if inner_kind == "variable_end":
                    break
                inner.append(inner_value)
            return _quoted_message(lineno, _placeholder_text(inner), state)
    return None


def _quoted_message(lineno: int, placeholder: str, state: _QuoteState) -> str:
    where = (
        "right after a backslash"
        if state.escaped
        else f"inside {state.quote}...{state.quote} quotes"
    )
    return (
        f"line {lineno}: the placeholder {placeholder} sits {where} of the template; "
        "Corral quotes every value itself, and the template's own quoting undoes that "
        "(a value like $(id) would run). Put the placeholder outside any quotes and let the "
        f"script take it as an argument, e.g. {SAFE_FORM.replace('{{ params.x }}', placeholder)}"
    )


# --- rendering -------------------------------------------------------------------------


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
        _ENVIRONMENT.block_start_string,
        _ENVIRONMENT.variable_start_string,
        _ENVIRONMENT.comment_start_string,
        _ENVIRONMENT.line_statement_prefix,
        _ENVIRONMENT.line_comment_prefix,
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
