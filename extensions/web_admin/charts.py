"""Line charts as inline SVG, drawn on the server: no script, no library, readable by a screen reader
(a title and a description that says the range and the last value), in the page's own colours."""

from __future__ import annotations

import time
from collections.abc import Sequence

from server.web_pages import esc

WIDTH, HEIGHT = 360, 140
LEFT, RIGHT, TOP, BOTTOM = 44, 8, 10, 22  # margins for the axis labels


def _number(value: float) -> str:
    if value >= 100 or value == int(value):
        return f"{value:.0f}"
    return f"{value:.2f}" if value < 10 else f"{value:.1f}"


def line_chart(ident: str, title: str, unit: str, points: Sequence[tuple[float, float]], span: float,
               now: float | None = None) -> str:
    """An SVG chart of `points` (time, value) over the last `span` seconds up to `now`."""
    now = time.time() if now is None else now
    start = now - span
    shown = [(t, v) for t, v in points if t >= start]
    top = max((v for _, v in shown), default=0.0)
    top = top * 1.1 if top > 0 else 1.0
    plot_w, plot_h = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM

    def x(t: float) -> float:
        return LEFT + (t - start) / span * plot_w

    def y(v: float) -> float:
        return TOP + plot_h - v / top * plot_h

    last = f"last {_number(shown[-1][1])} {unit}" if shown else "no data yet"
    highest = _number(top / 1.1) if shown else "0"
    description = f"{title} over the last {_span_text(span)}, in {unit}: {last}, highest {highest}"
    parts = [f"<svg xmlns='http://www.w3.org/2000/svg' role='img' viewBox='0 0 {WIDTH} {HEIGHT}' "
             f"width='{WIDTH}' height='{HEIGHT}' aria-labelledby='{ident}-t {ident}-d' class='chart' "
             f"data-points='{len(shown)}'>",
             f"<title id='{ident}-t'>{esc(title)}</title><desc id='{ident}-d'>{esc(description)}</desc>",
             f"<rect x='{LEFT}' y='{TOP}' width='{plot_w}' height='{plot_h}' fill='#fff' stroke='#ccc'/>"]
    for fraction in (0.0, 0.5, 1.0):
        value = top * fraction
        parts.append(f"<line x1='{LEFT}' x2='{LEFT + plot_w}' y1='{y(value):.1f}' y2='{y(value):.1f}' "
                     "stroke='#eee'/>")
        parts.append(f"<text x='{LEFT - 4}' y='{y(value) + 4:.1f}' font-size='10' text-anchor='end' "
                     f"fill='#555'>{_number(value)}</text>")
    for label, t in ((f"-{_span_text(span)}", start), ("now", now)):
        anchor = "start" if t == start else "end"
        parts.append(f"<text x='{x(t):.1f}' y='{HEIGHT - 6}' font-size='10' text-anchor='{anchor}' "
                     f"fill='#555'>{esc(label)}</text>")
    if len(shown) == 1:
        t, v = shown[0]
        parts.append(f"<circle cx='{x(t):.1f}' cy='{y(v):.1f}' r='2.5' fill='#1565c0'/>")
    elif shown:
        path = " ".join(f"{x(t):.1f},{y(v):.1f}" for t, v in shown)
        parts.append(f"<polyline points='{path}' fill='none' stroke='#1565c0' stroke-width='1.5'/>")
    parts.append("</svg>")
    return "".join(parts)


def _span_text(span: float) -> str:
    return f"{span / 3600:.0f} h" if span >= 3600 else f"{span / 60:.0f} min"
