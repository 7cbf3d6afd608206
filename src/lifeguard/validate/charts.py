"""A validation's samples and outcomes turned into the report's charts and tables."""

from __future__ import annotations

from collections.abc import Sequence

from ..monitor.attribution import node_host
from ..monitor.snapshot import ACTIVE, IDLE, IDLE_IN_TRANSACTION, IDLE_IN_TRANSACTION_ABORTED
from ..report.record import UNIT_BYTES, Chart, Marker, Series, Table
from .criteria import MIB, ProcessSlope
from .load import Outcomes
from .sampler import UNATTRIBUTED, Recycle, Sample

#: Stacking order (bottom up) and colours of the connection states.
STATE_COLORS = {
    ACTIVE: "#16a34a",
    IDLE_IN_TRANSACTION: "#ea580c",
    IDLE_IN_TRANSACTION_ABORTED: "#dc2626",
    IDLE: "#3b82f6",
}
WORKERS_LINE = "held by the workers"
#: Lines drawn per process before the rest are summed.
MAX_PROCESS_LINES = 10


def connections_chart(samples: Sequence[Sample], budget: int) -> Chart:
    chart = Chart(
        "connections",
        "Database connections by state",
        "connections",
        limit=budget,
        limit_label=f"workers' budget {budget}",
        note="Every client backend of the database, stacked by state; the dashed line is "
        "what the workers hold, which must stay under their budget.",
    )
    read = [sample for sample in samples if sample.error is None]
    seen = {state for sample in read for state in sample.by_state}
    states = [s for s in STATE_COLORS if s in seen] + sorted(seen - set(STATE_COLORS))
    for state in states:
        series = Series(state, area=True, color=STATE_COLORS.get(state, "#9ca3af"))
        for sample in read:
            series.add(sample.t, sample.by_state.get(state, 0))
        chart.series.append(series)
    workers = Series(WORKERS_LINE, color="#111827", dashed=True)
    for sample in samples:
        workers.add(sample.t, None if sample.error else sample.workers)
    chart.series.append(workers)
    return chart


def process_connections_chart(samples: Sequence[Sample]) -> Chart | None:
    labels = {label for sample in samples for label in sample.by_process}
    if not labels:
        return None
    peaks = {label: max(_held(s, label) for s in samples) for label in labels}
    ranked = sorted(labels, key=lambda label: (-peaks[label], label))
    shown, rest = ranked[:MAX_PROCESS_LINES], ranked[MAX_PROCESS_LINES:]
    chart = Chart(
        "process_connections",
        "Connections per worker process",
        "connections",
        note="Backends each worker process holds, by lifeguard's application_name or, "
        "for workers on this machine, by their TCP sockets; 'not attributed': opened "
        "during the run by a process that could not be told.",
    )
    for label in shown:
        name = "not attributed" if label == UNATTRIBUTED else label
        series = chart.series_named(name)
        if label == UNATTRIBUTED:
            series.dashed = True
        for sample in samples:
            series.add(sample.t, None if sample.error else _held(sample, label))
    if rest:
        others = chart.series_named(f"{len(rest)} other processes")
        for sample in samples:
            others.add(sample.t, None if sample.error else sum(_held(sample, x) for x in rest))
    return chart


def _held(sample: Sample, label: str) -> int:
    return sum(sample.by_process.get(label, {}).values())


def rss_chart(samples: Sequence[Sample], found_recycles: Sequence[Recycle]) -> Chart | None:
    if not any(p.rss is not None for s in samples for p in s.processes):
        return None
    chart = Chart(
        "rss",
        "RSS per task process",
        UNIT_BYTES,
        note="Resident memory of each process that runs tasks (prefork children, or the "
        "worker itself); circles mark a process that went away (recycled) and was replaced.",
        zero_based=False,
    )
    for sample in samples:
        for process in sample.processes:
            value = None if process.rss is None else float(process.rss)
            chart.series_named(process.label).add(sample.t, value)
    for node, rss in sorted(_mains(samples).items()):
        series = chart.series_named(f"{node_host(node)} MainProcess")
        series.dashed = True
        series.color = "#9ca3af"
        series.points = rss
    for recycle in found_recycles:
        replaced = ", ".join(str(pid) for pid in recycle.replaced_by) or "nothing yet"
        chart.markers.append(
            Marker(
                recycle.t,
                f"{node_host(recycle.node)}:{recycle.pid} went away; new: {replaced}",
                series=f"{node_host(recycle.node)}:{recycle.pid}",
                kind="recycle",
            )
        )
    return chart


def _mains(samples: Sequence[Sample]) -> dict[str, list[tuple[float, float | None]]]:
    mains: dict[str, list[tuple[float, float | None]]] = {}
    for sample in samples:
        for node, rss in sample.main_rss.items():
            mains.setdefault(node, []).append((sample.t, None if rss is None else float(rss)))
    return mains


def throughput_chart(outcomes: Outcomes, duration: float, interval: float) -> Chart:
    """Tasks finished per second; ``outcomes`` of every phase, warm-up included."""
    bucket = max(interval, duration / 120.0, 0.25)
    chart = Chart(
        "throughput",
        "Tasks finished per second",
        "tasks/s",
        note=f"Outcomes seen in the result backend, per {bucket:.2g}s.",
    )
    chart.series.append(_rate(Series("succeeded", color="#16a34a"), outcomes.done_at, bucket))
    chart.series.append(_rate(Series("failed", color="#dc2626"), outcomes.failed_at, bucket))
    return chart


def _rate(series: Series, times: list[float], bucket: float) -> Series:
    if not times:
        return series
    counts: dict[int, int] = {}
    for t in times:
        counts[int(t // bucket)] = counts.get(int(t // bucket), 0) + 1
    for index in range(max(counts) + 2):
        series.add((index + 0.5) * bucket, counts.get(index, 0) / bucket)
    return series


def processes_table(
    samples: Sequence[Sample], final: Sample, slopes: Sequence[ProcessSlope]
) -> Table:
    """Per worker process: peak connections, what it holds at the end, its memory."""
    table = Table(
        "Worker processes",
        ["process", "peak connections", "after the run", "RSS first", "RSS last", "soak slope"],
    )
    labels = sorted(
        {label for s in samples for label in s.by_process}
        | {p.label for s in samples for p in s.processes}
    )
    slope_of = {slope.label: slope for slope in slopes}
    for label in labels:
        rss = [p.rss for s in samples for p in s.processes if p.label == label and p.rss]
        held = final.by_process.get(label, {})
        slope = slope_of.get(label)
        judged = slope.judged() if slope is not None else []
        table.rows.append(
            [
                "not attributed" if label == UNATTRIBUTED else label,
                str(max(_held(s, label) for s in samples)),
                ", ".join(f"{n} {state}" for state, n in held.items()) or "-",
                f"{rss[0] / MIB:.1f} MiB" if rss else "-",
                f"{rss[-1] / MIB:.1f} MiB" if rss else "-",
                f"{max(judged) / MIB:+.1f} MiB/min" if judged else "-",
            ]
        )
    return table


def errors_table(outcomes: Outcomes) -> Table | None:
    if not outcomes.errors:
        return None
    return Table(
        "Task errors",
        ["error", "tasks"],
        [[error, str(count)] for error, count in outcomes.errors.most_common(10)],
    )
