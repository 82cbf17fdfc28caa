"""What a template must get right before it is saved or run, known without rendering it:
it parses, its `params.x` are declared, its filters and tests exist, its literal text closes
every quote, and no placeholder sits inside the template's own quotes.
"""

from __future__ import annotations

from collections.abc import Collection
from dataclasses import dataclass

from jinja2 import TemplateSyntaxError, nodes

from runner.template_env import ENVIRONMENT

SAFE_FORM = "sh -c 'echo \"$1\"' _ {{ params.x }}"
PLACEHOLDER_SHOWN = 60


def template_syntax_error(source: str) -> str | None:
    """A readable description of the template's syntax error, or None when it parses."""
    try:
        ENVIRONMENT.parse(source)
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
        tree = ENVIRONMENT.parse(source)
    except TemplateSyntaxError:
        return []  # template_problem says why
    problems = [
        f"line {node.lineno}: params.{name} is not a declared parameter "
        f"(declared: {', '.join(sorted(parameter_names)) or 'none'})"
        for name, node in _params_used(tree)
        if name not in parameter_names
    ]
    for kind, known, node_type in (
        ("filter", ENVIRONMENT.filters, nodes.Filter),
        ("test", ENVIRONMENT.tests, nodes.Test),
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
        tokens = list(ENVIRONMENT.lex(source))
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
        tokens = list(ENVIRONMENT.lex(source))
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
