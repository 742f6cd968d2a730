"""Charts as inline SVG text, drawn straight from the numbers.

The reports (`curator audit`, `curator compare`, `curator evaluate`) are single HTML files that open
offline, so their charts are SVG in the page. They used to be matplotlib's: its import and layout took
1.1–1.3 s of a 2-million-document audit whose analyses take 4 (and a second of every small one), for
five kinds of chart that need none of its generality. Here they are a few hundred lines of pure
functions: numbers in, an `<svg>` string out, every mark carrying its value as a tooltip (`<title>`).

  bars           vertical grouped bars over categories (one panel; `stack` puts panels in one figure)
  horizontal     horizontal grouped bars, one row per category
  lines          lines over a linear or log x axis
  heatmap        a matrix as a pixel image (PNG inside the SVG) with group separators and a colour bar

Text is sized in pixels and its width estimated (CHAR_WIDTH per character), which is what a layout
needs to leave room for labels without a font engine.
"""

from __future__ import annotations

import base64
import html
import math
import struct
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np

PALETTE = ["#3366cc", "#dc3912", "#ff9900", "#109618", "#990099", "#0099c6", "#dd4477", "#66aa00", "#b82e2e",
           "#316395"]
FONT = 11                      # pixels
CHAR_WIDTH = 0.6 * FONT        # a sans-serif character's typical width, for room around labels
LABEL_CHARS = 32               # longer category labels are cut on the axis (whole in the tooltips)
MIN_PLOT = 120                 # pixels of plotting area a chart keeps, whatever its labels take
AXIS_COLOR = "#555"
GRID_COLOR = "#e2e6ea"
# ColorBrewer's RdBu (11 classes), reversed: -1 deep blue, 0 near white, +1 deep red.
DIVERGING = ["#053061", "#2166ac", "#4393c3", "#92c5de", "#d1e5f0", "#f7f7f7", "#fddbc7", "#f4a582", "#d6604d",
             "#b2182b", "#67001f"]

Format = Callable[[float], str]


@dataclass
class Series:
    """One named set of values: a bar per category, or a line through (x, y) points."""
    name: str
    values: Sequence[float]
    color: str
    x: Sequence[float] | None = None      # lines only
    opacity: float = 1.0
    width: float = 1.8                    # lines only: stroke width
    markers: bool = False                 # lines only: a dot at each point
    legend: bool = True


def number(value: float) -> str:
    """A short label: 3 significant digits, thousands separated, no trailing zeros."""
    if value == 0:
        return "0"
    if abs(value) >= 1000:
        return f"{value:,.0f}"
    return f"{value:.3g}"


def percent(value: float) -> str:
    return f"{value:.0%}" if abs(value) >= 0.1 or value == 0 else f"{value:.1%}"


def nice_ticks(low: float, high: float, count: int = 5) -> list[float]:
    """About `count` round values (1, 2, 2.5 or 5 × a power of ten apart) covering [low, high]."""
    if not (math.isfinite(low) and math.isfinite(high)):
        return [0.0]
    if high <= low:
        high = low + (abs(low) or 1.0)
    raw = (high - low) / max(1, count)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw)
    first, last = math.floor(low / step + 1e-9), math.ceil(high / step - 1e-9)
    return [round(i * step, 12) for i in range(first, last + 1)]


def log_ticks(low: float, high: float) -> list[float]:
    """1, 2 and 5 × powers of ten inside [low, high] (both > 0); just the powers when those are many."""
    powers = range(math.floor(math.log10(low)), math.ceil(math.log10(high)) + 1)
    steps = (1,) if len(powers) > 4 else (1, 2, 5)
    ticks = [m * 10.0 ** p for p in powers for m in steps if low <= m * 10.0 ** p <= high * (1 + 1e-9)]
    return ticks if len(ticks) >= 2 else [low, high]


def _text(x: float, y: float, text: str, anchor: str = "start", size: int = FONT, rotate: float = 0,
          color: str = "#1d2327", weight: str = "normal") -> str:
    turn = f' transform="rotate({rotate:g} {x:.1f} {y:.1f})"' if rotate else ""
    bold = ' font-weight="bold"' if weight != "normal" else ""
    return (f'<text x="{x:.1f}" y="{y:.1f}" font-size="{size}" text-anchor="{anchor}" fill="{color}"{bold}'
            f'{turn}>{html.escape(text)}</text>')


def _tip(text: str | None) -> str:
    return f"<title>{html.escape(text)}</title>" if text else ""


