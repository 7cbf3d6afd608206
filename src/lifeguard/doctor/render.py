"""The doctor's output: a text report for people (rich), and JSON for programs.

The JSON document is versioned by its ``schema`` field (``lifeguard.doctor/1``); fields
are only ever added within a version. docs/doctor.md describes every field.
"""

from __future__ import annotations

import textwrap
from typing import Any

from rich.console import Console
from rich.text import Text

from ..monitor.thresholds import Severity
from .budget import Budget, connection_budget
from .context import DoctorContext
from .findings import Diagnosis, Finding, Level, Skipped

SCHEMA = "lifeguard.doctor/1"
MIB = 1024 * 1024

_STYLE = {Level.CRITICAL: "bold red", Level.WARNING: "yellow", Level.INFO: "cyan"}
_STATUS_STYLE = {
    Severity.OK: "green",
    Severity.WARNING: "yellow",
    Severity.CRITICAL: "bold red",
    Severity.UNKNOWN: "magenta",
}


def budget_of(ctx: DoctorContext) -> Budget | None:
    """The connection budget against the server that was read (not through a pooler)."""
    server = ctx.server
    if server is None or server.pooler is not None:
        return None
    if not (ctx.shape.concurrency_known or ctx.assume_shape):
        return None
    budget = connection_budget(ctx, server.endpoint, server.snapshot.usable_slots)
    return budget if budget.worker_lines or budget.web_lines else None


# --- JSON --------------------------------------------------------------------------------


def to_json(ctx: DoctorContext, diagnosis: Diagnosis) -> dict[str, Any]:
    return {
        "schema": SCHEMA,
        "status": diagnosis.status.name,
        "exit_code": diagnosis.exit_code,
        "app": ctx.app_name,
        "counts": diagnosis.counts(),
        "findings": [finding.to_json() for finding in diagnosis.findings],
        "skipped": [skipped.to_json() for skipped in diagnosis.skipped],
        "context": context_json(ctx),
    }


def error_json(message: str) -> dict[str, Any]:
    """The document of a doctor that could not run at all."""
    return {
        "schema": SCHEMA,
        "status": Severity.UNKNOWN.name,
        "exit_code": Severity.UNKNOWN.exit_code,
        "error": message,
    }


def context_json(ctx: DoctorContext) -> dict[str, Any]:
    shape = ctx.shape
    budget = budget_of(ctx)
    return {
        "celery_version": ".".join(map(str, ctx.celery_version)),
        "lifeguard": {"installed": ctx.installed, "options_error": ctx.options_error},
        "worker": {
            "pool": shape.kind.value,
            "pool_source": shape.pool.source,
            "concurrency": shape.concurrency.value,
            "concurrency_source": shape.concurrency.source,
            "max_tasks_per_child": _value(shape.max_tasks_per_child),
            "max_memory_per_child_kib": _value(shape.max_memory_per_child),
            "hosts": shape.hosts,
            "web_processes": shape.web_processes,
        },
        "tasks": len(ctx.tasks),
        "django": None
        if ctx.django is None
        else [
            {
                "alias": alias.alias,
                "database": alias.description,
                "conn_max_age": alias.conn_max_age,
                "pool": None if alias.pool is None else dict(alias.pool),
                "managed_by_lifeguard": ctx.manages(alias),
            }
            for alias in ctx.django
        ],
        "sqlalchemy": None
        if ctx.engines is None
        else [
            {
                "engine": engine.label,
                "async": engine.is_async,
                "driver": engine.driver,
                "pool_class": engine.pool_class,
                "pool_size": engine.pool_size,
                "max_overflow": engine.max_overflow,
                "registered": engine.registered,
                "connections_after_import": engine.connections,
            }
            for engine in ctx.engines
        ],
        "birth_rss_estimate_bytes": ctx.birth_rss,
        "database": _database_json(ctx),
        "budget": None if budget is None else budget.to_json(),
    }


def _value(setting: Any) -> Any:
    return None if setting is None else setting.value


def _database_json(ctx: DoctorContext) -> dict[str, Any]:
    server = ctx.server
    if server is None:
        return {"read": False, "target": ctx.target, "reason": ctx.server_skip}
    snap = server.snapshot
    return {
        "read": True,
        "target": str(server.target),
        "server_version": snap.server_version,
        "database": snap.database,
        "role": snap.role,
        "max_connections": snap.max_connections,
        "superuser_reserved_connections": snap.superuser_reserved,
        "reserved_connections": snap.reserved,
        "usable_slots": snap.usable_slots,
        "client_backends": snap.server_backends,
        "settings": {
            name: {"value": setting.value, "source": setting.source}
            for name, setting in sorted(server.settings.items())
        },
        "pooler": None
        if server.pooler is None
        else {"mode": server.pooler.mode, "source": server.pooler.source},
    }


# --- text --------------------------------------------------------------------------------


def print_report(ctx: DoctorContext, diagnosis: Diagnosis, console: Console) -> None:
    for line in report_lines(ctx, diagnosis, max(console.width, 60)):
        console.print(line, soft_wrap=True)


