"""Field checks shared by the domain services; each returns the cleaned value or raises."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from sqlalchemy import func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import InstrumentedAttribute

from server.errors import ErrorCode, InvalidInput, UserError
from server.models import name_key

TEXT_MAX = 20_000
TAGS_MAX = 50
JSON_MAX_BYTES = 64_000


class FieldInvalid(Exception):
    def __init__(self, message: str, code: ErrorCode = ErrorCode.INVALID) -> None:
        super().__init__(message)
        self.message = message
        self.code = code


Check = Callable[[Any], Any]


@dataclass(frozen=True)
class FieldSpec:
    """How one input field maps to a column: API name, column name and its check."""

    api_name: str
    column: str
    check: Check
    required: bool = False


def apply_fields(
    target: object, values: Mapping[str, Any], specs: list[FieldSpec], *, creating: bool
) -> None:
    """Check every given value and set it on `target`; collect all problems, then raise once."""
    errors: list[UserError] = []
    for spec in specs:
        if spec.api_name not in values:
            if creating and spec.required:
                errors.append(
                    UserError((spec.api_name,), f"{spec.api_name} is required", ErrorCode.REQUIRED)
                )
            continue
        raw = values[spec.api_name]
        if raw is None and (spec.required or not _nullable(target, spec.column)):
            errors.append(
                UserError((spec.api_name,), f"{spec.api_name} cannot be null", ErrorCode.REQUIRED)
            )
            continue
        try:
            value = None if raw is None else spec.check(raw)
        except FieldInvalid as problem:
            errors.append(UserError((spec.api_name,), problem.message, problem.code))
            continue
        except InvalidInput as problems:  # a structured value: each problem has its own path
            errors.extend(problems.errors)
            continue
        setattr(target, spec.column, value)
    if errors:
        raise InvalidInput(errors)


def _nullable(target: object, column: str) -> bool:
    table = getattr(type(target), "__table__", None)
    return table is None or bool(table.c[column].nullable)


def clean_text(value: Any, max_length: int, label: str) -> str:
    """A trimmed, non-blank string of at most `max_length` characters."""
    if not isinstance(value, str):
        raise FieldInvalid(f"{label} must be a string")
    cleaned = value.strip()
    if "\x00" in cleaned:
        raise FieldInvalid(f"{label} must not contain NUL characters")
    if not cleaned:
        raise FieldInvalid(f"{label} cannot be blank", ErrorCode.BLANK)
    if len(cleaned) > max_length:
        raise FieldInvalid(
            f"{label} is too long ({len(cleaned)} characters; at most {max_length})",
            ErrorCode.TOO_LONG,
        )
    return cleaned


def text_field(max_length: int, *, blank_ok: bool = False, label: str = "value") -> Check:
    """Check for `clean_text`; with `blank_ok`, a blank string means null."""

    def check(value: Any) -> str | None:
        if blank_ok and isinstance(value, str) and not value.strip():
            return None
        return clean_text(value, max_length, label)

    return check


def int_field(low: int, high: int, *, label: str = "value") -> Check:
    """An integer within [low, high]."""

    def check(value: Any) -> int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise FieldInvalid(f"{label} must be an integer")
        if not low <= value <= high:
            raise FieldInvalid(
                f"{label} must be between {low} and {high} (got {value})", ErrorCode.OUT_OF_RANGE
            )
        return value

    return check


def float_field(low: float, high: float, *, label: str = "value") -> Check:
    """A number within [low, high]."""

    def check(value: Any) -> float:
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise FieldInvalid(f"{label} must be a number")
        if not low <= value <= high:
            raise FieldInvalid(
                f"{label} must be between {low} and {high} (got {value})", ErrorCode.OUT_OF_RANGE
            )
        return float(value)

    return check


def bool_field(value: Any) -> bool:
    """A boolean."""
    if not isinstance(value, bool):
        raise FieldInvalid("must be true or false")
    return value


def tags_field(value: Any) -> list[str]:
    """A list of distinct, non-blank, short tags (order kept)."""
    if not isinstance(value, list):
        raise FieldInvalid("tags must be a list of strings")
    if len(value) > TAGS_MAX:
        raise FieldInvalid(f"at most {TAGS_MAX} tags", ErrorCode.TOO_LONG)
    check = text_field(64, label="a tag")
    seen: dict[str, None] = {}
    for tag in value:
        seen[check(tag)] = None
    return list(seen)


def json_object_field(value: Any) -> dict[str, Any]:
    """A JSON object of bounded size."""
    if not isinstance(value, dict):
        raise FieldInvalid("must be a JSON object")
    try:
        size = len(json.dumps(value, allow_nan=False))
    except ValueError as exc:
        raise FieldInvalid("must not contain NaN or Infinity (not valid JSON)") from exc
    if size > JSON_MAX_BYTES:
        raise FieldInvalid(f"is larger than {JSON_MAX_BYTES} bytes", ErrorCode.TOO_LONG)
    return value


ENV_VAR_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
RESERVED_ENV_PREFIX = "CORRAL_"
# Names a child's loader, shell or interpreter acts on before the command's own code runs
# (issue 12, item 9): a token or template value under one of them is code injection, not
# configuration. Compared upper-cased.
REFUSED_ENV_PREFIXES = (RESERVED_ENV_PREFIX, "LD_", "DYLD_", "PYTHON", "PERL5", "BASH_FUNC_")
REFUSED_ENV_NAMES = frozenset(
    {
        "PATH",
        "HOME",
        "ENV",
        "BASH_ENV",
        "SHELLOPTS",
        "BASHOPTS",
        "IFS",
        "PS4",
        "NODE_OPTIONS",
        "NODE_PATH",
        "RUBYOPT",
        "RUBYLIB",
        "PERLLIB",
        "GCONV_PATH",
        "LOCPATH",
        "NLSPATH",
        "JAVA_TOOL_OPTIONS",
        "JDK_JAVA_OPTIONS",
        "_JAVA_OPTIONS",
        "GIT_SSH_COMMAND",
        "GIT_EXEC_PATH",
        "GIT_CONFIG_GLOBAL",
    }
)


def env_name_problem(name: str) -> str | None:
    """Why a child may not be handed a variable called `name`, or None when it may."""
    upper = name.upper()
    if upper.startswith(RESERVED_ENV_PREFIX):
        return f"{name} is reserved for Corral (CORRAL_*)"
    if upper in REFUSED_ENV_NAMES or upper.startswith(REFUSED_ENV_PREFIXES):
        return (
            f"{name} is refused: the system, a loader or an interpreter acts on it before the "
            "command runs (PATH, HOME, LD_*, DYLD_*, PYTHON*, PERL5*, NODE_OPTIONS, BASH_ENV, "
            "ENV, RUBYOPT, ...)"
        )
    return None


def env_var_field(value: Any) -> str:
    """An environment variable name a child can receive a token under."""
    name = clean_text(value, 128, "envVar")
    if not ENV_VAR_RE.match(name):
        raise FieldInvalid(
            "envVar must be letters, digits and underscores, not starting with a digit"
        )
    problem = env_name_problem(name)
    if problem is not None:
        raise FieldInvalid(f"envVar {problem}")
    return name


URL_RE = re.compile(r"^https?://[^\s/$.?#][^\s]*$", re.IGNORECASE)


def url_field(max_length: int) -> Check:
    """An http(s) URL."""

    def check(value: Any) -> str | None:
        if isinstance(value, str) and not value.strip():
            return None
        url = clean_text(value, max_length, "URL")
        if not URL_RE.match(url):
            raise FieldInvalid("must be an http:// or https:// URL")
        return url

    return check


async def ensure_unique(
    session: AsyncSession,
    column: InstrumentedAttribute[str],
    value: str,
    *,
    field: str,
    label: str,
    exclude_id: int | None = None,
) -> None:
    """Raise a TAKEN error when another row already has this name (compared case-folded)."""
    model = column.class_
    stmt = select(func.count()).select_from(model).where(column == name_key(value))
    if exclude_id is not None:
        stmt = stmt.where(model.id != exclude_id)
    with session.no_autoflush:  # the changed row must not be flushed before the check
        taken = await session.scalar(stmt)
    if taken:
        raise InvalidInput.one(field, f"a {label} named {value!r} already exists", ErrorCode.TAKEN)
