"""A run report as one self-contained HTML file: inline CSS, inline SVG charts, no script
to run and nothing fetched, so it opens offline and can be attached to a ticket.

The page also embeds the records as JSON in
``<script type="application/json" id="lifeguard-data">`` (:func:`records_json`), for
tools and tests that read the figures back.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from collections.abc import Sequence
from datetime import datetime, timezone
from html import escape
from pathlib import Path

from .record import FAIL, NOT_APPLICABLE, PASS, Chart, Criterion, RunRecord, Table, records_json
from .svg import chart_svg, chart_values, format_time, series_colors

DATA_ELEMENT_ID = "lifeguard-data"

_CSS = """
:root { --ink:#111827; --muted:#6b7280; --line:#e5e7eb; --bg:#f3f4f6; --card:#fff;
        --pass:#15803d; --pass-bg:#dcfce7; --fail:#b91c1c; --fail-bg:#fee2e2;
        --na:#6b7280; --na-bg:#f3f4f6; }
* { box-sizing: border-box; }
body { margin: 0; background: var(--bg); color: var(--ink);
       font: 14px/1.45 -apple-system, "Segoe UI", Roboto, "Helvetica Neue", Arial, sans-serif; }
main { max-width: 1120px; margin: 0 auto; padding: 24px 20px 48px; }
header.page { display: flex; justify-content: space-between; align-items: baseline;
              border-bottom: 1px solid var(--line); margin-bottom: 20px; padding-bottom: 8px; }
header.page h1 { font-size: 20px; margin: 0; }
.muted, header.page .generated { color: var(--muted); font-size: 12px; }
section.record { margin-bottom: 40px; }
.record-head { display: flex; align-items: center; gap: 12px; }
.record-head h2 { font-size: 18px; margin: 0; }
.badge { font-weight: 700; font-size: 12px; letter-spacing: .06em; padding: 3px 10px;
         border-radius: 999px; }
.badge.pass { color: var(--pass); background: var(--pass-bg); }
.badge.fail { color: var(--fail); background: var(--fail-bg); }
.when { margin: 4px 0 16px; }
.grid { display: grid; grid-template-columns: 3fr 2fr; gap: 16px; margin-bottom: 16px; }
.card { background: var(--card); border: 1px solid var(--line); border-radius: 8px;
        padding: 14px 16px; margin: 0 0 16px; }
.grid .card { margin: 0; }
.card h3 { font-size: 14px; margin: 0 0 10px; }
table { border-collapse: collapse; width: 100%; }
th, td { text-align: left; padding: 6px 8px; border-top: 1px solid var(--line);
         vertical-align: top; }
th { color: var(--muted); font-weight: 600; font-size: 12px; border-top: none; }
td.num, th.num { text-align: right; font-variant-numeric: tabular-nums; }
.status { font-weight: 700; font-size: 11px; padding: 2px 7px; border-radius: 4px;
          white-space: nowrap; }
.status.pass { color: var(--pass); background: var(--pass-bg); }
.status.fail { color: var(--fail); background: var(--fail-bg); }
.status.na { color: var(--na); background: var(--na-bg); }
dl.params { display: grid; grid-template-columns: max-content 1fr; gap: 4px 14px; margin: 0; }
dl.params dt { color: var(--muted); }
dl.params dd { margin: 0; font-family: ui-monospace, SFMono-Regular, Menlo, monospace;
               font-size: 12.5px; word-break: break-all; }
figure.chart-card figcaption p { margin: -6px 0 8px; }
svg.chart { width: 100%; height: auto; display: block; }
svg.chart text { font: 11px -apple-system, "Segoe UI", Roboto, Arial, sans-serif; }
svg.chart .tick, svg.chart .unit { fill: var(--muted); }
svg.chart .grid { stroke: var(--line); }
svg.chart .axis, svg.chart .xtick { stroke: #9ca3af; }
svg.chart .phase-a { fill: #f9fafb; }
svg.chart .phase-b { fill: #eef2f7; }
svg.chart .phase-label { fill: var(--muted); font-size: 10.5px; text-transform: uppercase;
                         letter-spacing: .05em; }
svg.chart .area { fill-opacity: .55; stroke-width: 1; }
svg.chart .line { fill: none; stroke-linejoin: round; stroke-linecap: round; }
svg.chart .limit { stroke-width: 1.5; stroke-dasharray: 7 5; }
svg.chart .limit-label { font-weight: 600; }
svg.chart .marker .rule { stroke: #9ca3af; stroke-dasharray: 2 3; }
svg.chart .marker.recycle .rule { stroke: #ea580c; }
svg.chart .marker.fault .rule { stroke: #7c3aed; stroke-dasharray: 4 3; }
svg.chart .marker-label { fill: #7c3aed; font-size: 10px; }
.pair { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; margin-bottom: 16px; }
.pair .card { margin: 0; }
.pair-head { display: grid; grid-template-columns: 1fr 1fr; gap: 12px; }
.summary td, .summary th { font-variant-numeric: tabular-nums; }
.summary .bad { color: var(--fail); font-weight: 700; }
.summary .good { color: var(--pass); font-weight: 700; }
ul.legend { list-style: none; display: flex; flex-wrap: wrap; gap: 4px 16px; margin: 8px 0 0;
            padding: 0 0 0 64px; font-size: 12px; }
ul.legend li { display: flex; align-items: center; gap: 6px; }
.swatch { width: 14px; height: 10px; border-radius: 2px; display: inline-block; }
.swatch.line { height: 3px; }
.swatch.dashed { background-image: linear-gradient(90deg, #fff 50%, transparent 50%);
                 background-size: 6px 3px; }
.swatch.limit { height: 0; border-top: 2px dashed #b91c1c; border-radius: 0; }
.swatch.marker { width: 10px; height: 10px; border-radius: 50%; border: 2.5px solid #ea580c;
                 background: #fff; }
.swatch.marker.fault { width: 2px; height: 12px; border-radius: 0; border: none;
                       background: #7c3aed; }
ul.notes { color: var(--muted); padding-left: 18px; }
@media (max-width: 800px) { .grid { grid-template-columns: 1fr; } }
@media print { body { background: #fff; } .card { break-inside: avoid; } }
"""


def _page(title: str, body: str, records: Sequence[RunRecord], main_class: str = "") -> str:
    """The page around ``body``: head, inline CSS, and the records' JSON block."""
    from ..version import __version__

    generated = datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    data = json.dumps(records_json(records), separators=(",", ":"), allow_nan=False)
    # "<" never appears raw in the block, so no "</script>" can end it early.
    data = data.replace("<", "\\u003c")
    main = f'<main class="{main_class}">' if main_class else "<main>"
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="generator" content="lifeguard {escape(__version__)}">
<title>{escape(title)}</title>
<style>{_CSS}</style>
</head>
<body>
{main}
<header class="page"><h1>{escape(title)}</h1>
<span class="generated">generated by lifeguard {escape(__version__)}, {generated}</span></header>
{body}
</main>
<script type="application/json" id="{DATA_ELEMENT_ID}">{data}</script>
</body>
</html>
"""


def render_html(records: RunRecord | Sequence[RunRecord], title: str | None = None) -> str:
    """The report page of one record, or of several one after another."""
    items = [records] if isinstance(records, RunRecord) else list(records)
    page_title = title or (items[0].title if len(items) == 1 else "lifeguard report")
    sections = "\n".join(_record_html(index, record) for index, record in enumerate(items))
    return _page(page_title, sections, items)


def render_comparison(
    left: RunRecord, right: RunRecord, title: str, summary: Table, notes: Sequence[str] = ()
) -> str:
    """Two records side by side: a summary table, then each chart of both on the same
    axes (same time span, same value scale), then each side's criteria and parameters."""
    duration = max(left.duration, right.duration)
    heads = "".join(
        f'<div class="record-head" id="record-{i}"><h2>{escape(r.title)}</h2>'
        f'<span class="badge {r.verdict}">{"PASS" if r.verdict == PASS else "FAIL"}</span></div>'
        for i, r in enumerate((left, right))
    )
    rows = []
    for chart in left.charts:
        other = next((c for c in right.charts if c.id == chart.id), None)
        if other is None:
            continue
        cells = []
        for index, (mine, theirs, record) in enumerate(
            ((chart, other, left), (other, chart, right))
        ):
            note = f'<p class="muted">{escape(mine.note)}</p>' if mine.note else ""
            cells.append(
                f'<figure class="card chart-card" id="r{index}-{escape(mine.id)}" '
                f'data-chart="{escape(mine.id)}" data-side="{index}"><figcaption><h3>'
                f"{escape(record.title)}: {escape(mine.title)}</h3>{note}</figcaption>\n"
                f"{chart_svg(mine, record.phases, duration, chart_values(theirs))}\n"
                f"{_legend(mine)}</figure>"
            )
        rows.append(f'<div class="pair">{"".join(cells)}</div>')
    details = "".join(
        f'<div class="card" id="criteria-{i}"><h3>{escape(r.title)}: criteria</h3>'
        f"{_criteria_table(r.criteria)}<h3>Parameters</h3>{_parameters(r.parameters)}</div>"
        for i, r in enumerate((left, right))
    )
    notes_html = (
        '<ul class="notes">' + "".join(f"<li>{escape(n)}</li>" for n in notes) + "</ul>"
        if notes
        else ""
    )
    body = (
        f'<section class="summary" id="summary">{_table_html(summary)}{notes_html}</section>\n'
        f'<div class="pair-head">{heads}</div>\n{"".join(rows)}\n'
        f'<div class="pair">{details}</div>'
    )
    return _page(title, body, [left, right], "comparison")


def write_html(
    records: RunRecord | Sequence[RunRecord],
    path: str | os.PathLike[str],
    title: str | None = None,
    *,
    page: str | None = None,
) -> Path:
    """Write the report page (``page`` if given, else that of ``records``) to ``path``
    (atomically) and return its absolute path."""
    target = Path(path).expanduser().resolve()
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, temporary = tempfile.mkstemp(dir=target.parent, prefix=target.name, suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as file:
            file.write(page if page is not None else render_html(records, title))
        os.chmod(temporary, 0o644)
        os.replace(temporary, target)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return target


def _record_html(index: int, record: RunRecord) -> str:
    started = datetime.fromtimestamp(record.started_at, timezone.utc)
    verdict = record.verdict
    head = (
        f'<div class="record-head"><h2>{escape(record.title)}</h2>'
        f'<span class="badge {verdict}">{"PASS" if verdict == PASS else "FAIL"}</span></div>'
        f'<p class="when muted">started {started:%Y-%m-%d %H:%M:%S} UTC, lasted '
        f"{format_time(round(record.duration, 1))}</p>"
    )
    summary = (
        '<div class="grid">'
        f'<div class="card"><h3>Criteria</h3>{_criteria_table(record.criteria)}</div>'
        f'<div class="card"><h3>Parameters</h3>{_parameters(record.parameters)}</div>'
        "</div>"
    )
    charts = "\n".join(
        _chart_html(f"r{index}-{chart.id}", chart, record) for chart in record.charts
    )
    tables = "\n".join(_table_html(table) for table in record.tables)
    notes = (
        '<ul class="notes">' + "".join(f"<li>{escape(n)}</li>" for n in record.notes) + "</ul>"
        if record.notes
        else ""
    )
    return (
        f'<section class="record" id="record-{index}">\n{head}\n{summary}\n{charts}\n'
        f"{tables}\n{notes}\n</section>"
    )


def _criteria_table(criteria: Sequence[Criterion]) -> str:
    if not criteria:
        return '<p class="muted">No criterion was evaluated.</p>'
    rows = []
    for criterion in criteria:
        css = {PASS: "pass", FAIL: "fail", NOT_APPLICABLE: "na"}.get(criterion.status, "na")
        rows.append(
            f'<tr class="criterion {css}" data-name="{escape(criterion.name)}">'
            f'<td><span class="status {css}">{escape(criterion.status.upper())}</span></td>'
            f"<td><strong>{escape(criterion.title)}</strong><br>"
            f'<span class="muted">{escape(criterion.detail)}</span></td></tr>'
        )
    return "<table><tr><th>status</th><th>criterion</th></tr>" + "".join(rows) + "</table>"


def _parameters(parameters: dict[str, str]) -> str:
    items = "".join(f"<dt>{escape(k)}</dt><dd>{escape(v)}</dd>" for k, v in parameters.items())
    return f'<dl class="params">{items}</dl>'


def _chart_html(element_id: str, chart: Chart, record: RunRecord) -> str:
    note = f'<p class="muted">{escape(chart.note)}</p>' if chart.note else ""
    return (
        f'<figure class="card chart-card" id="{escape(element_id)}" '
        f'data-chart="{escape(chart.id)}"><figcaption><h3>{escape(chart.title)}</h3>{note}'
        f"</figcaption>\n{chart_svg(chart, record.phases, record.duration)}\n"
        f"{_legend(chart)}</figure>"
    )


def _legend(chart: Chart) -> str:
    colors = series_colors(chart)
    items = []
    for series in chart.series:
        shape = "area" if series.area else "line"
        dashed = " dashed" if series.dashed else ""
        items.append(
            f'<li><span class="swatch {shape}{dashed}" style="background-color:'
            f'{escape(colors[series.label])}"></span>{escape(series.label)}</li>'
        )
    if chart.limit is not None:
        items.append(
            f'<li><span class="swatch limit"></span>{escape(chart.limit_label or "limit")}</li>'
        )
    kinds = sorted({marker.kind for marker in chart.markers})
    for kind in kinds:
        count = sum(1 for marker in chart.markers if marker.kind == kind)
        items.append(
            f'<li><span class="swatch marker {escape(kind)}"></span>{escape(kind)} ({count})</li>'
        )
    return '<ul class="legend">' + "".join(items) + "</ul>"


def _table_html(table: Table) -> str:
    numeric = [
        bool(table.rows) and all(_numeric(row[i]) for row in table.rows if i < len(row))
        for i in range(len(table.columns))
    ]
    head = "".join(
        f'<th class="num">{escape(c)}</th>' if numeric[i] else f"<th>{escape(c)}</th>"
        for i, c in enumerate(table.columns)
    )
    rows = "".join(
        "<tr>"
        + "".join(
            f'<td class="num">{escape(c)}</td>'
            if i < len(numeric) and numeric[i]
            else f"<td>{escape(c)}</td>"
            for i, c in enumerate(row)
        )
        + "</tr>"
        for row in table.rows
    )
    return (
        f'<div class="card"><h3>{escape(table.title)}</h3>'
        f"<table><tr>{head}</tr>{rows}</table></div>"
    )


_NUMBER = re.compile(r"^[+-]?[\d,]+(\.\d+)?( [\w/]+)?$")


def _numeric(cell: str) -> bool:
    """'12', '-3.5', '1,024', '85.2 MiB', '+4 MiB/min' or '-' (no figure): right-aligned."""
    return cell == "-" or _NUMBER.match(cell) is not None
