"""Run reports: a :class:`RunRecord` of time series, events and criteria, written as one
self-contained HTML file with :func:`write_html`.

Used by ``lifeguard validate`` and ``lifeguard demo``::

    from lifeguard.report import Chart, Criterion, Phase, RunRecord, Series, write_html

    record = RunRecord(title="stock Celery", started_at=time.time())
    chart = Chart("connections", "Connections by state", unit="connections")
    chart.series_named("idle").add(0.5, 3)
    record.charts.append(chart)
    record.criteria.append(Criterion("no_leak", "No leaked connection", "pass", "0 left"))
    write_html([record], "report.html")   # several records: one section each

* :mod:`.record`: the model (``RunRecord``, ``Chart``, ``Series``, ``Marker``, ``Phase``,
  ``Criterion``, ``Table``), JSON in and out;
* :mod:`.svg`: a chart as inline SVG;
* :mod:`.html`: the page, with the records' JSON embedded in
  ``<script type="application/json" id="lifeguard-data">``.
"""

from .html import DATA_ELEMENT_ID, render_html, write_html
from .record import (
    FAIL,
    NOT_APPLICABLE,
    PASS,
    UNIT_BYTES,
    Chart,
    Criterion,
    Marker,
    Phase,
    RunRecord,
    Series,
    Table,
    records_json,
)

__all__ = [
    "DATA_ELEMENT_ID",
    "FAIL",
    "NOT_APPLICABLE",
    "PASS",
    "UNIT_BYTES",
    "Chart",
    "Criterion",
    "Marker",
    "Phase",
    "RunRecord",
    "Series",
    "Table",
    "records_json",
    "render_html",
    "write_html",
]
