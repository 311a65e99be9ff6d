"""The evaluation report's figures, written as standalone SVG files.

Plain SVG text rather than matplotlib: the three figure types the report needs (overlaid
histograms, ROC curves, a per-block profile) are a few rectangles and polylines, the files
open in any browser and render on GitHub, and the training package gains no plotting
dependency. Output is deterministic for the same numbers, so re-running a report does not
churn the committed figures.
"""

from __future__ import annotations

import math
from html import escape

import numpy as np

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2",
           "#7f7f7f")
_W, _H = 640, 400
_M = {"left": 64, "right": 170, "top": 36, "bottom": 52}  # room for the legend on the right


def _nice_ticks(lo: float, hi: float, count: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step) * step
    return [round(first + i * step, 10) for i in range(int((hi - first) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    return f"{v:.4g}"


class _Axes:
    """A plotting area mapping data coordinates to SVG pixels, plus the SVG it collects."""

    def __init__(self, xlim, ylim, title, xlabel, ylabel, xticks=True, legend_gap=14):
        self.x0, self.x1 = xlim
        self.xticks, self.legend_gap = xticks, legend_gap
        self.y0, self.y1 = ylim
        self.parts: list[str] = []
        self.legend: list[tuple[str, str]] = []
        self.left, self.top = _M["left"], _M["top"]
        self.width = _W - _M["left"] - _M["right"]
        self.height = _H - _M["top"] - _M["bottom"]
        self._frame(title, xlabel, ylabel)

    def x(self, v: float) -> float:
        return self.left + (v - self.x0) / (self.x1 - self.x0) * self.width

    def y(self, v: float) -> float:
        return self.top + (1 - (v - self.y0) / (self.y1 - self.y0)) * self.height

    def _frame(self, title, xlabel, ylabel):
        p = self.parts
        bottom = self.top + self.height
        p.append(f'<text x="{_W / 2}" y="22" text-anchor="middle" font-size="15">'
                 f'{escape(title)}</text>')
        for t in _nice_ticks(self.x0, self.x1) if self.xticks else ():
            if self.x0 <= t <= self.x1:
                p.append(f'<line x1="{self.x(t):.1f}" y1="{bottom}" x2="{self.x(t):.1f}" '
                         f'y2="{bottom + 5}" stroke="#333"/><text x="{self.x(t):.1f}" '
                         f'y="{bottom + 18}" text-anchor="middle">{_fmt(t)}</text>')
        for t in _nice_ticks(self.y0, self.y1):
            if self.y0 <= t <= self.y1:
                p.append(f'<line x1="{self.left - 5}" y1="{self.y(t):.1f}" '
                         f'x2="{self.left + self.width}" '
                         f'y2="{self.y(t):.1f}" stroke="#e5e5e5"/><text x="{self.left - 8}" '
                         f'y="{self.y(t) + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
        p.append(f'<rect x="{self.left}" y="{self.top}" width="{self.width}" '
                 f'height="{self.height}" fill="none" stroke="#333"/>')
        p.append(f'<text x="{self.left + self.width / 2}" y="{_H - 12}" text-anchor="middle">'
                 f'{escape(xlabel)}</text>')
        p.append(f'<text transform="translate(16 {self.top + self.height / 2}) rotate(-90)" '
                 f'text-anchor="middle">{escape(ylabel)}</text>')

    def polyline(self, xs, ys, color, label=None, dash=False, width=2.0):
        pts = " ".join(f"{self.x(a):.1f},{self.y(b):.1f}" for a, b in zip(xs, ys, strict=True))
        extra = ' stroke-dasharray="5 4"' if dash else ""
        self.parts.append(f'<polyline points="{pts}" fill="none" stroke="{color}" '
                          f'stroke-width="{width}"{extra}/>')
        if label:
            self.legend.append((label, color))

    def svg(self) -> str:
        lx = self.left + self.width + self.legend_gap
        for i, (label, color) in enumerate(self.legend):
            y = self.top + 8 + 20 * i
            self.parts.append(f'<rect x="{lx}" y="{y - 9}" width="14" height="10" '
                              f'fill="{color}"/><text x="{lx + 20}" y="{y}">{escape(label)}</text>')
        body = "\n".join(self.parts)
        return (f'<svg xmlns="http://www.w3.org/2000/svg" width="{_W}" height="{_H}" '
                f'viewBox="0 0 {_W} {_H}" font-family="sans-serif" font-size="11">\n'
                f'<rect width="100%" height="100%" fill="white"/>\n{body}\n</svg>\n')


def histograms(series: dict[str, np.ndarray], title: str, xlabel: str, bins: int = 60,
               marker: tuple[str, float] | None = None) -> str:
    """Overlaid density histograms (step outlines, lightly filled), one per named series.

    ``marker`` draws a labelled vertical line, e.g. the calibrated threshold.
    """
    allv = np.concatenate([np.asarray(v, dtype=np.float64) for v in series.values()])
    lo, hi = np.quantile(allv, [0.001, 0.999])  # a few extreme scores must not squash the plot
    if marker is not None:
        lo, hi = min(lo, marker[1]), max(hi, marker[1])
    if hi <= lo:
        hi = lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    dens = {name: np.histogram(np.clip(v, lo, hi), bins=edges, density=True)[0]
            for name, v in series.items()}
    top = max(float(d.max()) for d in dens.values()) * 1.08 or 1.0
    ax = _Axes((lo, hi), (0.0, top), title, xlabel, "density")
    for (name, d), color in zip(dens.items(), PALETTE, strict=False):
        xs = np.repeat(edges, 2)[1:-1]
        ys = np.repeat(d, 2)
        pts = " ".join(f"{ax.x(a):.1f},{ax.y(b):.1f}" for a, b in zip(xs, ys, strict=True))
        base = f"{ax.x(edges[-1]):.1f},{ax.y(0):.1f} {ax.x(edges[0]):.1f},{ax.y(0):.1f}"
        ax.parts.append(f'<polygon points="{pts} {base}" fill="{color}" fill-opacity="0.18" '
                        f'stroke="{color}" stroke-width="1.5"/>')
        ax.legend.append((name, color))
    if marker is not None:
        label, value = marker
        ax.parts.append(f'<line x1="{ax.x(value):.1f}" y1="{ax.top}" x2="{ax.x(value):.1f}" '
                        f'y2="{ax.top + ax.height}" stroke="#000" stroke-dasharray="4 3"/>'
                        f'<text x="{ax.x(value) + 4:.1f}" y="{ax.top + 12}">{escape(label)}</text>')
    return ax.svg()


def roc_curves(curves: dict[str, tuple[np.ndarray, np.ndarray]], title: str) -> str:
    """ROC curves (FPR on x, TPR on y, ID positive) with the chance diagonal and TPR 95%."""
    ax = _Axes((0.0, 1.0), (0.0, 1.0), title, "false positive rate (OOD accepted)",
               "true positive rate (ID accepted)")
    ax.polyline([0, 1], [0, 1], "#999", dash=True, width=1)
    ax.polyline([0, 1], [0.95, 0.95], "#bbb", dash=True, width=1)
    for (name, (fpr, tpr)), color in zip(curves.items(), PALETTE, strict=False):
        ax.polyline(fpr, tpr, color, label=name)
    return ax.svg()


def block_profile(blocks: list[str], norm_ratio: dict[str, float], auroc: dict[str, float],
                  selected: str, ood_name: str) -> str:
    """NormRatio per block beside FeatureNorm AUROC per block (two y scales, same x).

    NormRatio is drawn on the left scale, AUROC (in %) on the right; the selected block is
    marked, so one can see whether the ratio's peak coincides with the AUROC's.
    """
    n = len(blocks)
    r = [norm_ratio[b] for b in blocks]
    a = [100 * auroc[b] for b in blocks]
    rlo, rhi = min(r), max(r)
    pad = (rhi - rlo) * 0.1 or 0.1
    ax = _Axes((-0.5, n - 0.5), (rlo - pad, rhi + pad),
               f"NormRatio vs FeatureNorm AUROC ({ood_name})", "block (selected in bold)",
               "NormRatio (mean FN(x) / FN(jigsaw x))", xticks=False, legend_gap=48)
    bottom = ax.top + ax.height
    for i, b in enumerate(blocks):
        weight = ' font-weight="bold"' if b == selected else ""
        ax.parts.append(f'<text x="{ax.x(i):.1f}" y="{bottom + 16}" text-anchor="middle"'
                        f' font-size="9"{weight}>{escape(b)}</text>')
    xs = list(range(n))
    ax.polyline(xs, r, PALETTE[0], label="NormRatio (left)")
    alo, ahi = min(a), max(a)
    apad = (ahi - alo) * 0.1 or 1.0
    # AUROC mapped onto the NormRatio axis range, with its own tick labels on the right.
    def to_left(v):
        return ax.y0 + (v - (alo - apad)) / ((ahi + apad) - (alo - apad)) * (ax.y1 - ax.y0)

    ax.polyline(xs, [to_left(v) for v in a], PALETTE[1], label="AUROC % (right)")
    for t in _nice_ticks(alo - apad, ahi + apad):
        if alo - apad <= t <= ahi + apad:
            ax.parts.append(f'<text x="{ax.left + ax.width + 6}" y="{ax.y(to_left(t)) + 4:.1f}" '
                            f'fill="{PALETTE[1]}">{_fmt(t)}</text>')
    sel = blocks.index(selected)
    ax.parts.append(f'<line x1="{ax.x(sel):.1f}" y1="{ax.top}" x2="{ax.x(sel):.1f}" '
                    f'y2="{bottom}" stroke="#000" stroke-dasharray="4 3"/>')
    for i in xs:
        ax.parts.append(f'<circle cx="{ax.x(i):.1f}" cy="{ax.y(r[i]):.1f}" r="3" '
                        f'fill="{PALETTE[0]}"/>'
                        f'<circle cx="{ax.x(i):.1f}" cy="{ax.y(to_left(a[i])):.1f}" r="3" '
                        f'fill="{PALETTE[1]}"/>')
    return ax.svg()
