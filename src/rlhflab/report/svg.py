"""Small dependency-free SVG plots: lines and scatter points with axes, ticks and a legend
below the plot area (never over the data)."""

from __future__ import annotations

import html
import math

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")
NEUTRAL = "#555555"  # references that are no arm's: perfect calibration, the exact frontier


class Palette:
    """One colour per name for a whole report: the names given first (a run's arms, in the
    run's order) take the palette in order, any other name the next free colour when first
    asked for, and every later call returns the same colour."""

    def __init__(self, names=()) -> None:
        self._colors: dict[str, str] = {}
        for name in names:
            self(name)

    def __call__(self, name: str) -> str:
        if name not in self._colors:
            self._colors[name] = PALETTE[len(self._colors) % len(PALETTE)]
        return self._colors[name]


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((s * mag for s in (1, 2, 5, 10) if s * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


def _legend_layout(labels: list[str], width: int, left: int) -> tuple[list[tuple[float, int]], int]:
    """(x, row) of each legend entry, flowing left to right under the plot and wrapping at
    ``width``; and the number of rows. An entry is about 6 px per character (10 px sans-serif)
    after its 22 px mark."""
    places, x, row = [], float(left), 0
    for label in labels:
        w = 30 + 6.0 * len(label)
        if x > left and x + w > width - 4:
            x, row = float(left), row + 1
        places.append((x, row))
        x += w
    return places, (row + 1 if labels else 0)


def line_plot(series: dict[str, tuple[list[float], list[float]]], *, title: str, xlabel: str,
              ylabel: str, points: dict[str, tuple[list[float], list[float]]] | None = None,
              width: int = 520, height: int = 300, hline: float | None = None,
              colors: dict[str, str] | None = None, styles: dict[str, str] | None = None) -> str:
    """An SVG with one polyline per ``series`` entry and dots per ``points`` entry;
    ``colors`` names an entry's colour (a line and the dots it was fitted to can share one),
    the others take the palette in order. ``styles``: "dashed" for a line, "ring" for
    hollow dots (two readings of one arm in the arm's one colour). ``height`` is the plot's;
    the legend adds its rows below the x-axis label."""
    points = points or {}
    colors = colors or {}
    styles = styles or {}
    xs = [x for s in (*series.values(), *points.values()) for x in s[0] if math.isfinite(x)]
    ys = [y for s in (*series.values(), *points.values()) for y in s[1] if math.isfinite(y)]
    if hline is not None:
        ys.append(hline)
    if not xs or not ys:
        return f"<p><em>{html.escape(title)}: no data</em></p>"
    x0, x1 = min(xs), max(xs)
    y0, y1 = min(ys), max(ys)
    if x1 == x0:
        x0, x1 = x0 - 1, x1 + 1
    if y1 == y0:
        pad = max(abs(y0) * 0.2, 1e-3)
        y0, y1 = y0 - pad, y1 + pad
    pad_y = 0.05 * (y1 - y0)
    y0, y1 = y0 - pad_y, y1 + pad_y
    L, R, T, B = 56, 12, 28, 40
    pw, ph = width - L - R, height - T - B

    def sx(x: float) -> float:
        return L + (x - x0) / (x1 - x0) * pw

    def sy(y: float) -> float:
        return T + (1 - (y - y0) / (y1 - y0)) * ph

    legend = []
    for i, name in enumerate(series):
        legend.append((name, colors.get(name, PALETTE[i % len(PALETTE)]), styles.get(name, "line")))
    for j, name in enumerate(points):
        legend.append((name, colors.get(name, PALETTE[(len(series) + j) % len(PALETTE)]),
                       styles.get(name, "dot")))
    places, rows = _legend_layout([name for name, _, _ in legend], width, L)
    total = height + (14 * rows + 6 if rows else 0)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{total}" '
           f'viewBox="0 0 {width} {total}" role="img" aria-label="{html.escape(title)}">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13" font-family="sans-serif">'
           f'{html.escape(title)}</text>',
           f'<rect class="plot-area" x="{L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    for t in _ticks(x0, x1):
        out.append(f'<text x="{sx(t):.1f}" y="{T + ph + 14}" text-anchor="middle" font-size="10" '
                   f'font-family="sans-serif">{t:.3g}</text>')
    for t in _ticks(y0, y1):
        out.append(f'<line x1="{L}" x2="{L + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{L - 4}" y="{sy(t) + 3:.1f}" text-anchor="end" font-size="10" '
                   f'font-family="sans-serif">{t:.3g}</text>')
    out.append(f'<text class="xlabel" x="{L + pw / 2}" y="{height - 6}" text-anchor="middle" font-size="11" '
               f'font-family="sans-serif">{html.escape(xlabel)}</text>')
    out.append(f'<text class="ylabel" x="12" y="{T + ph / 2}" text-anchor="middle" font-size="11" '
               f'font-family="sans-serif" transform="rotate(-90 12 {T + ph / 2})">{html.escape(ylabel)}</text>')
    if hline is not None:
        out.append(f'<line x1="{L}" x2="{L + pw}" y1="{sy(hline):.1f}" y2="{sy(hline):.1f}" '
                   'stroke="#555" stroke-dasharray="4 3"/>')
    for name, (xv, yv) in series.items():
        color = colors.get(name, PALETTE[list(series).index(name) % len(PALETTE)])
        dash = ' stroke-dasharray="6 4"' if styles.get(name) == "dashed" else ""
        finite = [(x, y) for x, y in zip(xv, yv) if math.isfinite(x) and math.isfinite(y)]
        pts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in finite)
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.8"{dash} points="{pts}"/>')
        if len(finite) == 1:  # a line of one point draws nothing: a dot shows it
            out.append(f'<circle cx="{sx(finite[0][0]):.1f}" cy="{sy(finite[0][1]):.1f}" r="3" fill="{color}"/>')
    for name, (xv, yv) in points.items():
        color = next(c for n, c, _ in legend if n == name)
        paint = (f'fill="white" stroke="{color}" stroke-width="1.6"' if styles.get(name) == "ring"
                 else f'fill="{color}"')
        for x, y in zip(xv, yv):
            if math.isfinite(x) and math.isfinite(y):
                out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" {paint}/>')
    out.append(f'<g class="legend" data-top="{height}">')
    for (name, color, kind), (x, row) in zip(legend, places):
        y = height + 12 + 14 * row
        if kind in ("line", "dashed"):
            dash = ' stroke-dasharray="4 2"' if kind == "dashed" else ""
            mark = (f'<line x1="{x:.0f}" x2="{x + 16:.0f}" y1="{y - 4}" y2="{y - 4}" stroke="{color}" '
                    f'stroke-width="2"{dash}/>')
        elif kind == "ring":
            mark = f'<circle cx="{x + 8:.0f}" cy="{y - 4}" r="3.5" fill="white" stroke="{color}" stroke-width="1.6"/>'
        else:
            mark = f'<circle cx="{x + 8:.0f}" cy="{y - 4}" r="3.5" fill="{color}"/>'
        out.append(mark + f'<text x="{x + 22:.0f}" y="{y}" font-size="10" font-family="sans-serif">'
                   f'{html.escape(name)}</text>')
    out.append("</g>")
    out.append("</svg>")
    return "\n".join(out)
