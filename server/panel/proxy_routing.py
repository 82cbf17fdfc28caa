"""The proxy page's routing rule editor (issue 18): one form of rule rows, read from and
turned into what `server.routing.set_routing_rules` (GraphQL's setRoutingRules) takes.

Every button of the form saves it: "Save" as edited (a filled-in blank row adds a rule),
"up"/"down"/"delete" on a row after moving or dropping it, "reset" the default rule set.
A refused save shows each message next to its rule, with the admin's input kept.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

from server.errors import UserError
from xray.routing import ACTIONS, MAX_RULES, NETWORKS

ACTION_CHOICES = ACTIONS

ROW_KEY = re.compile(r"^rules-(\d{1,4})-action$")
ROW_FIELDS = ("domains", "ips", "ports", "network", "action", "viaProxyId")
OP = re.compile(r"^(up|down|delete)-(\d{1,4})$")
NETWORK_CHOICES = ("", *NETWORKS)


@dataclass(frozen=True)
class RuleRow:
    """One rule as the form shows it: the inputs' text, and the messages next to them
    (by field name, "" for the rule as a whole)."""

    domains: str = ""
    ips: str = ""
    ports: str = ""
    network: str = ""
    action: str = "PROXY"
    via: str = ""
    errors: dict[str, list[str]] = field(default_factory=dict)

    @property
    def blank(self) -> bool:
        """Nothing typed: the spare row a save ignores."""
        typed = (self.domains, self.ips, self.ports, self.network, self.via)
        return self.action == "PROXY" and not any(text.strip() for text in typed)


@dataclass(frozen=True)
class RulesForm:
    """The editor: its rows (the last one blank, for a new rule) and form-wide messages."""

    rows: list[RuleRow]
    errors: list[str] = field(default_factory=list)

    @property
    def spare(self) -> int:
        """The index of the blank row for a new rule."""
        return len(self.rows) - 1


def rules_form(stored: Sequence[dict[str, Any]]) -> RulesForm:
    """A proxy's saved rules as the editor shows them, plus a blank row."""
    rows = [
        RuleRow(
            domains="\n".join(rule.get("domains") or []),
            ips="\n".join(rule.get("ips") or []),
            ports=rule.get("ports") or "",
            network=rule.get("network") or "",
            action=rule.get("action", "PROXY"),
            via="" if rule.get("via_proxy_id") is None else str(rule["via_proxy_id"]),
        )
        for rule in stored
    ]
    return RulesForm([*rows, RuleRow()])


def posted_rows(fields: dict[str, str]) -> list[RuleRow]:
    """The rows of a posted form, in their order (at most MAX_RULES + 1)."""
    indexes = sorted(int(m.group(1)) for key in fields if (m := ROW_KEY.match(key)))
    return [_posted_row(fields, f"rules-{index}-") for index in indexes[: MAX_RULES + 1]]


def _posted_row(fields: dict[str, str], prefix: str) -> RuleRow:
    def text(name: str) -> str:
        return fields.get(prefix + name, "")

    return RuleRow(
        domains=text("domains"),
        ips=text("ips"),
        ports=text("ports"),
        network=text("network"),
        action=text("action").strip().upper() or "PROXY",
        via=text("viaProxyId"),
    )


def apply_op(rows: list[RuleRow], op: str) -> tuple[list[RuleRow], str]:
    """The rows to save after the pressed button (`op`), blank ones dropped, and what the
    flash says once they are saved."""
    found = OP.match(op)
    rows = list(rows)
    done = "saved"
    if found and int(found.group(2)) < len(rows):
        verb, index = found.group(1), int(found.group(2))
        if verb == "delete":
            del rows[index]
            done = f"rule {index + 1} deleted"
        else:
            other = index - 1 if verb == "up" else index + 1
            if 0 <= other < len(rows):
                rows[index], rows[other] = rows[other], rows[index]
                done = f"rule {index + 1} moved {verb}"
    return [row for row in rows if not row.blank], done


def rule_values(row: RuleRow) -> dict[str, Any]:
    """A row as set_routing_rules takes a rule. A VIA row's proxy that is not a number
    becomes 0, which no proxy has (the domain's "no such proxy" next to it)."""
    via = row.via.strip()
    via_id: int | None = None
    if row.action == "VIA" and via:
        via_id = int(via) if via.isascii() and via.isdigit() and len(via) < 12 else 0
    return {
        "domains": _lines(row.domains),
        "ips": [item for line in _lines(row.ips) for item in line.replace(",", " ").split()],
        "ports": row.ports.strip() or None,
        "network": row.network.strip() or None,
        "action": row.action,
        "via_proxy_id": via_id,
    }


def _lines(text: str) -> list[str]:
    """One matcher a line (a regexp may hold a comma or a space)."""
    return [line.strip() for line in text.splitlines() if line.strip()]


def refused_form(rows: list[RuleRow], errors: list[UserError]) -> RulesForm:
    """The saved-for rows again with each error next to its rule (its field), and the
    form's own errors (the binary's refusal of the whole set) above them."""
    marked = [dict[str, list[str]]() for _ in rows]
    overall: list[str] = []
    for error in errors:
        where = error.field[1:] if error.field[:1] == ("rules",) else ()
        if not where or not where[0].isdigit() or int(where[0]) >= len(rows):
            overall.append(error.message)
            continue
        name = where[1] if len(where) > 1 and where[1] in ROW_FIELDS else ""
        marked[int(where[0])].setdefault(name, []).append(error.message)
    shown = [replace(row, errors=found) for row, found in zip(rows, marked, strict=True)]
    return RulesForm([*shown, RuleRow()], overall)
