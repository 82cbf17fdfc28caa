"""Global IDs (`base64("Type:pk")`), as the API shows objects and the audit log names them."""

from __future__ import annotations

import base64
import binascii

MAX_PK = 2**31 - 1  # primary keys are 32-bit integers on both databases


def encode_global_id(type_name: str, pk: int) -> str:
    """The global ID of the `type_name` row with primary key `pk`."""
    return base64.b64encode(f"{type_name}:{pk}".encode()).decode()


def decode_global_id(global_id: str) -> tuple[str, int] | None:
    """(type name, pk) of a global ID, or None when it is not one of ours."""
    try:
        type_name, _, raw = base64.b64decode(global_id, validate=True).decode().partition(":")
        if not (type_name and raw.isascii() and raw.isdigit()) or int(raw) > MAX_PK:
            return None
        return type_name, int(raw)
    except (binascii.Error, UnicodeDecodeError, ValueError):
        return None
