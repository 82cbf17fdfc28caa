"""What a sidecar's output means for a run's log: less chatter, failures in plain words.

V2Ray 4.x reports an upstream's refusal (a 407, a refused dial, a failed lookup) only at
`info` level, together with a line per connection. So the binary always runs at `info` or
more, and `SidecarLog` keeps what the admin asked for:

- raw lines (`[sidecar] ...`) at or above `CORRAL_SIDECAR_LOG_LEVEL` (`none`: no raw line at all);
- one readable line per kind of failure and upstream (`describe`), then at most one more
  per `REPEAT_SECONDS` with the count of the ones not shown (and the rest when it stops);
- with routing trace on, each access-log line as `route <destination> → <outbound>`,
  at most `TRACE_MAX_LINES` per sidecar, then one line saying how many were left out.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from xray.config import BLOCK_TAG, PROXY_TAG
from xray.hops import Hop
from xray.probe import Problem, ProblemKind, describe
from xray.routing import DIRECT_TAG, via_tag

LEVEL_RANK = {"debug": 0, "info": 1, "warning": 2, "error": 3, "none": 4}
REPEAT_SECONDS = 60.0
TRACE_MAX_LINES = 1000
MAX_SESSIONS = 4096

LEVEL_RE = re.compile(r"\[(Debug|Info|Warning|Error)\]")
# Untagged lines: the start banner (chatter), or what the binary says before its log starts
# (a config it refuses, quoted over several lines): shown as warnings.
BANNER_RE = re.compile(r"^(?:V2Ray|Xray) \d|A unified platform|Penetrates Everything")
SESSION_RE = re.compile(r"\] \[(\d+)\] ")
DIAL_RE = re.compile(r"dialing (?:TCP|TLS|UDP)? ?to (?:tcp|udp):(\S+):(\d+)")
REQUEST_RE = re.compile(r"(?:request to|default route for|for \[?)((?:tcp|udp):[^\s\]]+)")
ACCESS_RE = re.compile(
    r"(?:from )?(?P<source>\S+) (?P<verdict>accepted|rejected) +(?P<dest>\S+)"
    r"(?: \[(?:[^\]]*?(?:->|>>) ?)?(?P<tag>[^\]\s]*)\])?"
)
FAILED_RE = re.compile(r"failed to process outbound traffic|failed to (?:dial|find an available)")
HTTP_CODE_RE = re.compile(r"non 200 code: (\d{3})( [A-Za-z ]+)?")
# Most specific first: a 407 comes with other words, a timeout with "dial tcp".
KINDS: tuple[tuple[ProblemKind, re.Pattern[str]], ...] = (
    ("auth", re.compile(r"non 200 code: 407|rejects? (?:account|auth)|auth\w* fail", re.I)),
    ("target", re.compile(r"non 200 code: 50[234]")),
    ("dns", re.compile(r"no such host|lookup \S+ on|server misbehaving")),
    ("tls", re.compile(r"x509:|tls: |TLS handshake|certificate")),
    ("timeout", re.compile(r"i/o timeout|deadline exceeded|timed? ?out", re.I)),
    ("refused", re.compile(r"connection refused|connection reset|no route to host|unreachable")),
)
Clock = Callable[[], float]


def binary_level(level: str) -> str:
    """The level the binary runs at: at least `info`, where V2Ray reports upstream failures."""
    return level if level in ("debug", "info") else "info"


def classify(text: str) -> tuple[ProblemKind, str] | None:
    """The kind of failure a sidecar line reports, with a short detail (None: no failure)."""
    if not FAILED_RE.search(text):
        return None
    for kind, pattern in KINDS:
        if pattern.search(text):
            return kind, _detail(kind, text)
    return None


def _detail(kind: ProblemKind, text: str) -> str:
    code = HTTP_CODE_RE.search(text)
    if code and kind in ("auth", "target"):
        return (code.group(1) + (code.group(2) or "")).strip()
    inner = re.findall(r"\[([^\[\]]+)\]", text)
    detail = inner[-1] if inner else text
    return re.sub(r"(?:v2ray\.com|github\.com/xtls/xray-core)/\S+: ", "", detail).strip()[:200]


@dataclass
class _Repeats:
    count: int = 0
    shown_at: float = 0.0
    unshown: int = 0


@dataclass
class SidecarLog:
    """Turns a sidecar's lines into the run's system lines (see the module docstring)."""

    chain: Sequence[Hop]
    level: str = "warning"
    trace: bool = False
    via_chains: Mapping[str, Sequence[Hop]] = field(default_factory=dict)
    clock: Clock = time.monotonic
    problems: list[Problem] = field(default_factory=list)
    _sessions: dict[str, tuple[str, str]] = field(default_factory=dict)
    _repeats: dict[tuple[str, str], _Repeats] = field(default_factory=dict)
    _traced: int = 0

    def feed(self, line: str) -> list[str]:
        """The lines to log for one line of the sidecar's output."""
        access = None if LEVEL_RE.search(line) else ACCESS_RE.search(line)
        if access is not None:
            return self._route(access)
        out = [f"[sidecar] {line}"] if self._shown(line) else []
        self._remember(line)
        found = classify(line)
        if found is not None:
            out += self._failure(line, *found)
        return out

    def close(self) -> list[str]:
        """What is still owed when the sidecar stops: counts of repeats not yet shown."""
        lines = []
        for (kind, name), repeats in self._repeats.items():
            if repeats.unshown:
                lines.append(f"… {repeats.unshown} more {kind} failure(s) with proxy {name!r}")
                repeats.unshown = 0
        return lines

    def _shown(self, line: str) -> bool:
        if self.level == "none":
            return False
        match = LEVEL_RE.search(line)
        if match:
            rank = LEVEL_RANK[match.group(1).lower()]
        else:  # the banner, or a fatal message before logging starts (a config refused)
            rank = LEVEL_RANK["info" if BANNER_RE.search(line) else "warning"]
        return rank >= LEVEL_RANK[self.level]

    def _remember(self, line: str) -> None:
        session = SESSION_RE.search(line)
        if session is None:
            return
        dial = DIAL_RE.search(line)
        request = REQUEST_RE.search(line)
        if dial is None and request is None:
            return
        if len(self._sessions) >= MAX_SESSIONS:
            self._sessions.clear()
        hop, target = self._sessions.get(session.group(1), ("", ""))
        if dial is not None:
            hop = f"{dial.group(1).lower()}:{dial.group(2)}"
        if request is not None and not target:
            target = request.group(1)
        self._sessions[session.group(1)] = (hop, target)

    def _failure(self, line: str, kind: ProblemKind, detail: str) -> list[str]:
        session = SESSION_RE.search(line)
        dialed, target = self._sessions.get(session.group(1) if session else "", ("", ""))
        hop = self._hop_at(dialed)
        message = describe(kind, hop, detail, target.partition(":")[2] or "the destination")
        if not any(problem.kind == kind for problem in self.problems):
            self.problems.append(Problem(kind, message))
        repeats = self._repeats.setdefault((kind, hop.name), _Repeats())
        repeats.count += 1
        now = self.clock()
        if repeats.count > 1 and now - repeats.shown_at < REPEAT_SECONDS:
            repeats.unshown += 1
            return []
        if repeats.unshown:
            message += f" ({repeats.unshown} more like it since the last report)"
        repeats.shown_at, repeats.unshown = now, 0
        return [message]

    def _hop_at(self, dialed: str) -> Hop:
        """The hop dialed at `host:port`, else the first one the main chain dials."""
        hops = [*self.chain, *(hop for chain in self.via_chains.values() for hop in chain)]
        for hop in hops:
            if f"{hop.host.lower()}:{hop.port}" == dialed:
                return hop
        return self.chain[-1]

    def _route(self, access: re.Match[str]) -> list[str]:
        if not self.trace or "insufficient header" in access.string:
            return []  # a bare TCP connect (our own readiness check): normal
        self._traced += 1
        if self._traced > TRACE_MAX_LINES:
            return []
        if self._traced == TRACE_MAX_LINES:
            return [f"route trace: limit of {TRACE_MAX_LINES} lines reached; no more are shown"]
        if access.group("verdict") == "rejected":
            return [f"route {access.group('dest')}: rejected by the sidecar"]
        return [f"route {access.group('dest')} → {self._outbound(access.group('tag') or '')}"]

    def _outbound(self, tag: str) -> str:
        if tag == PROXY_TAG:
            return f"proxy {self.chain[0].name!r}"
        if tag == BLOCK_TAG:
            return "blocked"
        if tag == DIRECT_TAG:
            return "direct"
        for key, chain in self.via_chains.items():
            if tag == via_tag(key):
                return f"via proxy {chain[0].name!r}"
        return tag or "the default outbound"
