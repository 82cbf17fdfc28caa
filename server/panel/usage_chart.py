"""A token's remaining budget over the last hours as an inline SVG, built here (no script:
the panel's CSP allows none inline, and a chart library is not worth it for a line).

The SVG carries a `<title>` and an aria-label, and the page prints the same summary as text
beside it, so a screen reader (or a text browser) gets the figures the line shows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta

from markupsafe import Markup, escape

from server.usage import Point

WIDTH, HEIGHT, PAD = 240, 56, 3


@dataclass(frozen=True, slots=True)
class Chart:
    """The SVG and the text that says what it shows."""

    svg: Markup
    summary: str


def remaining_chart(points: list[Point], now: datetime, hours: int, label: str) -> Chart:
    """`points` (oldest first) from `now - hours` to `now` as a step line of remaining, on a
    scale from 0 to the largest limit (or remaining) seen; observations without a figure are
    left out. `label` names the token in the title."""
    start = now - timedelta(hours=hours)
    known: list[Point] = [point for point in points if point[1] is not None]
    summary = _summary(known, hours)
    title = f"{label}: remaining over the last {hours} h. {summary}"
    if not known:
        return Chart(_svg(title, ""), summary)
    top = max(max(limit or 0, remaining or 0) for _at, remaining, limit in known) or 1
    span = (now - start).total_seconds()

    def x(at: datetime) -> float:
        share = min(max((at - start).total_seconds() / span, 0.0), 1.0)
        return round(PAD + share * (WIDTH - 2 * PAD), 1)

    def y(value: int) -> float:
        return round(HEIGHT - PAD - (value / top) * (HEIGHT - 2 * PAD), 1)

    steps: list[str] = []
    for at, remaining, _limit in known:
        assert remaining is not None
        if steps:
            steps.append(f"{x(at)},{steps[-1].split(',')[1]}")  # hold the last value until now
        steps.append(f"{x(at)},{y(remaining)}")
    steps.append(f"{x(now)},{steps[-1].split(',')[1]}")
    body = (
        f'<line class="chart-axis" x1="{PAD}" y1="{HEIGHT - PAD}" x2="{WIDTH - PAD}" '
        f'y2="{HEIGHT - PAD}"/>'
        f'<polyline class="chart-line" points="{" ".join(steps)}"/>'
    )
    return Chart(_svg(title, body), summary)


def _svg(title: str, body: str) -> Markup:
    # The title is escaped; the body holds numbers and class names only.
    return Markup(  # noqa: S704
        f'<svg class="usage-chart" viewBox="0 0 {WIDTH} {HEIGHT}" width="{WIDTH}" '
        f'height="{HEIGHT}" role="img" aria-label="{escape(title)}" '
        f'preserveAspectRatio="none"><title>{escape(title)}</title>{body}</svg>'
    )


def _summary(known: list[Point], hours: int) -> str:
    if not known:
        return f"No figures observed in the last {hours} h."
    values = [remaining for _at, remaining, _limit in known if remaining is not None]
    count = len(known)
    seen = f"{count} observation{'s' if count != 1 else ''}"
    return f"{seen}: from {values[0]:,} to {values[-1]:,}, lowest {min(values):,}."
