"""Tiny inline-SVG charts for the run reports: grouped bars, histograms and lines.

Hand-written rather than matplotlib: the reports stay dependency-free, byte-stable and small, and
an inline SVG needs no server and no script to show.

The reports name both axes of every chart with their unit (tests/unit/test_svg.py checks each
chart of a report); count axes tick at integers only (steps of 1, 2, 5, 10, ...); histogram bins
are labelled by their range, with as many decimals as it takes to tell neighbouring bins apart.
Text widths are estimated (``CHAR_W``) to lay labels out inside the chart's box; the browser test
(tests/integration/test_reports_browser.py) measures the real ones.
"""

from __future__ import annotations

import math
from html import escape

WIDTH = 560
PLOT_H = 170  # height of the plotting area
LEFT, RIGHT, TOP = 64, 24, 40
FONT = 10  # axis text, in px
CHAR_W = 6.4  # estimated width of a character at FONT px (sans-serif digits are ~0.64 em)
TITLE_FONT, TITLE_CHAR_W = 13, 8.6
LINE_H = 14
ROTATION = 45  # degrees: x labels too wide for their slot are drawn slanted
SIN = math.sin(math.radians(ROTATION))
MAX_TICKS = 5
DASH = "\u2013"  # en dash, between the ends of a bin
COLORS = ("#3b6ea5", "#e07b39", "#5aa05a", "#c44e52", "#8172b2", "#937860")
HALO = 'paint-order="stroke" stroke="#fff" stroke-width="3" stroke-linejoin="round"'

PLOT_BOTTOM = TOP + PLOT_H
PLOT_W = WIDTH - LEFT - RIGHT


# ---------------------------------------------------------------- axes (pure)


def nice_step(span: float, max_ticks: int = MAX_TICKS, integer: bool = False) -> float:
    """The smallest of 1, 2, 5 x 10^k that cuts ``span`` into at most ``max_ticks`` steps; for a
    count (``integer``) never less than 1."""
    if span <= 0:
        return 1.0
    raw = span / max_ticks
    magnitude = 10.0 ** math.floor(math.log10(raw))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw * (1 - 1e-9))
    return float(max(1, round(step))) if integer else step


def ticks(top: float, integer: bool = False, max_ticks: int = MAX_TICKS) -> list[float]:
    """Ticks from 0 up to the first multiple of a nice step at or above ``top`` (at least one step)."""
    step = nice_step(max(top, 0.0), max_ticks, integer)
    n = max(1, math.ceil(max(top, 0.0) / step - 1e-9))
    if integer:
        return [float(i * int(step)) for i in range(n + 1)]
    return [round(i * step, 12) for i in range(n + 1)]


def tick_labels(values: list[float]) -> list[str]:
    """The ticks written with the decimals their step needs (0, 0.2, ... as "0.0", "0.2"); counts of
    10,000 and more as 10k, 1.5M."""
    step = values[1] - values[0] if len(values) > 1 else 1.0
    if step >= 1 and all(float(v).is_integer() for v in values):
        top = max(abs(v) for v in values)
        if top >= 1e6:
            return [f"{v / 1e6:g}M" if v else "0" for v in values]
        if top >= 1e4:
            return [f"{v / 1e3:g}k" if v else "0" for v in values]
        return [str(int(v)) for v in values]
    decimals = max(0, -math.floor(math.log10(step) + 1e-9))
    return [f"{_positive_zero(v):.{decimals}f}" for v in values]


def bin_labels(edges: list[float]) -> list[str]:
    """One label per bin, ``lo–hi``, with the fewest decimals (up to 12) that make every label, and
    both ends of every bin, distinct."""
    pairs = list(zip(edges, edges[1:], strict=False))
    labels: list[str] = []
    for decimals in range(13):

        def text(v: float, d: int = decimals) -> str:
            return f"{_positive_zero(v):.{d}f}"

        labels = [f"{text(lo)}{DASH}{text(hi)}" for lo, hi in pairs]
        if len(set(labels)) == len(labels) and all(text(lo) != text(hi) for lo, hi in pairs):
            return labels
    return labels


