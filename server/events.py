"""Structured operational log: one line per event, `event=... key=value ...` (logfmt)."""

from __future__ import annotations

import logging
from typing import Any

log = logging.getLogger("corral.runner")
LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING}


def _value(value: Any) -> str:
    text = str(value)
    if not text or any(ch in text for ch in ' "=\n'):
        return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'
    return text


def format_event(event: str, fields: dict[str, Any]) -> str:
    """`event=NAME k=v ...`, skipping None values."""
    parts = [f"event={event}"]
    parts.extend(f"{key}={_value(value)}" for key, value in fields.items() if value is not None)
    return " ".join(parts)


def log_event(event: str, *, level: str = "info", **fields: Any) -> None:
    """Log one runner event (claimed, started, retried, killed, recovered ...)."""
    number = LEVELS.get(level, logging.ERROR)
    if log.isEnabledFor(number):
        log.log(number, format_event(event, fields))
