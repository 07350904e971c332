"""Tiny inline-SVG charts for the run reports: bars, grouped bars, histograms and lines.

Hand-written rather than matplotlib: the reports stay dependency-free, byte-stable and small, and
an inline SVG needs no server and no script to show.
"""

from __future__ import annotations

from html import escape

WIDTH, HEIGHT = 560, 260
LEFT, RIGHT, TOP, BOTTOM = 56, 16, 28, 56
COLORS = ("#3b6ea5", "#e07b39", "#5aa05a", "#c44e52", "#8172b2", "#937860")


def _frame(title: str, body: list[str], y_max: float, y_label: str, legend: list[str] | None = None) -> str:
    plot_h = HEIGHT - TOP - BOTTOM
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" width="{WIDTH}" '
        f'height="{HEIGHT}" viewBox="0 0 {WIDTH} {HEIGHT}"><title>{escape(title)}</title>',
        f'<text x="{WIDTH / 2}" y="16" text-anchor="middle" font-size="13" font-weight="bold">'
        f"{escape(title)}</text>",
    ]
    for i in range(5):  # y grid and ticks
        value = y_max * i / 4
        y = TOP + plot_h - plot_h * i / 4
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(
            f'<text x="{LEFT - 6}" y="{y + 4:.1f}" text-anchor="end" font-size="10">{_num(value)}</text>'
        )
    parts.append(
        f'<text x="12" y="{TOP + plot_h / 2}" font-size="10" transform="rotate(-90 12 {TOP + plot_h / 2})" '
        f'text-anchor="middle">{escape(y_label)}</text>'
    )
    parts += body
    for i, name in enumerate(legend or []):
        x = LEFT + 8 + i * 110
        parts.append(
            f'<rect x="{x}" y="{HEIGHT - 14}" width="10" height="10" fill="{COLORS[i % len(COLORS)]}"/>'
            f'<text x="{x + 14}" y="{HEIGHT - 5}" font-size="10">{escape(name)}</text>'
        )
    parts.append("</svg>")
    return "".join(parts)


def _num(value: float) -> str:
    if value == int(value):
        return f"{int(value)}"
    return f"{value:.3g}"


def _y(value: float, y_max: float) -> float:
    plot_h = HEIGHT - TOP - BOTTOM
    return TOP + plot_h - plot_h * (value / y_max if y_max else 0)


def grouped_bars(title: str, labels: list[str], series: dict[str, list[float]], y_label: str = "") -> str:
    """One group of bars per label, one bar per series."""
    y_max = max([v for values in series.values() for v in values] + [1]) * 1.1
    n, m = max(len(labels), 1), max(len(series), 1)
    slot = (WIDTH - LEFT - RIGHT) / n
    bar = slot * 0.8 / m
    body = []
    for j, values in enumerate(series.values()):
        for i, value in enumerate(values):
            x = LEFT + i * slot + slot * 0.1 + j * bar
            y = _y(value, y_max)
            body.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{_y(0, y_max) - y:.1f}" '
                f'fill="{COLORS[j % len(COLORS)]}"><title>{escape(labels[i])}: {_num(value)}</title></rect>'
            )
    step = max(1, -(-len(labels) // 10))  # at most ten labels under the axis
    for i, label in enumerate(labels):
        if i % step:
            continue
        x = LEFT + i * slot + slot / 2
        body.append(
            f'<text x="{x:.1f}" y="{HEIGHT - BOTTOM + 14}" text-anchor="middle" font-size="10">'
            f"{escape(label[:18])}</text>"
        )
    return _frame(title, body, y_max, y_label, list(series) if len(series) > 1 else None)


def histogram(title: str, edges: list[float], counts: list[int], x_label: str = "") -> str:
    """Bars over ``len(counts)`` bins whose bounds are ``edges``."""
    labels = [f"{edges[i]:.2g}" for i in range(len(counts))]
    chart = grouped_bars(title, labels, {x_label or "count": [float(c) for c in counts]}, "count")
    return chart


def lines(
    title: str,
    series: dict[str, list[tuple[float, float]]],
    x_label: str,
    y_label: str,
    y_max: float | None = None,
    log_x: bool = False,
) -> str:
    """One polyline (with dots) per series of (x, y) points."""
    import math

    points = [p for values in series.values() for p in values]
    fx = (lambda v: math.log2(v) if v > 0 else 0.0) if log_x else (lambda v: v)
    xs = [fx(x) for x, _ in points] or [0.0, 1.0]
    x_lo, x_hi = min(xs), max(xs)
    x_hi = x_hi if x_hi > x_lo else x_lo + 1
    top = y_max if y_max is not None else max([y for _, y in points] + [1]) * 1.1
    plot_w = WIDTH - LEFT - RIGHT
    body = []
    for j, values in enumerate(series.values()):
        coords = [(LEFT + plot_w * (fx(x) - x_lo) / (x_hi - x_lo), _y(y, top)) for x, y in values]
        color = COLORS[j % len(COLORS)]
        if coords:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
            body.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for (x, y), (vx, vy) in zip(coords, values, strict=True):
            body.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"><title>{_num(vx)}: '
                f"{_num(vy)}</title></circle>"
            )
    ticks = sorted({x for x, _ in points})[:12]
    for value in ticks:
        x = LEFT + plot_w * (fx(value) - x_lo) / (x_hi - x_lo)
        body.append(
            f'<text x="{x:.1f}" y="{HEIGHT - BOTTOM + 14}" text-anchor="middle" font-size="10">'
            f"{_num(value)}</text>"
        )
    body.append(
        f'<text x="{LEFT + plot_w / 2}" y="{HEIGHT - BOTTOM + 30}" text-anchor="middle" '
        f'font-size="10">{escape(x_label)}</text>'
    )
    return _frame(title, body, top, y_label, list(series) if len(series) > 1 else None)
