"""A run's parameter values checked against its template's declared parameters."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any


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