def _rect(x: float, y: float, width: float, height: float, color: str, opacity: float = 1.0,
          tip: str | None = None) -> str:
    fade = f' fill-opacity="{opacity:g}"' if opacity < 1 else ""
    return (f'<rect x="{x:.2f}" y="{y:.2f}" width="{max(width, 0):.2f}" height="{max(height, 0):.2f}" '
            f'fill="{color}"{fade}>{_tip(tip)}</rect>')


def _line(x1: float, y1: float, x2: float, y2: float, color: str = AXIS_COLOR, width: float = 1,
          dash: str | None = None) -> str:
    dashed = f' stroke-dasharray="{dash}"' if dash else ""
    return (f'<line x1="{x1:.1f}" y1="{y1:.1f}" x2="{x2:.1f}" y2="{y2:.1f}" stroke="{color}" '
            f'stroke-width="{width:g}"{dashed}/>')


def _label_width(labels: Sequence[str], size: int = FONT) -> float:
    return max((len(s) for s in labels), default=0) * CHAR_WIDTH * size / FONT


def short(label: str, most: int = LABEL_CHARS) -> str:
    """An axis label cut to `most` characters (the mark's tooltip keeps it whole)."""
    return label if len(label) <= most else label[:most - 1] + "…"


def svg(width: float, height: float, body: str, title: str | None = None) -> str:
    """A standalone `<svg>` element (it scales with its container: the size is its viewBox)."""
    label = f' aria-label="{html.escape(title)}"' if title else ""
    return (f'<svg xmlns="http://www.w3.org/2000/svg" xmlns:xlink="http://www.w3.org/1999/xlink" '
            f'viewBox="0 0 {width:.0f} {height:.0f}" '
            f'width="{width:.0f}" height="{height:.0f}" font-family="system-ui, sans-serif" role="img"'
            f'{label}>{body}</svg>')


@dataclass
class Frame:
    """A plotting area at (left, top), `width` × `height` pixels, with its data ranges: positions in data
    units become pixels through `x` and `y` (x on a log10 scale when `x_log`)."""
    left: float
    top: float
    width: float
    height: float
    x_range: tuple[float, float]
    y_range: tuple[float, float]
    x_log: bool = False
    parts: list[str] = field(default_factory=list)

    def x(self, value: float) -> float:
        low, high = self.x_range
        if self.x_log:
            value, low, high = math.log10(value), math.log10(low), math.log10(high)
        return self.left + (value - low) / ((high - low) or 1) * self.width

    def y(self, value: float) -> float:
        low, high = self.y_range
        return self.top + self.height - (value - low) / ((high - low) or 1) * self.height

    def y_axis(self, ticks: Sequence[float], fmt: Format, label: str | None = None, grid: bool = True) -> None:
        for tick in ticks:
            y = self.y(tick)
            if grid:
                self.parts.append(_line(self.left, y, self.left + self.width, y, GRID_COLOR))
            self.parts.append(_text(self.left - 5, y + FONT * 0.35, fmt(tick), "end"))
        self.parts.append(_line(self.left, self.top, self.left, self.top + self.height))
        if label:
            room = _label_width([fmt(t) for t in ticks]) + 12
            x, y = self.left - room - 4, self.top + self.height / 2
            self.parts.append(_text(x, y, label, "middle", rotate=-90))

    def x_axis(self, ticks: Sequence[tuple[float, str]], label: str | None = None, rotate: float = 0) -> float:
        """Ticks (position, text) under the area; returns the height the labels take below it."""
        base = self.top + self.height
        self.parts.append(_line(self.left, base, self.left + self.width, base))
        for value, text in ticks:
            x = self.x(value)
            self.parts.append(_line(x, base, x, base + 4))
            if rotate:
                self.parts.append(_text(x + 3, base + 12, text, "end", rotate=-rotate))
            else:
                self.parts.append(_text(x, base + 16, text, "middle"))
        below = (_label_width([t for _, t in ticks]) * math.sin(math.radians(rotate)) + 18) if rotate else 20
        if label:
            self.parts.append(_text(self.left + self.width / 2, base + below + 14, label, "middle"))
            below += 18
        return below

    def hline(self, value: float, color: str = AXIS_COLOR, dash: str | None = "4 3") -> None:
        y = self.y(value)
        self.parts.append(_line(self.left, y, self.left + self.width, y, color, 0.8, dash))

    def body(self) -> str:
        return "".join(self.parts)


