"""The models' enums, served as GraphQL enums: the same classes, so each name and value has
one copy (issue 15, item 5). GraphQL shows the member names (`STDOUT`, `ADMIN`)."""

from __future__ import annotations

import strawberry

from server.models import CommandStatus, LogStream, ProxyProtocol, Role, UsageSource

for enum_class, description in (
    (CommandStatus, "Where a command is: QUEUED -> (WAITING) -> RUNNING -> a final status."),
    (LogStream, "Which pipe a log line came from; SYSTEM lines are Corral's own."),
    (ProxyProtocol, "The protocol an upstream proxy speaks."),
    (Role, "What a user or API token may do."),
    (UsageSource, "Where an observation of a token's budget came from."),
):
    strawberry.enum(enum_class, description=description)

__all__ = ["CommandStatus", "LogStream", "ProxyProtocol", "Role", "UsageSource"]
