"""A small hand-written SVG plotting module (no matplotlib).

Two chart kinds cover the reports: :func:`line_chart` (polylines with markers,
shaded confidence-band polygons, a legend) and :func:`bar_chart` (grouped bars
with optional error whiskers). Both return a standalone ``<svg>`` string that
can be written to a ``.svg`` file or inlined in HTML. All text goes through ``esc_svg``.
"""

from __future__ import annotations

import dataclasses
import hashlib
import math
from typing import Sequence

from robkd.report.escape import esc_svg

# colour-blind-safe palette (Okabe-Ito)
PALETTE = ["#0072B2", "#D55E00", "#009E73", "#CC79A7", "#E69F00", "#56B4E9", "#000000", "#F0E442"]
#: dash patterns that set series apart from a solid one drawn in the same colour
DASHES = ["6 3", "2 3", "8 3 2 3", "1 2"]
FONT = "font-family=\"Helvetica, Arial, sans-serif\""


@dataclasses.dataclass
class Series:
    """One curve: ``y[i]`` at ``x[i]`` (None = gap), optional band ``lo[i]..hi[i]``."""

    name: str
    x: Sequence[float]
    y: Sequence[float | None]
    lo: Sequence[float | None] | None = None
    hi: Sequence[float | None] | None = None
    color: str | None = None
    dash: str = ""
    width: float = 2.0
    markers: bool = True


@dataclasses.dataclass
class BarGroup:
    """One bar colour across categories: ``values[j]`` for category ``j`` (None = missing)."""

    name: str
    values: Sequence[float | None]
    err: Sequence[float | None] | None = None
    color: str | None = None


def _fmt(v: float) -> str:
    """Compact coordinate text."""
    return f"{v:.2f}".rstrip("0").rstrip(".") if math.isfinite(v) else "0"


def _finite(v: float | None) -> bool:
    return v is not None and isinstance(v, (int, float)) and math.isfinite(float(v))


def nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    """About ``n`` round tick values covering ``[lo, hi]`` (steps 1, 2, 2.5 or 5 x 10^k)."""
    if not (math.isfinite(lo) and math.isfinite(hi)):
        raise ValueError("tick range must be finite")
    if hi < lo:
        lo, hi = hi, lo
    if hi == lo:
        hi = lo + (abs(lo) if lo else 1.0)
    raw = (hi - lo) / max(n, 1)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw - 1e-12 * mag)
    start = math.floor(lo / step + 1e-9) * step
    ticks = []
    k = 0
    while True:
        t = start + k * step
        if t > hi + step * 1e-9:
            break
        if t >= lo - step * 1e-9:
            ticks.append(round(t, 12))
        k += 1
    return ticks


def _tick_label(v: float) -> str:
    return f"{v:g}"


class _Frame:
    """Maps data coordinates into the plotting rectangle."""

    def __init__(self, width: int, height: int, left: int, right: int, top: int, bottom: int,
                 xlim: tuple[float, float], ylim: tuple[float, float]) -> None:
        self.x0, self.x1 = left, width - right
        self.y0, self.y1 = height - bottom, top
        self.xlim, self.ylim = xlim, ylim

    def px(self, x: float) -> float:
        a, b = self.xlim
        return self.x0 + (x - a) / ((b - a) or 1.0) * (self.x1 - self.x0)

    def py(self, y: float) -> float:
        a, b = self.ylim
        return self.y0 + (y - a) / ((b - a) or 1.0) * (self.y1 - self.y0)


def _axes(f: _Frame, xticks: list[tuple[float, str]], yticks: list[tuple[float, str]],
          xlabel: str, ylabel: str, height: int) -> list[str]:
    out = [f'<rect x="{_fmt(f.x0)}" y="{_fmt(f.y1)}" width="{_fmt(f.x1 - f.x0)}" '
           f'height="{_fmt(f.y0 - f.y1)}" fill="#ffffff" stroke="#888888" stroke-width="1"/>']
    for v, lab in yticks:
        y = f.py(v)
        out.append(f'<line x1="{_fmt(f.x0)}" y1="{_fmt(y)}" x2="{_fmt(f.x1)}" y2="{_fmt(y)}" stroke="#e3e3e3" stroke-width="1"/>')
        out.append(f'<text x="{_fmt(f.x0 - 6)}" y="{_fmt(y + 4)}" text-anchor="end" font-size="11" fill="#333333">{esc_svg(lab)}</text>')
    for v, lab in xticks:
        x = f.px(v)
        out.append(f'<line x1="{_fmt(x)}" y1="{_fmt(f.y0)}" x2="{_fmt(x)}" y2="{_fmt(f.y0 + 4)}" stroke="#888888" stroke-width="1"/>')
        out.append(f'<text x="{_fmt(x)}" y="{_fmt(f.y0 + 17)}" text-anchor="middle" font-size="11" fill="#333333">{esc_svg(lab)}</text>')
    if xlabel:
        out.append(f'<text x="{_fmt((f.x0 + f.x1) / 2)}" y="{_fmt(f.y0 + 34)}" text-anchor="middle" font-size="12" fill="#222222">{esc_svg(xlabel)}</text>')
    if ylabel:
        cy = (f.y0 + f.y1) / 2
        out.append(f'<text x="14" y="{_fmt(cy)}" text-anchor="middle" font-size="12" fill="#222222" '
                   f'transform="rotate(-90 14 {_fmt(cy)})">{esc_svg(ylabel)}</text>')
    return out


