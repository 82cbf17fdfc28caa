"""The sandboxed Jinja2 environment every command template renders in.

Every `{{ ... }}` value is shell-quoted on output (the rendered line is split with
`shlex.split` and run without a shell: runner/compose.py), undefined names are errors, and
operations that would allocate without bound (`'a' * 10**9`, `2 ** 10**9`) are refused
before they run.
"""

from __future__ import annotations

import shlex
from typing import Any

from jinja2 import StrictUndefined
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
TOO_LONG = f"the rendered command is longer than {MAX_RENDERED:,} characters"


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


ENVIRONMENT = make_environment()
