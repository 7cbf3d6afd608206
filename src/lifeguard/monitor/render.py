"""Reports as text: the Nagios-style lines of ``lifeguard check`` and the live view of
``lifeguard monitor`` (rich)."""

from __future__ import annotations

from typing import Any

from .actions import Action
from .report import Report
from .snapshot import Backend
from .thresholds import Finding, Severity

#: Backends listed under each finding before "... and N more".
LISTED = 20

_STYLE = {
    Severity.OK: "green",
    Severity.WARNING: "yellow",
    Severity.CRITICAL: "bold red",
    Severity.UNKNOWN: "magenta",
}


def _seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}s"


def backend_line(report: Report, backend: Backend, critical: bool = False) -> str:
    """``backend 123 (worker host:456) idle in transaction 130s, task name[id]``."""
    who = f"worker {backend.worker_label}" if backend.worker else backend.application_name
    parts = [f"backend {backend.pid} ({who or 'no application_name'})", backend.state_label]
    if backend.state is not None:
        parts[-1] += f" {_seconds(backend.state_seconds)}"
    if critical:
        parts.append("over the critical limit")
    task = report.task_label(backend)
    if task:
        parts.append(task if task.startswith("(") else f"task {task}")
    return ", ".join(parts)


def finding_lines(report: Report, finding: Finding) -> list[str]:
    lines = [f"{finding.severity.name} {finding.check}: {finding.summary}"]
    if finding.workers:
        shown = ", ".join(finding.workers[:LISTED])
        more = len(finding.workers) - LISTED
        lines.append(f"  worker processes: {shown}" + (f" and {more} more" if more > 0 else ""))
    for backend in finding.backends[:LISTED]:
        lines.append("  " + backend_line(report, backend, backend.pid in finding.critical_pids))
    if len(finding.backends) > LISTED:
        lines.append(f"  ... and {len(finding.backends) - LISTED} more backends")
    for ref in finding.gone[:LISTED]:
        lines.append(f"  gone: backend {ref.pid} ({ref.application_name})")
    return lines


def singleton_lines(report: Report) -> list[str]:
    """``singleton 'nightly' (task t) held by worker host:456 (backend 123) 40s, 2 waiting``."""
    lines = []
    for hold in report.snapshot.singleton_locks:
        holder = hold.holder
        who = f"worker {holder.worker_label}" if holder.worker else holder.application_name
        name = repr(hold.key) if hold.key is not None else f"advisory lock {hold.lock_id}"
        line = f"singleton {name}"
        if hold.task:
            line += f" (task {hold.task})"
        line += f" held by {who or 'no application_name'} (backend {holder.pid})"
        if hold.held_seconds is not None:
            line += f" for {_seconds(hold.held_seconds)}"
        if hold.waiters:
            line += f", {len(hold.waiters)} waiting"
        lines.append(line)
    return lines


def action_line(action: Action) -> str:
    if action.dry_run:
        return f"DRY RUN would terminate {action.description}"
    if action.terminated:
        return f"TERMINATED {action.description}"
    return f"NOT TERMINATED {action.description}: {action.error}"


def perfdata(report: Report) -> str:
    """Nagios performance data: ``label=value[unit];warn;crit;min;max`` ..."""
    snap, limits = report.snapshot, report.thresholds
    slots = snap.usable_slots
    by_state = snap.by_state()
    idle_tx = [b.state_seconds or 0.0 for b in snap.backends if b.idle_in_transaction]
    items = [
        f"backends={len(snap.backends)};;;0;{slots}",
        f"idle={by_state.get('idle', 0)};{limits.idle_warning.connections(slots):g};"
        f"{limits.idle_critical.connections(slots):g};0;{slots}",
        f"idle_in_transaction={len(idle_tx)}",
        f"oldest_idle_in_transaction={max(idle_tx, default=0.0):.1f}s;"
        f"{limits.idle_in_transaction_warning:g};{limits.idle_in_transaction_critical:g}",
    ]
    if report.rates is not None:
        items.append(
            f"connection_errors_per_minute={report.rates.errors_per_minute:.2f};"
            f"{limits.errors_warning:g};{limits.errors_critical:g}"
        )
    items.append(f"snapshot={snap.duration * 1000:.2f}ms")
    return " ".join(items)


