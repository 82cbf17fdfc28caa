"""Errors a user can fix, carried as values up to the API (`userErrors`) and the panel."""

from __future__ import annotations

import enum
from collections.abc import Sequence
from dataclasses import dataclass


class ErrorCode(enum.StrEnum):
    REQUIRED = "REQUIRED"
    BLANK = "BLANK"
    TOO_LONG = "TOO_LONG"
    TAKEN = "TAKEN"
    INVALID = "INVALID"
    OUT_OF_RANGE = "OUT_OF_RANGE"
    NOT_FOUND = "NOT_FOUND"
    CHAIN_LOOP = "CHAIN_LOOP"
    IN_USE = "IN_USE"
    UNSUPPORTED = "UNSUPPORTED"  # valid, but the installed software cannot run it
    UNAUTHENTICATED = "UNAUTHENTICATED"
    FORBIDDEN = "FORBIDDEN"


@dataclass(frozen=True)
class UserError:
    """One problem with the input: where (`field` path), what, and a stable code."""

    field: tuple[str, ...]
    message: str
    code: ErrorCode


class InvalidInput(Exception):
    """Raised by domain services; the handler rolls back and returns `errors` as values."""

    def __init__(self, errors: Sequence[UserError]) -> None:
        super().__init__("; ".join(error.message for error in errors))
        self.errors = list(errors)

    @classmethod
    def one(cls, field: str | Sequence[str], message: str, code: ErrorCode) -> InvalidInput:
        """An InvalidInput with a single error."""
        path = (field,) if isinstance(field, str) else tuple(field)
        return cls([UserError(path, message, code)])