def _positive_zero(value: float) -> float:
    return 0.0 if value == 0 else value


def _num(value: float) -> str:
    """A value in a tooltip."""
    if float(value).is_integer():
        return f"{int(value)}"
    return f"{value:.4g}"


def text_width(text: str, char_w: float = CHAR_W) -> float:
    return len(text) * char_w


def _fit(text: str, width: float) -> str:
    """``text`` cut (with an ellipsis) to about ``width`` px."""
    most = max(1, int(width // CHAR_W))
    return text if len(text) <= most else text[: max(1, most - 1)] + "\u2026"


# ---------------------------------------------------------------- the frame


def _y(value: float, y_top: float) -> float:
    return PLOT_BOTTOM - PLOT_H * (value / y_top if y_top else 0)


def _frame(
    title: str,
    body: list[str],
    y_ticks: list[float],
    x_label: str,
    y_label: str,
    label_band: float,
    legend: list[str] | None = None,
) -> str:
    """The chart around ``body``: title, y grid with its tick labels, both axes and their labels,
    and the legend (in rows under the x label). ``label_band``: the height the x tick labels take."""
    x_label_y = PLOT_BOTTOM + label_band + LINE_H
    rows = _legend_rows(legend or [])
    height = math.ceil(x_label_y + LINE_H * len(rows) + 8)
    parts = [
        f'<svg xmlns="http://www.w3.org/2000/svg" class="chart" role="img" width="{WIDTH}" '
        f'height="{height}" viewBox="0 0 {WIDTH} {height}"><title>{escape(title)}</title>',
        f'<text class="title" x="{WIDTH / 2}" y="18" text-anchor="middle" font-size="{TITLE_FONT}" '
        f'font-weight="bold">{escape(_fit(title, (WIDTH - 8) * CHAR_W / TITLE_CHAR_W))}</text>',
    ]
    y_top = y_ticks[-1]
    for value, label in zip(y_ticks, tick_labels(y_ticks), strict=True):
        y = _y(value, y_top)
        parts.append(f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        parts.append(
            f'<text class="tick" x="{LEFT - 6}" y="{y + 3.5:.1f}" text-anchor="end" font-size="{FONT}">'
            f"{label}</text>"
        )
    parts.append(
        f'<line x1="{LEFT}" x2="{LEFT}" y1="{TOP}" y2="{PLOT_BOTTOM}" stroke="#888"/>'
        f'<line x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{PLOT_BOTTOM}" y2="{PLOT_BOTTOM}" stroke="#888"/>'
    )
    mid = TOP + PLOT_H / 2
    if y_label:
        parts.append(
            f'<text class="y-label" x="14" y="{mid}" font-size="{FONT}" transform="rotate(-90 14 {mid})" '
            f'text-anchor="middle">{escape(_fit(y_label, PLOT_H))}</text>'
        )
    parts += body
    if x_label:
        parts.append(
            f'<text class="x-label" x="{LEFT + PLOT_W / 2}" y="{x_label_y:.1f}" text-anchor="middle" '
            f'font-size="{FONT}">'
            f"{escape(_fit(x_label, PLOT_W))}</text>"
        )
    for r, row in enumerate(rows):
        y = x_label_y + LINE_H * (r + 1)
        for x, i, name in row:
            parts.append(
                f'<rect class="legend" x="{x:.1f}" y="{y - 9:.1f}" width="10" height="10" '
                f'fill="{COLORS[i % len(COLORS)]}"/>'
                f'<text class="legend" x="{x + 14:.1f}" y="{y:.1f}" font-size="{FONT}">{escape(name)}</text>'
            )
    parts.append("</svg>")
    return "".join(parts)


def _legend_rows(names: list[str]) -> list[list[tuple[float, int, str]]]:
    """(x, colour index, name) per item, in rows that fit the chart's width."""
    rows: list[list[tuple[float, int, str]]] = []
    x = float(WIDTH)
    for i, name in enumerate(names):
        name = _fit(name, PLOT_W - 14)
        width = 14 + text_width(name) + 16
        if x + width > WIDTH - RIGHT:
            rows.append([])
            x = float(LEFT)
        rows[-1].append((x, i, name))
        x += width
    return rows


# ---------------------------------------------------------------- charts


def grouped_bars(
    title: str,
    labels: list[str],
    series: dict[str, list[float]],
    y_label: str = "",
    x_label: str = "",
    integer: bool = True,
    y_max: float | None = None,
) -> str:
    """One group of bars per label, one bar per series, under axes named ``x_label`` and ``y_label``
    (with their units). ``integer``: the values are counts (the y axis ticks at integers);
    ``y_max``: a fixed top of the y axis (e.g. 1 for a recall)."""
    top = y_max if y_max is not None else max([v for values in series.values() for v in values] + [0])
    y_ticks = ticks(top, integer=integer)
    y_top = y_ticks[-1]
    n, m = max(len(labels), 1), max(len(series), 1)
    slot = PLOT_W / n
    bar = slot * 0.8 / m
    body = []
    for j, values in enumerate(series.values()):
        for i, value in enumerate(values):
            x = LEFT + i * slot + slot * 0.1 + j * bar
            y = _y(value, y_top)
            body.append(
                f'<rect x="{x:.1f}" y="{y:.1f}" width="{bar:.1f}" height="{PLOT_BOTTOM - y:.1f}" '
                f'fill="{COLORS[j % len(COLORS)]}"><title>{escape(labels[i])}: {_num(value)}</title></rect>'
            )
    centres = [LEFT + i * slot + slot / 2 for i in range(len(labels))]
    text, band = _x_labels(labels, centres, slot)
    body += text
    return _frame(title, body, y_ticks, x_label, y_label, band, list(series) if len(series) > 1 else None)


def _x_labels(labels: list[str], centres: list[float], slot: float) -> tuple[list[str], float]:
    """Category labels under the axis: level when every one fits its slot, else slanted (and every
    k-th one only, when even slanted ones would touch); returns the text and its band's height."""
    widest = max((text_width(label) for label in labels), default=0.0)
    if widest <= slot - 4:
        return [
            f'<text class="tick" x="{x:.1f}" y="{PLOT_BOTTOM + 14}" text-anchor="middle" font-size="{FONT}">'
            f"{escape(label)}</text>"
            for x, label in zip(centres, labels, strict=True)
        ], 14.0
    every = max(1, math.ceil((FONT + 6) / SIN / slot))  # slanted labels this far apart do not touch
    out, longest = [], 0.0
    for i, (x, label) in enumerate(zip(centres, labels, strict=True)):
        if i % every:
            continue
        label = _fit(label, min(16 * CHAR_W, (x - 4) / SIN))  # never past the chart's left edge
        longest = max(longest, text_width(label))
        y = PLOT_BOTTOM + 10
        out.append(
            f'<text class="tick" x="{x + 3:.1f}" y="{y}" text-anchor="end" font-size="{FONT}" '
            f'transform="rotate(-{ROTATION} {x + 3:.1f} {y})">{escape(label)}</text>'
        )
    return out, 10 + longest * SIN + FONT


def histogram(
    title: str, edges: list[float], counts: list[int], x_label: str = "", y_label: str = "count"
) -> str:
    """Bars over ``len(counts)`` bins whose bounds are ``edges``, each labelled by its range;
    ``x_label`` names what was binned, ``y_label`` what was counted."""
    labels = bin_labels(edges)
    return grouped_bars(title, labels, {y_label: [float(c) for c in counts]}, y_label, x_label)


def lines(
    title: str,
    series: dict[str, list[tuple[float, float]]],
    x_label: str,
    y_label: str,
    y_max: float | None = None,
    log_x: bool = False,
    integer_y: bool = False,
    x_marks: list[tuple[float, str]] | None = None,
    y_marks: list[tuple[float, str]] | None = None,
) -> str:
    """One polyline (with dots) per series of (x, y) points.

    ``log_x``: a log2 x axis ticked at the data's own x values (nprobe); else a linear one from 0
    with nice ticks. ``integer_y``: the y values are counts. ``x_marks`` / ``y_marks``: dashed
    reference lines with a label (a chosen nprobe, a target recall)."""
    points = [p for values in series.values() for p in values]
    top = y_max if y_max is not None else max([y for _, y in points] + [0])
    y_ticks = ticks(top, integer=integer_y)
    y_top = y_ticks[-1]
    if log_x:

        def fx(v: float) -> float:
            return math.log2(v) if v > 0 else 0.0

        x_ticks = sorted({x for x, _ in points} | {x for x, _ in x_marks or []})
        lo, hi = (fx(x_ticks[0]), fx(x_ticks[-1])) if x_ticks else (0.0, 1.0)
        if hi <= lo:
            lo, hi = lo - 1, hi + 1
    else:

        def fx(v: float) -> float:
            return v

        x_ticks = ticks(max([x for x, _ in points] + [0]))
        lo, hi = 0.0, x_ticks[-1]

    def px(v: float) -> float:
        return LEFT + PLOT_W * (fx(v) - lo) / (hi - lo)

    body = []
    for j, values in enumerate(series.values()):
        color = COLORS[j % len(COLORS)]
        coords = [(px(x), _y(y, y_top)) for x, y in values]
        if len(coords) > 1:
            path = " ".join(f"{x:.1f},{y:.1f}" for x, y in coords)
            body.append(f'<polyline points="{path}" fill="none" stroke="{color}" stroke-width="2"/>')
        for (x, y), (vx, vy) in zip(coords, values, strict=True):
            body.append(
                f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"><title>{escape(x_label)} '
                f"{_num(vx)}: {escape(y_label)} {_num(vy)}</title></circle>"
            )
    labels = [_num(v) for v in x_ticks] if log_x else tick_labels(x_ticks)
    right = -math.inf
    for value, label in zip(x_ticks, labels, strict=True):
        x, half = px(value), text_width(label) / 2
        if x - half < right + 6:
            continue  # would touch the previous tick's label (log axes bunch up)
        right = x + half
        body.append(
            f'<text class="tick" x="{x:.1f}" y="{PLOT_BOTTOM + 14}" text-anchor="middle" '
            f'font-size="{FONT}">{label}</text>'
        )
    for value, label in x_marks or []:
        x = px(value)
        body.append(
            f'<line class="mark" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{PLOT_BOTTOM}" stroke="#444" '
            f'stroke-dasharray="4 3"/>'
        )
        half = text_width(label) / 2  # the label sits above the plot, centred on the line if it fits
        centre = min(max(x, LEFT + half), WIDTH - 4 - half)
        body.append(
            f'<text class="mark" x="{centre:.1f}" y="{TOP - 6}" text-anchor="middle" font-size="{FONT}">'
            f"{escape(label)}</text>"
        )
    for value, label in y_marks or []:
        y = _y(value, y_top)
        body.append(
            f'<line class="mark" x1="{LEFT}" x2="{WIDTH - RIGHT}" y1="{y:.1f}" y2="{y:.1f}" stroke="#444" '
            f'stroke-dasharray="2 3"/>'
        )
        below = y + 12 if y + 12 <= PLOT_BOTTOM - 2 else y - 4  # at the left, where curves start low
        body.append(
            f'<text class="mark" x="{LEFT + 4}" y="{below:.1f}" font-size="{FONT}" {HALO}>'
            f"{escape(label)}</text>"
        )
    return _frame(title, body, y_ticks, x_label, y_label, 14.0, list(series) if len(series) > 1 else None)
