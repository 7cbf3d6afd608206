"""What one run produced, as data: time series, events, phases, criteria and parameters.

A :class:`RunRecord` is independent of how it was obtained (``lifeguard validate``,
``lifeguard demo``) and of how it is shown (:mod:`lifeguard.report.html`). Every time
is in seconds since the run started (``t``), so series of different sources share one
axis. ``to_json()`` / ``from_json()`` round-trip it exactly: the HTML page embeds that
JSON, and tests read it back.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

#: Criterion statuses.
PASS = "pass"
FAIL = "fail"
NOT_APPLICABLE = "n/a"  # could not be evaluated here (the reason is in the detail)

#: Units a chart knows how to format.
UNIT_BYTES = "bytes"  # shown in MiB


@dataclass
class Series:
    """One line (or stacked area) of a chart: ``(t, value)`` points; None is a gap."""

    label: str
    points: list[tuple[float, float | None]] = field(default_factory=list)
    area: bool = False  # stacked with the chart's other area series, under the lines
    color: str | None = None  # CSS colour; None: the chart's palette
    dashed: bool = False

    def add(self, t: float, value: float | None) -> None:
        self.points.append((t, value))

    def peak(self) -> float | None:
        values = [value for _, value in self.points if value is not None]
        return max(values) if values else None


@dataclass
class Marker:
    """An event on a chart: on a series' line at ``t`` when ``series`` is given, else a
    vertical rule across the chart."""

    t: float
    label: str
    series: str | None = None
    kind: str = "event"  # "recycle", "exit", ... (the page styles known kinds)


@dataclass
class Chart:
    """One chart: its series, its markers and an optional limit drawn as a dashed line."""

    id: str  # unique within the record: the key of the chart in the page's data block
    title: str
    unit: str  # "connections", "tasks/s", or UNIT_BYTES
    series: list[Series] = field(default_factory=list)
    markers: list[Marker] = field(default_factory=list)
    limit: float | None = None
    limit_label: str = ""
    note: str = ""  # one sentence under the chart: what to look for
    zero_based: bool = True  # False: the value axis spans the data (e.g. memory)

    def series_named(self, label: str) -> Series:
        """The series of that label, created empty when missing."""
        for series in self.series:
            if series.label == label:
                return series
        series = Series(label)
        self.series.append(series)
        return series


@dataclass
class Phase:
    """A named stretch of the run (warm-up, burst, soak, drain, settle)."""

    name: str
    start: float
    end: float


@dataclass
class Criterion:
    """One pass/fail check, with what was measured and the limit it was held to."""

    name: str  # machine name, e.g. "idle_back_to_baseline"
    title: str  # what a reader sees
    status: str  # PASS, FAIL or NOT_APPLICABLE
    detail: str  # one sentence: the figures behind the status
    measured: float | None = None
    limit: float | None = None

    @property
    def failed(self) -> bool:
        return self.status == FAIL


@dataclass
class Table:
    """A small table shown after the charts (e.g. connections per worker process)."""

    title: str
    columns: list[str]
    rows: list[list[str]] = field(default_factory=list)


@dataclass
class RunRecord:
    """Everything a report shows about one run."""

    title: str
    started_at: float  # time.time() at t = 0
    duration: float = 0.0  # seconds
    parameters: dict[str, str] = field(default_factory=dict)  # in display order
    phases: list[Phase] = field(default_factory=list)
    charts: list[Chart] = field(default_factory=list)
    criteria: list[Criterion] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    @property
    def verdict(self) -> str:
        """FAIL when a criterion failed, else PASS (also with no criterion at all)."""
        return FAIL if any(criterion.failed for criterion in self.criteria) else PASS

    def chart(self, chart_id: str) -> Chart:
        for chart in self.charts:
            if chart.id == chart_id:
                return chart
        raise KeyError(chart_id)

    def to_json(self) -> dict[str, Any]:
        return {
            "title": self.title,
            "started_at": self.started_at,
            "duration": round(self.duration, 3),
            "verdict": self.verdict,
            "parameters": dict(self.parameters),
            "phases": [vars(phase).copy() for phase in self.phases],
            "charts": [_chart_json(chart) for chart in self.charts],
            "criteria": [vars(criterion).copy() for criterion in self.criteria],
            "tables": [vars(table).copy() for table in self.tables],
            "notes": list(self.notes),
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> RunRecord:
        return cls(
            title=str(data["title"]),
            started_at=float(data["started_at"]),
            duration=float(data.get("duration", 0.0)),
            parameters={str(k): str(v) for k, v in data.get("parameters", {}).items()},
            phases=[Phase(**phase) for phase in data.get("phases", [])],
            charts=[_chart_from_json(chart) for chart in data.get("charts", [])],
            criteria=[Criterion(**criterion) for criterion in data.get("criteria", [])],
            tables=[Table(**table) for table in data.get("tables", [])],
            notes=[str(note) for note in data.get("notes", [])],
        )


def _chart_json(chart: Chart) -> dict[str, Any]:
    return {
        "id": chart.id,
        "title": chart.title,
        "unit": chart.unit,
        "limit": chart.limit,
        "limit_label": chart.limit_label,
        "note": chart.note,
        "zero_based": chart.zero_based,
        "series": [
            {
                "label": series.label,
                "area": series.area,
                "color": series.color,
                "dashed": series.dashed,
                "points": [[round(t, 3), value] for t, value in series.points],
            }
            for series in chart.series
        ],
        "markers": [vars(marker).copy() for marker in chart.markers],
    }


def _chart_from_json(data: Mapping[str, Any]) -> Chart:
    return Chart(
        id=str(data["id"]),
        title=str(data["title"]),
        unit=str(data["unit"]),
        limit=data.get("limit"),
        limit_label=str(data.get("limit_label", "")),
        note=str(data.get("note", "")),
        zero_based=bool(data.get("zero_based", True)),
        series=[
            Series(
                label=str(series["label"]),
                area=bool(series.get("area", False)),
                color=series.get("color"),
                dashed=bool(series.get("dashed", False)),
                points=[(float(t), value) for t, value in series.get("points", [])],
            )
            for series in data.get("series", [])
        ],
        markers=[Marker(**marker) for marker in data.get("markers", [])],
    )


def records_json(records: Sequence[RunRecord]) -> dict[str, Any]:
    """The document a report page embeds: ``{"version": 1, "records": [...]}``."""
    return {"version": 1, "records": [record.to_json() for record in records]}
