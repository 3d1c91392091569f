"""Small dependency-free SVG plots: lines and scatter points with axes, ticks and a legend."""

from __future__ import annotations

import html
import math

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf")


def _ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if not (math.isfinite(lo) and math.isfinite(hi)) or hi <= lo:
        return [lo]
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = min((s * mag for s in (1, 2, 5, 10) if s * mag >= raw), default=raw)
    start = math.ceil(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 1)]


def line_plot(series: dict[str, tuple[list[float], list[float]]], *, title: str, xlabel: str,
              ylabel: str, points: dict[str, tuple[list[float], list[float]]] | None = None,
              width: int = 520, height: int = 300, hline: float | None = None,
              colors: dict[str, str] | None = None) -> str:
    """An SVG with one polyline per ``series`` entry and dots per ``points`` entry;
    ``colors`` names an entry's colour (a line and the dots it was fitted to can share one),
    the others take the palette in order."""
    points = points or {}
    colors = colors or {}
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

    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" role="img" aria-label="{html.escape(title)}">',
           '<rect width="100%" height="100%" fill="white"/>',
           f'<text x="{width / 2}" y="16" text-anchor="middle" font-size="13" font-family="sans-serif">'
           f'{html.escape(title)}</text>',
           f'<rect x="{L}" y="{T}" width="{pw}" height="{ph}" fill="none" stroke="#999"/>']
    for t in _ticks(x0, x1):
        out.append(f'<text x="{sx(t):.1f}" y="{T + ph + 14}" text-anchor="middle" font-size="10" '
                   f'font-family="sans-serif">{t:.3g}</text>')
    for t in _ticks(y0, y1):
        out.append(f'<line x1="{L}" x2="{L + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{L - 4}" y="{sy(t) + 3:.1f}" text-anchor="end" font-size="10" '
                   f'font-family="sans-serif">{t:.3g}</text>')
    out.append(f'<text x="{L + pw / 2}" y="{height - 6}" text-anchor="middle" font-size="11" '
               f'font-family="sans-serif">{html.escape(xlabel)}</text>')
    out.append(f'<text x="12" y="{T + ph / 2}" text-anchor="middle" font-size="11" font-family="sans-serif" '
               f'transform="rotate(-90 12 {T + ph / 2})">{html.escape(ylabel)}</text>')
    if hline is not None:
        out.append(f'<line x1="{L}" x2="{L + pw}" y1="{sy(hline):.1f}" y2="{sy(hline):.1f}" '
                   'stroke="#555" stroke-dasharray="4 3"/>')
    legend = []
    for i, (name, (xv, yv)) in enumerate(series.items()):
        color = colors.get(name, PALETTE[i % len(PALETTE)])
        pts = " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xv, yv) if math.isfinite(x) and math.isfinite(y))
        out.append(f'<polyline fill="none" stroke="{color}" stroke-width="1.8" points="{pts}"/>')
        legend.append((name, color, "line"))
    for j, (name, (xv, yv)) in enumerate(points.items()):
        color = colors.get(name, PALETTE[(len(series) + j) % len(PALETTE)])
        for x, y in zip(xv, yv):
            if math.isfinite(x) and math.isfinite(y):
                out.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3.5" fill="{color}"/>')
        legend.append((name, color, "dot"))
    for k, (name, color, kind) in enumerate(legend):
        y = T + 12 + 14 * k
        mark = (f'<line x1="{L + 8}" x2="{L + 22}" y1="{y - 4}" y2="{y - 4}" stroke="{color}" stroke-width="2"/>'
                if kind == "line" else f'<circle cx="{L + 15}" cy="{y - 4}" r="3.5" fill="{color}"/>')
        out.append(mark + f'<text x="{L + 26}" y="{y}" font-size="10" font-family="sans-serif">'
                   f'{html.escape(name)}</text>')
    out.append("</svg>")
    return "\n".join(out)
