"""Charts as inline SVG, drawn in Python: no JavaScript, no external file, opens offline.

One function, :func:`chart_svg`, turns a :class:`~lifeguard.report.record.Chart` into an
``<svg>`` element: phases as shaded bands, stacked areas under lines, a dashed limit,
markers on their series (a recycled child) or across the chart. Colours not set on a
series come from :data:`PALETTE`, in order; :func:`series_colors` tells the page's
legend which colour each series got.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterable, Sequence
from html import escape

from .record import UNIT_BYTES, Chart, Marker, Phase, Series

WIDTH = 960
HEIGHT = 280
LEFT, RIGHT, TOP, BOTTOM = 64, 24, 26, 34
PLOT_W = WIDTH - LEFT - RIGHT
PLOT_H = HEIGHT - TOP - BOTTOM

PALETTE = (
    "#2563eb", "#16a34a", "#dc2626", "#9333ea", "#ea580c",
    "#0891b2", "#ca8a04", "#db2777", "#4b5563", "#65a30d",
)  # fmt: skip
LIMIT_COLOR = "#b91c1c"
#: Units counted in whole numbers: no tick between 0 and 1.
INTEGER_UNITS = frozenset({"connections", "tasks", "processes"})
MIB = 1024 * 1024


def series_colors(chart: Chart) -> dict[str, str]:
    """The colour of each series: its own, else the next one of the palette."""
    colors: dict[str, str] = {}
    free = itertools.cycle(PALETTE)
    for series in chart.series:
        colors[series.label] = series.color or next(free)
    return colors


def nice_ticks(
    high: float, target: int = 5, *, low: float = 0.0, min_step: float = 0.0
) -> list[float]:
    """Round tick values covering ``low`` to ``high``: multiples of 1, 2, 2.5 or 5 times
    a power of 10, at least ``min_step`` apart (1 for counts)."""
    if high <= low:
        high = low + max(min_step, 1.0)
    raw = max((high - low) / target, min_step, 1e-12)
    power = 10 ** math.floor(math.log10(raw))
    step = next(m * power for m in (1, 2, 2.5, 5, 10) if m * power >= raw - 1e-12)
    first = math.floor(low / step + 1e-9)
    last = math.ceil(high / step - 1e-9)
    return [round(i * step, 10) for i in range(first, max(last, first + 1) + 1)]


def time_ticks(duration: float, target: int = 8) -> list[float]:
    """Ticks of the time axis on round seconds, minutes or hours."""
    steps = (1, 2, 5, 10, 15, 30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400)
    step: float = next((s for s in steps if duration / s <= target), 21600)
    if duration < target:
        step = max(nice_ticks(duration, target)[1], 0.1)
    return [round(i * step, 6) for i in range(int(duration / step + 1e-9) + 1)]


def format_time(t: float) -> str:
    if t < 120:
        return f"{t:g}s"
    if t < 7200:
        minutes, seconds = divmod(round(t), 60)
        return f"{minutes}m" if seconds == 0 else f"{minutes}m{seconds:02d}"
    hours, minutes = divmod(round(t) // 60, 60)
    return f"{hours}h" if minutes == 0 else f"{hours}h{minutes:02d}"


def format_value(value: float, unit: str) -> str:
    """A value as the axis and the tooltips show it (bytes in MiB)."""
    if unit == UNIT_BYTES:
        value = value / MIB
    if abs(value) >= 1000 and value == int(value):
        return f"{value:,.0f}"
    return f"{value:.3g}" if abs(value) < 1000 else f"{value:,.0f}"


def _unit_label(unit: str) -> str:
    return "MiB" if unit == UNIT_BYTES else unit


class _Scale:
    def __init__(self, duration: float, low: float, high: float) -> None:
        self.duration = max(duration, 1e-6)
        self.low = low
        self.span = max(high - low, 1e-9)

    def x(self, t: float) -> float:
        return LEFT + PLOT_W * min(max(t / self.duration, 0.0), 1.0)

    def y(self, value: float) -> float:
        share = (value - self.low) / self.span
        return TOP + PLOT_H * (1.0 - min(max(share, 0.0), 1.0))


def chart_values(chart: Chart) -> list[float]:
    """Every value the chart draws (stacked tops, lines, limit): what its scale covers."""
    stacks = _stacks([s for s in chart.series if s.area])
    return (
        [top for _, tops in stacks for _, top in tops]
        + [v for s in chart.series if not s.area for _, v in s.points if v is not None]
        + ([chart.limit] if chart.limit is not None else [])
    )


def chart_svg(
    chart: Chart, phases: Sequence[Phase], duration: float, shared: Sequence[float] = ()
) -> str:
    """The chart as an ``<svg>`` element sized by its viewBox (it scales to its box);
    ``shared``: values of a chart drawn beside it, so both get the same value axis."""
    colors = series_colors(chart)
    stacks = _stacks([s for s in chart.series if s.area])
    lines = [s for s in chart.series if not s.area]
    last_t = max((t for s in chart.series for t, _ in s.points), default=0.0)
    duration = max(duration, last_t)
    values = chart_values(chart) + list(shared)
    y_ticks = _value_ticks(chart, values)
    scale = _Scale(duration, y_ticks[0], y_ticks[-1])
    parts = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'aria-label="{escape(chart.title)}" xmlns="http://www.w3.org/2000/svg">',
        f"<title>{escape(chart.title)}</title>",
        *_phase_bands(phases, scale),
        *_axes(chart.unit, y_ticks, time_ticks(duration), scale),
        *_areas(stacks, colors, scale),
        *(
            _line(series, colors[series.label], scale, _width(index, len(lines)))
            for index, series in enumerate(lines)
        ),
        *_limit(chart, scale),
        *(_marker(marker, chart, colors, scale, row) for marker, row in _rows(chart.markers)),
        "</svg>",
    ]
    return "\n".join(part for part in parts if part)


def _value_ticks(chart: Chart, values: list[float]) -> list[float]:
    """Ticks of the value axis: from 0, or around the data when the chart is not
    ``zero_based`` (memory: a few MiB of growth on 80 MiB must show)."""
    unit = MIB if chart.unit == UNIT_BYTES else 1.0
    high = max(values, default=0.0) / unit
    low = 0.0
    if not chart.zero_based and values:
        low = min(values) / unit
        margin = max((high - low) * 0.1, 1.0)
        low, high = max(low - margin, 0.0), high + margin
    min_step = 1.0 if chart.unit in INTEGER_UNITS else 0.0
    ticks = nice_ticks(high * 1.05 if low == 0 else high, low=low, min_step=min_step)
    return [tick * unit for tick in ticks]


def _stacks(areas: list[Series]) -> list[tuple[Series, list[tuple[float, float]]]]:
    """Each area series with the top of the stack at each time (areas share times)."""
    times = sorted({t for series in areas for t, _ in series.points})
    below = dict.fromkeys(times, 0.0)
    stacked = []
    for series in areas:
        values = {t: value or 0.0 for t, value in series.points}
        tops = [(t, below[t] + values.get(t, 0.0)) for t in times]
        stacked.append((series, tops))
        below = dict(tops)
    return stacked


def _phase_bands(phases: Sequence[Phase], scale: _Scale) -> Iterable[str]:
    for index, phase in enumerate(phases):
        x0, x1 = scale.x(phase.start), scale.x(phase.end)
        shade = "phase-a" if index % 2 == 0 else "phase-b"
        yield (
            f'<rect class="{shade}" x="{x0:.1f}" y="{TOP}" width="{max(x1 - x0, 0):.1f}" '
            f'height="{PLOT_H}"><title>{escape(phase.name)}: {format_time(phase.start)} to '
            f"{format_time(phase.end)}</title></rect>"
        )
        if x1 - x0 >= 8 * len(phase.name) * 0.8:
            yield (
                f'<text class="phase-label" x="{x0 + 4:.1f}" y="{TOP - 8}">'
                f"{escape(phase.name)}</text>"
            )


def _axes(unit: str, y_ticks: list[float], x_ticks: list[float], scale: _Scale) -> Iterable[str]:
    for tick in y_ticks:
        y = scale.y(tick)
        yield f'<line class="grid" x1="{LEFT}" x2="{LEFT + PLOT_W}" y1="{y:.1f}" y2="{y:.1f}"/>'
        yield (
            f'<text class="tick" x="{LEFT - 8}" y="{y + 4:.1f}" text-anchor="end">'
            f"{escape(format_value(tick, unit))}</text>"
        )
    for tick in x_ticks:
        x = scale.x(tick)
        bottom = TOP + PLOT_H
        yield f'<line class="xtick" x1="{x:.1f}" x2="{x:.1f}" y1="{bottom}" y2="{bottom + 4}"/>'
        yield (
            f'<text class="tick" x="{x:.1f}" y="{TOP + PLOT_H + 18}" text-anchor="middle">'
            f"{format_time(tick)}</text>"
        )
    yield (
        f'<line class="axis" x1="{LEFT}" x2="{LEFT + PLOT_W}" y1="{TOP + PLOT_H}" '
        f'y2="{TOP + PLOT_H}"/>'
    )
    yield (
        f'<text class="unit" transform="rotate(-90)" x="{-(TOP + PLOT_H / 2):.1f}" y="14" '
        f'text-anchor="middle">{escape(_unit_label(unit))}</text>'
    )


def _areas(
    stacks: list[tuple[Series, list[tuple[float, float]]]], colors: dict[str, str], scale: _Scale
) -> Iterable[str]:
    previous: list[tuple[float, float]] | None = None
    for series, tops in stacks:
        if not tops:
            continue
        bottoms = previous or [(t, 0.0) for t, _ in tops]
        outline = [(scale.x(t), scale.y(v)) for t, v in tops]
        outline += [(scale.x(t), scale.y(v)) for t, v in reversed(bottoms)]
        points = " ".join(f"{x:.1f},{y:.1f}" for x, y in outline)
        color = colors[series.label]
        yield (
            f'<polygon class="area" points="{points}" fill="{color}" stroke="{color}">'
            f"<title>{escape(series.label)}</title></polygon>"
        )
        previous = tops


def _width(index: int, count: int) -> float:
    """Earlier lines are drawn wider, so a line hidden under a later identical one (two
    children with the same RSS) still shows as a coloured edge."""
    return 2.0 if count < 2 else 2.0 + 1.5 * (count - 1 - index) / (count - 1)


def _line(series: Series, color: str, scale: _Scale, width: float = 2.0) -> str:
    segments: list[list[tuple[float, float]]] = [[]]
    for t, value in series.points:
        if value is None:
            if segments[-1]:
                segments.append([])
            continue
        segments[-1].append((scale.x(t), scale.y(value)))
    dash = ' stroke-dasharray="6 4"' if series.dashed else ""
    parts = [f'<g class="series"><title>{escape(series.label)}</title>']
    for segment in segments:
        if len(segment) == 1:
            x, y = segment[0]
            parts.append(f'<circle cx="{x:.1f}" cy="{y:.1f}" r="2.5" fill="{color}"/>')
        elif segment:
            d = "M" + " L".join(f"{x:.1f},{y:.1f}" for x, y in segment)
            parts.append(
                f'<path class="line" d="{d}" stroke="{color}" stroke-width="{width:.2g}"{dash}/>'
            )
    parts.append("</g>")
    return "".join(parts)


def _limit(chart: Chart, scale: _Scale) -> Iterable[str]:
    if chart.limit is None:
        return
    y = scale.y(chart.limit)
    label = chart.limit_label or f"limit {format_value(chart.limit, chart.unit)}"
    yield (
        f'<line class="limit" x1="{LEFT}" x2="{LEFT + PLOT_W}" y1="{y:.1f}" y2="{y:.1f}" '
        f'stroke="{LIMIT_COLOR}"/>'
    )
    yield (
        f'<text class="limit-label" x="{LEFT + PLOT_W - 4}" y="{y - 5:.1f}" '
        f'text-anchor="end" fill="{LIMIT_COLOR}">{escape(label)}</text>'
    )


def _value_at(series: Series, t: float) -> float | None:
    """The series' last value at or before ``t`` (its first one if ``t`` is earlier)."""
    found: float | None = None
    for point_t, value in series.points:
        if point_t > t + 1e-9:
            break
        if value is not None:
            found = value
    if found is None:
        found = next((value for _, value in series.points if value is not None), None)
    return found