def _legend(entries: list[tuple[str, str, str, str]], x0: float, y0: float, width: float) -> tuple[list[str], float]:
    """Legend rows of (name, colour, dash, kind); returns (elements, height used)."""
    out: list[str] = []
    x, y = x0, y0
    row_h = 18
    for name, color, dash, kind in entries:
        w = 34 + 6.6 * len(name) + 14
        if x + w > x0 + width and x > x0:
            x, y = x0, y + row_h
        if kind == "bar":
            out.append(f'<rect x="{_fmt(x)}" y="{_fmt(y - 9)}" width="22" height="10" fill="{color}"/>')
        else:
            d = f' stroke-dasharray="{dash}"' if dash else ""
            out.append(f'<line x1="{_fmt(x)}" y1="{_fmt(y - 4)}" x2="{_fmt(x + 24)}" y2="{_fmt(y - 4)}" stroke="{color}" stroke-width="2.5"{d}/>')
        out.append(f'<text x="{_fmt(x + 30)}" y="{_fmt(y)}" font-size="11" fill="#222222">{esc_svg(name)}</text>')
        x += w
    return out, (y - y0) + row_h if entries else 0.0


def _open(width: int, height: int, title: str, desc: str) -> list[str]:
    return [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
        f'viewBox="0 0 {width} {height}" role="img" {FONT}>',
        f"<title>{esc_svg(title)}</title>",
        f"<desc>{esc_svg(desc or title)}</desc>",
        f'<rect width="{width}" height="{height}" fill="#ffffff"/>',
        f'<text x="{width / 2:.1f}" y="18" text-anchor="middle" font-size="14" font-weight="bold" fill="#111111">{esc_svg(title)}</text>',
    ]