def report_lines(ctx: DoctorContext, diagnosis: Diagnosis, width: int = 100) -> list[Text]:
    """The text report, wrapped to ``width`` (continuation lines indented, no padding)."""
    lines = [Text(f"lifeguard doctor: {ctx.app_name}", style="bold")]
    for line in summary_lines(ctx):
        lines += _wrap(Text("  "), line, width)
    for finding in diagnosis.findings:
        lines.append(Text())
        lines += _finding(finding, width)
    if diagnosis.skipped:
        lines.append(Text())
        lines += _skipped(diagnosis.skipped, width, ctx.server_skip)
    lines += [Text(), _verdict(diagnosis)]
    return lines


def _wrap(head: Text, body: str, width: int, style: str = "") -> list[Text]:
    """``head`` then ``body`` wrapped to ``width``, continuation lines under the body."""
    indent = len(head.plain)
    chunks = textwrap.wrap(body, max(width - indent, 20), break_on_hyphens=False) or [""]
    lines = [Text.assemble(head, (chunks[0], style))]
    lines += [Text.assemble(" " * indent, (chunk, style)) for chunk in chunks[1:]]
    return lines


def summary_lines(ctx: DoctorContext) -> list[str]:
    shape = ctx.shape
    lines = [
        f"Celery {'.'.join(map(str, ctx.celery_version))}, lifeguard "
        f"{'installed' if ctx.installed else 'NOT installed'}, "
        f"{len(ctx.tasks)} task(s); pool {shape.kind.value} ({shape.pool.source}), "
        f"concurrency {shape.concurrency.value} ({shape.concurrency.source}), "
        f"{shape.hosts} host(s)"
        + (f", {shape.web_processes} web process(es)" if shape.web_processes else "")
    ]
    for alias in ctx.postgres_aliases():
        pool = (
            f", native pool min_size {alias.pool_min_size} max_size {alias.pool_max_size}"
            if alias.pool is not None
            else ""
        )
        age = "None" if alias.conn_max_age is None else f"{alias.conn_max_age:g}"
        lines.append(f"Django {alias.description}: CONN_MAX_AGE={age}{pool}")
    for engine in ctx.all_engines():
        size = f" {engine.pool_size}+{engine.max_overflow}" if engine.pool_size is not None else ""
        lines.append(
            f"SQLAlchemy {'AsyncEngine' if engine.is_async else 'engine'} {engine.label}: "
            f"{engine.pool_class}{size}, "
            f"{'registered with lifeguard' if engine.registered else 'not registered'}"
        )
    if ctx.birth_rss is not None:
        lines.append(
            f"memory: a worker process starts at about {ctx.birth_rss / MIB:.1f} MiB RSS "
            "(estimate: this process after importing the app)"
        )
    server = ctx.server
    if server is None:
        lines.append(f"database: not read ({ctx.server_skip})")
    else:
        snap = server.snapshot
        version = f"{snap.server_version // 10000}.{snap.server_version % 10000}"
        via = f"; through a pooler, mode {server.pooler.mode or 'unknown'}" if server.pooler else ""
        lines.append(
            f"database: {server.target} as role {snap.role}: PostgreSQL {version}, "
            f"{snap.usable_slots} usable connection slots of {snap.max_connections}, "
            f"{snap.server_backends} client backend(s) now{via}"
        )
    budget = budget_of(ctx)
    if budget is not None:
        lines.append(
            f"budget: {budget.formula()} connections, {budget.share:.0%} of "
            f"{budget.usable} usable slots"
        )
    return lines


def _finding(finding: Finding, width: int) -> list[Text]:
    head = Text.assemble(
        (f"{finding.level.value.upper():<8}", _STYLE[finding.level]), " ", (finding.id, "bold"), " "
    )
    return [
        *_wrap(head, finding.title, width),
        *_wrap(Text.assemble("    ", ("why  ", "dim")), finding.why, width),
        *_wrap(Text.assemble("    ", ("fix  ", "dim")), finding.fix, width, "green"),
    ]


def _skipped(skipped: tuple[Skipped, ...], width: int, server_skip: str) -> list[Text]:
    by_reason: dict[str, list[str]] = {}
    for entry in skipped:
        reason = (
            "the database was not read (see above)" if entry.reason == server_skip else entry.reason
        )
        by_reason.setdefault(reason, []).append(entry.id)
    lines: list[Text] = []
    for reason, ids in by_reason.items():
        head = Text.assemble(("SKIPPED ", "dim"), " ")
        lines += _wrap(head, f"{', '.join(ids)}: {reason}", width)
    return lines


def _verdict(diagnosis: Diagnosis) -> Text:
    counts = diagnosis.counts()
    status = diagnosis.status
    text = (
        f"{counts['critical']} critical, {counts['warning']} warning(s), "
        f"{counts['info']} info; {len(diagnosis.skipped)} rule(s) skipped. "
    )
    return Text.assemble(
        text,
        (f"Exit status {status.exit_code} ({status.name})", _STATUS_STYLE[status]),
    )
