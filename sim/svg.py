"""Small SVG line charts for a simulation's figures (cdf.svg, timeseries.svg).

Why not matplotlib: importing and rendering it costs ~0.6 s, more than the simulation itself
takes, on every run. These charts are plain text (axes, "nice" ticks, grid, legend, step or
straight lines, shaded min-max bands), open in any browser and stay small because callers
aggregate their series to at most a few thousand points first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from html import escape

import numpy as np

COLORS = ("#1f77b4", "#ff7f0e", "#2ca02c", "#d62728", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f")


@dataclass
class Series:
    x: np.ndarray
    y: np.ndarray
    label: str = ""
    step: bool = False                 # hold each value until the next x (steps-post)
    low: np.ndarray | None = None      # optional shaded band around y (e.g. per-bin min/max)
    high: np.ndarray | None = None


@dataclass
class Panel:
    xlabel: str
    ylabel: str
    series: list = field(default_factory=list)
    title: str = ""


def nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (1, 2, 5 x 10^k steps) covering [lo, hi]."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        return [0.0, 1.0]
    if hi <= lo:                     # a constant series: a unit around it
        pad = 0.5 * (abs(lo) or 1.0)
        lo, hi = lo - pad if lo else 0.0, hi + pad
    raw = (hi - lo) / max(target, 1)
    mag = 10 ** math.floor(math.log10(raw))
    # the round step whose tick count comes closest to the target (ties: the coarser step)
    step = min((m * mag for m in (1, 2, 5, 10)),
               key=lambda st: (abs(math.ceil(hi / st - 1e-9) - math.floor(lo / st + 1e-9) - target), -st))
    first, last = math.floor(lo / step + 1e-9), math.ceil(hi / step - 1e-9)
    ticks = [round(i * step, 12) for i in range(first, last + 1)]
    if len(ticks) < 2:
        ticks.append(round(ticks[-1] + step, 12))
    return ticks


def _fmt(v: float) -> str:
    return f"{v:.6g}"


def _points(xs, ys, sx, sy) -> str:
    return " ".join(f"{sx(x):.1f},{sy(y):.1f}" for x, y in zip(xs, ys))


def _steps(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """A steps-post line as plain vertices."""
    if len(x) < 2:
        return x, y
    xs = np.repeat(x, 2)[1:]
    ys = np.repeat(y, 2)[:-1]
    return xs, ys


def _panel_svg(p: Panel, x0: float, y0: float, w: float, h: float) -> list[str]:
    left, right, top, bottom = 62, 26, 22 if p.title else 10, 40
    px0, px1, py0, py1 = x0 + left, x0 + w - right, y0 + top, y0 + h - bottom
    finite = lambda a: np.asarray(a, dtype=float)[np.isfinite(np.asarray(a, dtype=float))]
    xs = [finite(s.x) for s in p.series]
    ys = [finite(v) for s in p.series for v in (s.y, s.low, s.high) if v is not None]
    xs = np.concatenate(xs) if xs else np.zeros(0)
    ys = np.concatenate(ys) if ys else np.zeros(0)
    xt = nice_ticks(float(xs.min()), float(xs.max())) if len(xs) else [0.0, 1.0]
    yt = nice_ticks(min(0.0, float(ys.min())), float(ys.max())) if len(ys) else [0.0, 1.0]
    sx = lambda v: px0 + (v - xt[0]) / (xt[-1] - xt[0]) * (px1 - px0)
    sy = lambda v: py1 - (v - yt[0]) / (yt[-1] - yt[0]) * (py1 - py0)
    out = []
    if p.title:
        out.append(f'<text x="{(px0 + px1) / 2:.1f}" y="{y0 + 15:.1f}" text-anchor="middle" '
                   f'font-size="12">{escape(p.title)}</text>')
    for t in xt:
        out.append(f'<line x1="{sx(t):.1f}" y1="{py0:.1f}" x2="{sx(t):.1f}" y2="{py1:.1f}" class="grid"/>')
        out.append(f'<text x="{sx(t):.1f}" y="{py1 + 14:.1f}" text-anchor="middle">{_fmt(t)}</text>')
    for t in yt:
        out.append(f'<line x1="{px0:.1f}" y1="{sy(t):.1f}" x2="{px1:.1f}" y2="{sy(t):.1f}" class="grid"/>')
        out.append(f'<text x="{px0 - 5:.1f}" y="{sy(t) + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    out.append(f'<rect x="{px0:.1f}" y="{py0:.1f}" width="{px1 - px0:.1f}" height="{py1 - py0:.1f}" '
               f'fill="none" stroke="#333"/>')
    out.append(f'<text x="{(px0 + px1) / 2:.1f}" y="{py1 + 32:.1f}" text-anchor="middle">'
               f'{escape(p.xlabel)}</text>')
    cy = (py0 + py1) / 2
    out.append(f'<text x="{x0 + 14:.1f}" y="{cy:.1f}" text-anchor="middle" '
               f'transform="rotate(-90 {x0 + 14:.1f} {cy:.1f})">{escape(p.ylabel)}</text>')
    for i, s in enumerate(p.series):
        color = COLORS[i % len(COLORS)]
        x, y = np.asarray(s.x, dtype=float), np.asarray(s.y, dtype=float)
        if s.low is not None and s.high is not None and len(x):
            lx, lo = _steps(x, np.asarray(s.low, dtype=float)) if s.step else (x, s.low)
            hx, hi = _steps(x, np.asarray(s.high, dtype=float)) if s.step else (x, s.high)
            poly = _points(lx, lo, sx, sy) + " " + _points(hx[::-1], hi[::-1], sx, sy)
            out.append(f'<polygon points="{poly}" fill="{color}" fill-opacity="0.2" stroke="none"/>')
        if s.step:
            x, y = _steps(x, y)
        ok = np.isfinite(x) & np.isfinite(y)
        out.append(f'<polyline points="{_points(x[ok], y[ok], sx, sy)}" fill="none" stroke="{color}" '
                   f'stroke-width="1.2"/>')
    labelled = [(i, s.label) for i, s in enumerate(p.series) if s.label]
    if 1 < len(labelled) <= 8:
        for row, (i, label) in enumerate(labelled):
            ly = py0 + 12 + 13 * row
            out.append(f'<line x1="{px1 - 110:.1f}" y1="{ly - 4:.1f}" x2="{px1 - 92:.1f}" y2="{ly - 4:.1f}" '
                       f'stroke="{COLORS[i % len(COLORS)]}" stroke-width="2"/>')
            out.append(f'<text x="{px1 - 88:.1f}" y="{ly:.1f}">{escape(label)}</text>')
    return out


def chart(panels: list[Panel], cols: int, panel_w: int = 360, panel_h: int = 220, title: str = "") -> str:
    """An SVG document with ``panels`` laid out ``cols`` per row."""
    rows = -(-len(panels) // cols)
    head = 24 if title else 0
    width, height = cols * panel_w, rows * panel_h + head
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
           f'viewBox="0 0 {width} {height}" font-family="sans-serif" font-size="10">',
           '<style>.grid{stroke:#ddd;stroke-width:0.6}</style>',
           f'<rect width="{width}" height="{height}" fill="white"/>']
    if title:
        out.append(f'<text x="{width / 2:.1f}" y="16" text-anchor="middle" font-size="13">{escape(title)}</text>')
    for k, p in enumerate(panels):
        out.extend(_panel_svg(p, (k % cols) * panel_w, head + (k // cols) * panel_h, panel_w, panel_h))
    out.append("</svg>")
    return "\n".join(out) + "\n"