def summary_line(report: Report) -> str:
    """The first line: status, the worst finding (or the counts), and perfdata."""
    if report.findings:
        text = report.findings[0].summary
        if len(report.findings) > 1:
            text += f" (+{len(report.findings) - 1} more)"
    else:
        snap = report.snapshot
        states = ", ".join(f"{count} {state}" for state, count in snap.by_state().items())
        text = f"{snap.database}: {len(snap.backends)} backends ({states or 'none'})"
    return f"LIFEGUARD {report.status.name} - {text} | {perfdata(report)}"


def report_lines(report: Report) -> list[str]:
    """Everything, as plain lines (the check's long output, the monitor without a TTY)."""
    lines = [summary_line(report)]
    for finding in report.findings:
        lines.extend(finding_lines(report, finding))
    if report.tasks is not None and report.tasks.error:
        lines.append(f"tasks unknown: {report.tasks.error}")
    lines.extend(singleton_lines(report))
    lines.extend(action_line(action) for action in report.actions)
    return lines


# --- the live view (rich) -------------------------------------------------------------


def live_view(report: Report, interval: float) -> Any:
    """A rich renderable of the report: header, states, findings, worker backends."""
    from rich.console import Group
    from rich.table import Table
    from rich.text import Text

    snap = report.snapshot
    header = Text()
    header.append(f"LIFEGUARD {report.status.name}", style=_STYLE[report.status])
    header.append(
        f"  {report.target}  prefix {snap.prefix!r}  every {interval:g}s  "
        f"snapshot {snap.duration * 1000:.1f} ms\n"
    )
    header.append(
        f"{len(snap.backends)} backends in {snap.database}, {snap.server_backends} on the "
        f"server, {snap.usable_slots} usable slots (max_connections {snap.max_connections})"
    )
    if report.rates is not None:
        delta = report.rates.delta
        header.append(
            f"\nsessions ended abnormally: {report.rates.errors_per_minute:.1f}/min "
            f"({delta.abandoned} abandoned, {delta.fatal} fatal, {delta.killed} killed "
            f"in {report.rates.seconds:.0f}s)"
        )
    states = Table(title="backends by state", title_justify="left")
    states.add_column("state")
    states.add_column("all", justify="right")
    states.add_column("workers", justify="right")
    workers = snap.by_state(snap.worker_backends)
    for state, count in snap.by_state().items():
        states.add_row(state, str(count), str(workers.get(state, 0)))
    parts: list[Any] = [header, states]
    for finding in report.findings:
        text = "\n".join(finding_lines(report, finding))
        parts.append(Text(text, style=_STYLE[finding.severity]))
    parts.extend(Text(action_line(action)) for action in report.actions)
    held = singleton_lines(report)
    if held:
        parts.append(Text("singleton locks\n" + "\n".join(held)))
    parts.append(_worker_table(report))
    return Group(*parts)


def _worker_table(report: Report) -> Any:
    from rich.table import Table

    table = Table(title="worker backends", title_justify="left", expand=True)
    for column in ("host", "worker pid", "backend", "state", "in state", "xact", "wait"):
        table.add_column(column, no_wrap=True)
    if report.tasks is not None:
        table.add_column("task")
    table.add_column("query", overflow="ellipsis", no_wrap=True, ratio=1)
    backends = sorted(
        report.snapshot.worker_backends,
        key=lambda b: (not b.idle_in_transaction, -(b.state_seconds or 0.0)),
    )
    for backend in backends:
        assert backend.worker is not None
        row = [
            backend.worker.hostname,
            str(backend.worker.pid),
            str(backend.pid),
            backend.state_label,
            _seconds(backend.state_seconds),
            _seconds(backend.transaction_seconds),
            backend.wait_event or "",
        ]
        if report.tasks is not None:
            row.append(report.task_label(backend) or "")
        row.append(" ".join((backend.query or "").split()))
        table.add_row(*row, style="red" if backend.idle_in_transaction else None)
    return table