def line_chart(series: Sequence[Series], *, title: str = "", xlabel: str = "", ylabel: str = "",
               xticks: Sequence[tuple[float, str]] | None = None, ylim: tuple[float, float] | None = None,
               yfmt: str = "{:g}", width: int = 640, height: int = 360, desc: str = "") -> str:
    """Polylines with markers and shaded bands; returns an ``<svg>`` document string.

    ``xticks`` gives explicit (value, label) ticks (e.g. radii as ``8/255``);
    otherwise round ticks are chosen. ``ylim`` fixes the y range.
    """
    xs = [float(v) for s in series for v in s.x if _finite(v)]
    ys = [float(v) for s in series for seq in (s.y, s.lo or [], s.hi or []) for v in seq if _finite(v)]
    if ylim is None:
        lo, hi = (min(ys), max(ys)) if ys else (0.0, 1.0)
        pad = (hi - lo) * 0.05 or 0.5
        ylim = (lo - pad, hi + pad)
    if xticks:
        xs += [float(v) for v, _ in xticks]
    xlim = (min(xs), max(xs)) if xs else (0.0, 1.0)
    if xlim[0] == xlim[1]:
        xlim = (xlim[0] - 0.5, xlim[1] + 0.5)
    xspan = xlim[1] - xlim[0]
    xlim = (xlim[0] - 0.03 * xspan, xlim[1] + 0.03 * xspan)

    entries = [(s.name, s.color or PALETTE[i % len(PALETTE)], s.dash, "line") for i, s in enumerate(series)]
    legend_probe, legend_h = _legend(entries, 56, 0, width - 72)
    bottom = 48 + int(legend_h) + 6
    total_h = height + int(legend_h)
    f = _Frame(width, total_h, 62, 16, 30, bottom, xlim, ylim)
    yt = [(t, yfmt.format(t)) for t in nice_ticks(*ylim) if ylim[0] - 1e-9 <= t <= ylim[1] + 1e-9]
    xt = list(xticks) if xticks else [(t, _tick_label(t)) for t in nice_ticks(*xlim) if xlim[0] <= t <= xlim[1]]
    out = _open(width, total_h, title, desc)
    out += _axes(f, xt, yt, xlabel, ylabel, total_h)
    geom = f"{title}|{f.x0}|{f.x1}|{f.y0}|{f.y1}"
    clip_id = "clip" + hashlib.sha1(geom.encode("utf-8")).hexdigest()[:10]
    out.append(f'<defs><clipPath id="{clip_id}"><rect x="{_fmt(f.x0)}" y="{_fmt(f.y1)}" '
               f'width="{_fmt(f.x1 - f.x0)}" height="{_fmt(f.y0 - f.y1)}"/></clipPath></defs>')
    out.append(f'<g clip-path="url(#{clip_id})">')
    # bands first (below all lines)
    for (name, color, _, _), s in zip(entries, series):
        if s.lo is None or s.hi is None:
            continue
        for seg in _segments(s.x, s.lo, s.hi):
            pts = [(f.px(x), f.py(h)) for x, _, h in seg] + [(f.px(x), f.py(l)) for x, l, _ in reversed(seg)]
            if len(seg) == 1:  # a single point: a short vertical bar instead of a polygon
                x, l, h = seg[0]
                out.append(f'<line x1="{_fmt(f.px(x))}" y1="{_fmt(f.py(l))}" x2="{_fmt(f.px(x))}" y2="{_fmt(f.py(h))}" '
                           f'stroke="{color}" stroke-opacity="0.35" stroke-width="8"/>')
                continue
            out.append(f'<polygon class="band" points="{" ".join(f"{_fmt(a)},{_fmt(b)}" for a, b in pts)}" '
                       f'fill="{color}" fill-opacity="0.16" stroke="none"/>')
    for (name, color, dash, _), s in zip(entries, series):
        d = f' stroke-dasharray="{dash}"' if dash else ""
        for seg in _segments(s.x, s.y):
            pts = " ".join(f"{_fmt(f.px(x))},{_fmt(f.py(y))}" for x, y in seg)
            if len(seg) > 1:
                out.append(f'<polyline points="{pts}" fill="none" stroke="{color}" stroke-width="{s.width}"'
                           f' stroke-linejoin="round"{d}/>')
        if s.markers:
            for i, (x, y) in enumerate(zip(s.x, s.y)):
                if _finite(x) and _finite(y):
                    tip = f"{s.name}: {yfmt.format(float(y))}"
                    if s.lo is not None and s.hi is not None and _finite(s.lo[i]) and _finite(s.hi[i]):
                        tip += f" [{yfmt.format(float(s.lo[i]))}, {yfmt.format(float(s.hi[i]))}]"
                    out.append(f'<circle cx="{_fmt(f.px(float(x)))}" cy="{_fmt(f.py(float(y)))}" r="3" fill="{color}">'
                               f"<title>{esc_svg(tip)}</title></circle>")
    out.append("</g>")
    legend, _ = _legend(entries, f.x0, f.y0 + 52, width - f.x0 - 16)
    out += legend
    out.append("</svg>")
    return "\n".join(out)


def _segments(x: Sequence[float], *cols: Sequence[float | None]) -> list[list[tuple[float, ...]]]:
    """Split rows ``(x, *cols)`` into runs where every value is finite."""
    segs: list[list[tuple[float, ...]]] = []
    cur: list[tuple[float, ...]] = []
    for row in zip(x, *cols):
        if all(_finite(v) for v in row):
            cur.append(tuple(float(v) for v in row))  # type: ignore[arg-type]
        elif cur:
            segs.append(cur)
            cur = []
    if cur:
        segs.append(cur)
    return segs