def _rows(markers: Sequence[Marker]) -> Iterable[tuple[Marker, int]]:
    """Each marker with the row of its label: fault labels take turns on three rows, so
    faults close in time don't write over each other."""
    faults = 0
    for marker in markers:
        yield marker, faults % 3
        faults += marker.kind == "fault"


def _marker(
    marker: Marker, chart: Chart, colors: dict[str, str], scale: _Scale, row: int = 0
) -> str:
    x = scale.x(marker.t)
    title = f"<title>{escape(marker.label)} at {format_time(marker.t)}</title>"
    kind = escape(marker.kind)
    on = next((s for s in chart.series if s.label == marker.series), None)
    value = _value_at(on, marker.t) if on is not None else None
    if on is None or value is None:
        label = (
            f'<text class="marker-label" x="{x + 3:.1f}" y="{TOP + 10 + 11 * row}">'
            f"{escape(marker.label)}</text>"
            if marker.kind == "fault"
            else ""
        )
        return (
            f'<g class="marker {kind}">{title}<line class="rule" x1="{x:.1f}" x2="{x:.1f}" '
            f'y1="{TOP}" y2="{TOP + PLOT_H}"/>{label}</g>'
        )
    y = scale.y(value)
    color = colors[on.label]
    return (
        f'<g class="marker {kind}">{title}'
        f'<line class="rule" x1="{x:.1f}" x2="{x:.1f}" y1="{TOP}" y2="{TOP + PLOT_H}"/>'
        f'<circle cx="{x:.1f}" cy="{y:.1f}" r="5" fill="#fff" stroke="{color}" '
        f'stroke-width="2.5"/></g>'
    )
