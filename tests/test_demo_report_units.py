"""The demo's comparison page, from records built by hand: both sides on the same value
axis, one legend line per child even when two children have the same RSS, fault labels."""

from __future__ import annotations

import re

from lifeguard.report import UNIT_BYTES, Chart, Marker, RunRecord, Series, Table
from lifeguard.report.html import render_comparison

MIB = 1024 * 1024


def _record(title: str, peak_mib: int) -> RunRecord:
    record = RunRecord(title=title, started_at=0.0, duration=20.0)
    rss = Chart("rss", "RSS per child, with recycles", UNIT_BYTES, zero_based=False)
    for label in ("vm:101", "vm:102"):  # the same RSS all along
        rss.series.append(Series(label, [(0.0, 80.0 * MIB), (20.0, peak_mib * MIB)]))
    for t, label in ((3.0, "soft time limit mid-query"), (4.0, "pg_terminate_backend")):
        rss.markers.append(Marker(t, label, kind="fault"))
    record.charts.append(rss)
    return record


def test_both_sides_share_the_value_axis_and_keep_their_legend_lines() -> None:
    page = render_comparison(
        _record("stock Celery", 160), _record("lifeguard", 90), "t", Table("s", ["", "a"], [])
    )
    svgs = re.findall(r'<svg class="chart".*?</svg>', page, re.S)
    assert len(svgs) == 2
    ticks = [re.findall(r'<text class="tick"[^>]*text-anchor="end">([^<]+)<', s) for s in svgs]
    assert ticks[0] == ticks[1] and "160" in " ".join(ticks[1])  # lifeguard's axis too
    legends = re.findall(r'<ul class="legend">(.*?)</ul>', page, re.S)
    for legend in legends:
        assert "vm:101</li>" in legend and "vm:102</li>" in legend
        colours = re.findall(r"background-color:(#[0-9a-f]+)", legend)
        assert len(set(colours[:2])) == 2
    labels = re.findall(r'<text class="marker-label" x="[\d.]+" y="(\d+)">([^<]+)<', svgs[0])
    assert [name for _, name in labels] == ["soft time limit mid-query", "pg_terminate_backend"]
    assert labels[0][0] != labels[1][0]  # close faults: labels on different rows