def _legend(series: Sequence[Series], x: float, y: float, width: float) -> tuple[str, float]:
    """Swatches and names in rows that fit `width`, starting at (x, y); returns the SVG and its height."""
    parts, at, row = [], x, 0
    for s in (s for s in series if s.legend):
        room = 18 + len(s.name) * CHAR_WIDTH + 14
        if at > x and at + room > x + width:
            at, row = x, row + 1
        top = y + row * 18
        fade = f' fill-opacity="{s.opacity:g}"' if s.opacity < 1 else ""
        parts.append(f'<rect x="{at:.1f}" y="{top:.1f}" width="12" height="12" fill="{s.color}"{fade}/>')
        parts.append(_text(at + 17, top + 10, s.name))
        at += room
    return "".join(parts), (row + 1) * 18 if parts else 0


def _value_range(values: Sequence[float], floor: float | None = 0.0) -> tuple[float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    low = min(finite, default=0.0)
    high = max(finite, default=1.0)
    if floor is not None:
        low, high = min(low, floor), max(high, floor)
    if high == low:
        high = low + 1.0
    return low, high


@dataclass
class Panel:
    """A chart without its `<svg>` wrapper: its SVG body, its size, and the series for a shared legend."""
    body: str
    width: float
    height: float
    series: list[Series]


def bars(categories: Sequence[str], series: Sequence[Series], *, width: float = 760, height: float = 220,
         y_label: str | None = None, fmt: Format = number, title: str | None = None,
         reference: float | None = None, rotate: float = 0, legend: bool = True) -> Panel:
    """Vertical bars: for each category a group with one bar per series (in order); `reference` draws a
    dashed line at that value."""
    values = [v for s in series for v in s.values]
    low, high = _value_range(values + ([reference] if reference is not None else []))
    ticks = nice_ticks(low, high)
    tick_room = _label_width([fmt(t) for t in ticks])
    left = tick_room + (34 if y_label else 16)
    top = 24 if title else 8
    labels = [short(c) for c in categories]
    below = (_label_width(labels) * math.sin(math.radians(rotate)) + 22) if rotate else 22
    legend_svg, legend_height = _legend(series, left, 0, width - left - 8) if legend else ("", 0)
    height = max(height, top + below + legend_height + 6 + MIN_PLOT)      # room for long labels
    frame = Frame(left, top, width - left - 8, height - top - below - legend_height - 6,
                  (0, len(categories)), (ticks[0], ticks[-1]))
    frame.y_axis(ticks, fmt, y_label)
    group = 0.8 / max(1, len(series))
    for i, category in enumerate(categories):
        for j, s in enumerate(series):
            value = s.values[i]
            if value is None or not math.isfinite(value):
                continue
            x = frame.x(i + 0.1 + j * group)
            y0, y1 = frame.y(max(value, 0)), frame.y(min(value, 0))
            frame.parts.append(_rect(x, y0, frame.x(group) - frame.x(0) - 1, y1 - y0, s.color, s.opacity,
                                     f"{category} · {s.name}: {fmt(value)}"))
    if reference is not None:
        frame.hline(reference)
    if low < 0 < high:
        frame.hline(0, AXIS_COLOR, None)
    frame.x_axis([(i + 0.5, c) for i, c in enumerate(labels)], rotate=rotate)
    parts = [frame.body()]
    if title:
        parts.append(_text(left, 14, title, weight="bold"))
    if legend_svg:
        parts.append(f'<g transform="translate(0 {height - legend_height:.1f})">{legend_svg}</g>')
    return Panel("".join(parts), width, height, list(series))


def horizontal(categories: Sequence[str], series: Sequence[Series], *, width: float = 760,
               fmt: Format = percent, x_label: str | None = None, row_height: float = 30) -> str:
    """Horizontal bars: a row per category (top to bottom), one bar per series in it; the legend below."""
    labels = [short(c) for c in categories]
    left = _label_width(labels) + 14
    values = [v for s in series for v in s.values]
    low, high = _value_range(values)
    ticks = nice_ticks(low, high, 6)
    legend_svg, legend_height = _legend(series, left, 0, width - left - 8)
    plot_height = row_height * len(categories)
    height = 8 + plot_height + 22 + (18 if x_label else 0) + 8 + legend_height
    frame = Frame(left, 8, width - left - 24, plot_height, (ticks[0], ticks[-1]), (len(categories), 0))
    for tick in ticks:
        x = frame.x(tick)
        frame.parts.append(_line(x, frame.top, x, frame.top + plot_height, GRID_COLOR))
    band = 0.8 / max(1, len(series))
    for i, category in enumerate(categories):
        frame.parts.append(_text(left - 6, frame.y(i + 0.5) + FONT * 0.35, labels[i], "end"))
        for j, s in enumerate(series):
            value = s.values[i]
            y = frame.y(i + 0.1 + j * band)
            frame.parts.append(_rect(frame.x(0), y, frame.x(value) - frame.x(0), frame.y(band) - frame.y(0) - 1,
                                     s.color, s.opacity, f"{category} · {s.name}: {fmt(value)}"))
    frame.x_axis([(t, fmt(t)) for t in ticks], x_label)
    frame.parts.append(_line(frame.left, frame.top, frame.left, frame.top + plot_height))
    body = frame.body() + f'<g transform="translate(0 {height - legend_height:.1f})">{legend_svg}</g>'
    return svg(width, height, body)


def lines(series: Sequence[Series], *, width: float = 700, height: float = 300, x_log: bool = False,
          x_ticks: Sequence[tuple[float, str]] | None = None, x_label: str | None = None,
          y_label: str | None = None, y_fmt: Format = number, x_fmt: Format = number,
          reference: float | None = None) -> str:
    """Lines through each series' (x, y) points, in order; markers where a series asks for them."""
    xs = [x for s in series for x in s.x or ()]
    ys = [y for s in series for y in s.values]
    y_low, y_high = _value_range(ys + ([reference] if reference is not None else []), floor=None)
    pad = (y_high - y_low) * 0.05          # room around the lines, but not below zero for positive values
    bottom = 0.0 if y_low >= 0 > y_low - pad else y_low - pad
    y_ticks = nice_ticks(bottom, y_high + pad)
    x_low, x_high = (min(xs), max(xs)) if xs else (0.0, 1.0)
    if x_high == x_low:
        x_high = x_low * 2 if x_log else x_low + 1
    if x_ticks is None:
        values = log_ticks(x_low, x_high) if x_log else nice_ticks(x_low, x_high, 6)
        x_ticks = [(t, x_fmt(t)) for t in values if x_low <= t <= x_high]
    left = _label_width([y_fmt(t) for t in y_ticks]) + (34 if y_label else 16)
    legend_svg, legend_height = _legend(series, left, 0, width - left - 8)
    frame = Frame(left, 10, width - left - 16, height - 10 - 22 - (18 if x_label else 0) - 8 - legend_height,
                  (x_low, x_high), (y_ticks[0], y_ticks[-1]), x_log)
    frame.y_axis(y_ticks, y_fmt, y_label)
    if reference is not None:
        frame.hline(reference)
    for s in series:
        fade = f' stroke-opacity="{s.opacity:g}"' if s.opacity < 1 else ""
        runs, run = [], []           # a missing value (None, NaN) breaks the line: runs of points on each side
        for vx, vy in zip(s.x or (), s.values, strict=True):
            if vy is None or not math.isfinite(vy):
                if run:
                    runs.append(run)
                run = []
                continue
            run.append((vx, vy))
        if run:
            runs.append(run)
        for run in runs:
            path = " ".join(f"{frame.x(vx):.1f},{frame.y(vy):.1f}" for vx, vy in run)
            frame.parts.append(f'<polyline points="{path}" fill="none" stroke="{s.color}" '
                               f'stroke-width="{s.width:g}"{fade}>{_tip(s.name)}</polyline>')
            if s.markers:
                for vx, vy in run:
                    frame.parts.append(f'<circle cx="{frame.x(vx):.1f}" cy="{frame.y(vy):.1f}" r="3" '
                                       f'fill="{s.color}">{_tip(f"{s.name}: {x_fmt(vx)}, {y_fmt(vy)}")}</circle>')
    frame.x_axis(x_ticks, x_label)
    body = frame.body() + f'<g transform="translate(0 {height - legend_height:.1f})">{legend_svg}</g>'
    return svg(width, height, body)


def stack(panels: Sequence[Panel], legend: bool = True) -> str:
    """Panels one above the other in one figure, with one legend (the first panel's series) below."""
    width = max(p.width for p in panels)
    parts, top = [], 0.0
    for panel in panels:
        parts.append(f'<g transform="translate(0 {top:.1f})">{panel.body}</g>')
        top += panel.height
    if legend and panels:
        legend_svg, legend_height = _legend(panels[0].series, 40, top + 6, width - 48)
        parts.append(legend_svg)
        top += legend_height + 10
    return svg(width, top, "".join(parts))


def colors(values: np.ndarray, low: float = -1.0, high: float = 1.0, stops: Sequence[str] = DIVERGING,
           missing: tuple[int, int, int] = (200, 200, 200)) -> np.ndarray:
    """Each value's colour on the scale through `stops` (evenly spaced from `low` to `high`), as uint8 RGB;
    values outside are clipped, NaN is grey."""
    anchors = np.array([[int(c[i:i + 2], 16) for i in (1, 3, 5)] for c in stops], dtype=np.float64)
    values = np.asarray(values, dtype=np.float64)
    at = (np.clip(np.nan_to_num(values, nan=low), low, high) - low) / (high - low) * (len(stops) - 1)
    below = np.minimum(np.floor(at).astype(np.int64), len(stops) - 2)
    share = (at - below)[..., None]
    rgb = anchors[below] * (1 - share) + anchors[below + 1] * share
    rgb[np.isnan(values)] = missing
    return np.rint(rgb).astype(np.uint8)


def png(rgb: np.ndarray) -> bytes:
    """An 8-bit RGB PNG of an (height, width, 3) uint8 array: signature, header, one zlib stream of
    unfiltered rows, end."""
    height, width, _ = rgb.shape
    rows = np.zeros((height, 1 + 3 * width), dtype=np.uint8)        # each row: filter type 0, then pixels
    rows[:, 1:] = rgb.reshape(height, 3 * width)

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(rows.tobytes(), 9)) + chunk(b"IEND", b""))