def bar_chart(categories: Sequence[str], groups: Sequence[BarGroup], *, title: str = "", ylabel: str = "",
              yfmt: str = "{:g}", width: int = 640, height: int = 320, log: bool = False, desc: str = "",
              value_labels: bool = True, label_fmt: str = "{:.3g}", tick_max: float | None = None) -> str:
    """Grouped bars (one colour per group) with optional error whiskers; returns ``<svg>``.

    ``log`` uses a log10 y axis (non-positive values are drawn as missing). The y axis leaves headroom
    above the tallest bar (or whisker) and, with ``value_labels``, each bar carries its value
    (``label_fmt``) above it (turned upright when the bars are too narrow for the text). ``tick_max`` hides
    y ticks above it (an accuracy axis keeps its headroom without a 120% tick).
    """
    vals = []
    for g in groups:
        for j, v in enumerate(g.values):
            if _finite(v):
                e = float(g.err[j]) if g.err is not None and _finite(g.err[j]) else 0.0
                vals.append(float(v) + e)
                vals.append(float(v))
    n = max(len(categories), 1)
    plot_w = width - 62 - 16
    bw = plot_w / n * 0.8 / max(len(groups), 1)
    texts = [label_fmt.format(float(v)) for g in groups for v in g.values if _finite(v)] if value_labels else []
    upright = bool(texts) and max(len(t) for t in texts) * 6.2 + 2 > bw * 0.92
    room = (0.22 if upright else 0.12) if texts else 0.06  # share of the axis left free above the tallest bar
    if log:
        pos = [v for v in vals if v > 0]
        lo_e = math.floor(math.log10(min(pos)) - 0.1) if pos else -3
        top_e = math.log10(max(pos)) if pos else 0.0
        top = max(top_e + room / (1 - room) * (top_e - lo_e), float(math.ceil(top_e)), lo_e + 1.0)
        ylim = (float(lo_e), top)
        yt = [(float(k), f"1e{k}") for k in range(lo_e, math.floor(top + 1e-9) + 1)]
    else:
        top = max(vals) if vals else 1.0
        bot = min(0.0, min(vals) if vals else 0.0)
        if top <= bot:
            top = bot + 1.0
        top = top + room / (1 - room) * (top - bot)
        ticks = nice_ticks(bot, top)
        ylim = (min(ticks[0], bot), max(ticks[-1], top))
        yt = [(t, yfmt.format(t)) for t in ticks if tick_max is None or t <= tick_max + 1e-9]

    def tr(v: float) -> float:
        return math.log10(v) if log else v

    entries = [(g.name, g.color or PALETTE[i % len(PALETTE)], "", "bar") for i, g in enumerate(groups)]
    _, legend_h = _legend(entries, 56, 0, width - 72)
    total_h = height + int(legend_h)
    bottom = 48 + int(legend_h) + 6
    f = _Frame(width, total_h, 62, 16, 30, bottom, (0.0, float(n)), ylim)
    out = _open(width, total_h, title, desc)
    out += _axes(f, [(j + 0.5, c) for j, c in enumerate(categories)], yt, "", ylabel, total_h)
    slot = (f.x1 - f.x0) / n
    bw = slot * 0.8 / max(len(groups), 1)
    base = f.py(ylim[0] if log else max(ylim[0], 0.0))
    for gi, ((name, color, _, _), g) in enumerate(zip(entries, groups)):
        for j, v in enumerate(g.values):
            if not _finite(v) or (log and float(v) <= 0):
                continue
            x = f.x0 + j * slot + slot * 0.1 + gi * bw
            y = f.py(tr(float(v)))
            top, h = min(y, base), abs(base - y)
            tip = f"{g.name} / {categories[j]}: {yfmt.format(float(v))}"
            out.append(f'<rect x="{_fmt(x)}" y="{_fmt(top)}" width="{_fmt(bw * 0.92)}" height="{_fmt(h)}" fill="{color}">'
                       f"<title>{esc_svg(tip)}</title></rect>")
            cx = x + bw * 0.46
            label_y = top if y <= base else top + h
            if g.err is not None and _finite(g.err[j]) and float(g.err[j]) > 0:
                e = float(g.err[j])
                lo_v, hi_v = float(v) - e, float(v) + e
                if log and lo_v <= 0:
                    lo_v = 10 ** ylim[0]
                y_lo, y_hi = f.py(tr(lo_v)), f.py(tr(hi_v))
                out.append(f'<line x1="{_fmt(cx)}" y1="{_fmt(y_lo)}" x2="{_fmt(cx)}" y2="{_fmt(y_hi)}" stroke="#222222" stroke-width="1.2"/>')
                for yy in (y_lo, y_hi):
                    out.append(f'<line x1="{_fmt(cx - 4)}" y1="{_fmt(yy)}" x2="{_fmt(cx + 4)}" y2="{_fmt(yy)}" stroke="#222222" stroke-width="1.2"/>')
                label_y = min(label_y, y_hi) if y <= base else max(label_y, y_lo)
            if value_labels:
                out.append(_bar_label(label_fmt.format(float(v)), cx, label_y, below=y > base, upright=upright))
    legend, _ = _legend(entries, f.x0, f.y0 + 40, width - f.x0 - 16)
    out += legend
    out.append("</svg>")
    return "\n".join(out)


def _bar_label(text: str, cx: float, y: float, *, below: bool, upright: bool) -> str:
    """A bar's value written just above its top (below it for a negative bar); ``upright``: read bottom-up."""
    if upright:
        yy = y + 4 if below else y - 4
        anchor = "end" if below else "start"
        return (f'<text class="bar-value" x="{_fmt(cx + 3.5)}" y="{_fmt(yy)}" text-anchor="{anchor}" font-size="10" fill="#222222" '
                f'transform="rotate(-90 {_fmt(cx + 3.5)} {_fmt(yy)})">{esc_svg(text)}</text>')
    yy = y + 12 if below else y - 4
    return f'<text class="bar-value" x="{_fmt(cx)}" y="{_fmt(yy)}" text-anchor="middle" font-size="10" fill="#222222">{esc_svg(text)}</text>'
