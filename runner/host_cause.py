"""The cause a Playwright host gave for failing, kept from its stderr for the command's error.

The host (runner/js/corral-playwright.mjs) starts each line of its own with
`corral-playwright: `; when it fails, its first such line names the cause (exit 3: why the
browser could not start; exit 2: the bad flag or setting; exit 1: the script's error), and
indented detail lines (`corral-playwright:   chromium: ...`) and warnings may follow. Without
it a failed run's error said only "exited with status 3" (issue 12).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

HOST_PREFIX = "corral-playwright: "
# A detail under the cause, or a warning that names no failure.
_NOT_A_CAUSE = (f"{HOST_PREFIX}  ", f"{HOST_PREFIX}warning:")
MAX_CAUSE_CHARS = 300

Seen = Callable[[list[str]], None]  # what a log pump tells about the lines it read


class HostCause:
    """Watches a child's stderr lines and keeps the host's first line that names a cause."""

    def __init__(self) -> None:
        self.cause: str | None = None

    def see(self, lines: Iterable[str]) -> None:
        """Look at the next stderr lines, as the pump reads them (not yet redacted)."""
        if self.cause is not None:
            return
        for line in lines:
            if line.startswith(HOST_PREFIX) and not line.startswith(_NOT_A_CAUSE):
                self.cause = line.removeprefix(HOST_PREFIX).strip()
                return

    def explain(self, error: str, redact: Callable[[str], str]) -> str:
        """`error` with the host's cause after it, when the host named one."""
        # Redacted before it is shortened: a cut could leave half a secret unrecognised.
        return f"{error}: {_shorten(redact(self.cause))}" if self.cause else error


def _shorten(text: str) -> str:
    if len(text) <= MAX_CAUSE_CHARS:
        return text
    return text[: MAX_CAUSE_CHARS - 1] + "…"