def heatmap(matrix: np.ndarray, groups: Sequence[str], *, label: str = "", size: float = 520,
            low: float = -1.0, high: float = 1.0) -> str:
    """A square matrix as pixels (one per cell, scaled up sharply), rows and columns in the order given;
    `groups` names each row's group, and consecutive runs of a group are separated by lines and labelled
    at their middle. A colour bar from `low` to `high` on the right."""
    n = len(matrix)
    starts = [i for i in range(n) if i == 0 or groups[i] != groups[i - 1]]
    ends = [*starts[1:], n]
    names = [groups[s] for s in starts]
    left = _label_width(names) + 14
    below = _label_width(names) * math.sin(math.radians(30)) + 24
    pixels = png(colors(matrix, low, high))
    image = base64.b64encode(pixels).decode("ascii")
    scale_id = f"scale-{zlib.crc32(pixels):08x}"      # one gradient id per heatmap: ids are page-wide
    cell = size / max(1, n)
    parts = [f'<image x="{left:.1f}" y="8" width="{size:.1f}" height="{size:.1f}" preserveAspectRatio="none" '
             f'style="image-rendering:pixelated" href="data:image/png;base64,{image}" '
             f'xlink:href="data:image/png;base64,{image}"/>']
    for b in starts[1:]:
        parts.append(_line(left + b * cell, 8, left + b * cell, 8 + size, "#000"))
        parts.append(_line(left, 8 + b * cell, left + size, 8 + b * cell, "#000"))
    for s, e, name in zip(starts, ends, names, strict=True):
        middle = (s + e) / 2 * cell
        parts.append(_text(left - 6, 8 + middle + FONT * 0.35, name, "end"))
        parts.append(_text(left + middle + 3, 8 + size + 12, name, "end", rotate=-30))
    # the colour bar: a vertical gradient through the stops, high at the top
    bar_x, bar_top, bar_height = left + size + 24, 8 + size * 0.1, size * 0.8
    stops = "".join(f'<stop offset="{i / (len(DIVERGING) - 1):.3f}" stop-color="{c}"/>'
                    for i, c in enumerate(reversed(DIVERGING)))
    parts.append(f'<defs><linearGradient id="{scale_id}" x1="0" y1="0" x2="0" y2="1">{stops}</linearGradient>'
                 f'</defs><rect x="{bar_x:.1f}" y="{bar_top:.1f}" width="14" height="{bar_height:.1f}" '
                 f'fill="url(#{scale_id})"/>')
    for tick in nice_ticks(low, high, 4):
        y = bar_top + (high - tick) / (high - low) * bar_height
        parts.append(_line(bar_x + 14, y, bar_x + 18, y))
        parts.append(_text(bar_x + 21, y + FONT * 0.35, number(tick)))
    if label:
        parts.append(_text(bar_x + 62, bar_top + bar_height / 2, label, "middle", rotate=-90))
    return svg(bar_x + 76, 8 + size + below, "".join(parts))
