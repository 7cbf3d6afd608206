"""``lifeguard demo``: stock Celery against lifeguard, on real servers, in about two minutes.

With no arguments it needs no running services: it starts an embedded PostgreSQL
(password authentication, TLS when the binaries have it) and an embedded Redis, and
stops them at the end. The table's scenarios are in :mod:`lifeguard.demo.runner`; the
report's workload (the same load and faults on both sides) in :mod:`lifeguard.demo.timeline`.
Each phase is logged as a plain, flushed line as it starts and ends, on a terminal or not.

Exit status (docs/commands.md): 0 every scenario showed what it should, 1 one did not,
3 could not run (a bad option, a given server malformed or not answering, Ctrl-C); the
servers given are checked before anything starts.
"""

from __future__ import annotations

import os
import sys
import time

import click

from ..postgres.conninfo import redact_url
from ._exit import ContractCommand, Exit, cannot_run


@click.command(cls=ContractCommand)
@click.option(
    "--database-url",
    metavar="URL",
    help="A PostgreSQL superuser URL to use instead of an embedded server "
    "(the demo works in a database of its own, dropped at the end).",
)
@click.option(
    "--broker-url", metavar="URL", help="A Redis URL to use instead of an embedded Redis."
)
@click.option(
    "--tasks",
    type=click.IntRange(min=1),
    default=300,
    show_default=True,
    help="Tasks in the throughput run.",
)
@click.option(
    "--seconds",
    type=click.IntRange(min=20, max=600),
    default=26,
    show_default=True,
    help="Length of the report's workload on each side (stock, then lifeguard).",
)
@click.option(
    "--report",
    "report_path",
    default=None,
    type=click.Path(dir_okay=False, writable=True),
    help="Where to write the HTML report "
    "[default: lifeguard-reports/demo-<date>-<time>.html, ignored by git].",
)
def demo(
    database_url: str | None,
    broker_url: str | None,
    tasks: int,
    seconds: int,
    report_path: str | None,
) -> None:
    """Show the problems lifeguard fixes, side by side with stock Celery."""
    log = _PhaseLog()
    log.line("lifeguard demo: starting " + _what_starts(database_url, broker_url))
    from rich.console import Console
    from rich.table import Table

    try:
        from ..demo.runner import Demo, Services, ServiceUnavailable
        from ..demo.timeline import report_page, run_sides, summary_rows
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        cannot_run(f"the demo needs the 'demo' extra: pip install 'celery-lifeguard[demo]' ({exc})")

    console = Console()
    try:
        services = Services.start(database_url, broker_url)
    except ServiceUnavailable as exc:
        cannot_run(str(exc))
    run = Demo(services)
    try:
        log.line(f"PostgreSQL: {redact_url(services.server.url(run.database))}")
        log.line(f"Redis:      {redact_url(services.broker)}")
        run.create()
        run.run(tasks, log.phase)
        log.phase(None)
        stock, guarded = run_sides(run, float(seconds), log.line)
    finally:
        log.phase(None)
        run.drop()
        services.close()

    table = Table(
        title="stock Celery vs lifeguard (real workers; figures from PostgreSQL and /proc)"
    )
    table.add_column("scenario")
    table.add_column("stock Celery")
    table.add_column("with lifeguard.install(app)")
    table.add_column("")
    for row in run.rows:
        table.add_row(row.scenario, row.stock, row.lifeguard, "ok" if row.ok else "FAILED")
    console.print(table)
    activity = Table(title="pg_stat_activity while a lifeguard worker ran")
    for column in ("backend pid", "application_name", "state", "query"):
        activity.add_column(column)
    for pid, name, state, query in run.activity:
        activity.add_row(str(pid), name, str(state), str(query))
    console.print(activity)
    console.print(
        "stock: Celery's Django fixup closes connections around every task; the soft time "
        "limit and open-transaction rows use CELERY_DB_REUSE_MAX, the reuse knob Celery offers."
    )
    summary = Table(title=f"the report's workload: {seconds}s per side, the same faults")
    for column in ("", stock.title, guarded.title):
        summary.add_column(column)
    for cells in summary_rows(stock, guarded):
        summary.add_row(*cells)
    console.print(summary)
    from ..report import write_html

    target = report_path or _default_report()
    written = write_html([], target, page=report_page(stock, guarded))
    console.print(f"report: {written}", soft_wrap=True)
    assert guarded.record is not None
    missed = [c.title for c in guarded.record.criteria if c.failed]
    if missed:
        console.print(f"FAILED on the lifeguard side: {'; '.join(missed)}", soft_wrap=True)
    if missed or not all(row.ok for row in run.rows):
        raise SystemExit(Exit.WARNING)


def _what_starts(database_url: str | None, broker_url: str | None) -> str:
    wanted = [
        "an embedded PostgreSQL" if database_url is None else "",
        "an embedded Redis" if broker_url is None else "",
    ]
    started = " and ".join(part for part in wanted if part)
    return started + " (a few seconds)" if started else "checking the servers given"


def _default_report() -> str:
    """``lifeguard-reports/`` in the current directory: where users look, ignored by git."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    return os.path.join("lifeguard-reports", f"demo-{stamp}.html")


class _PhaseLog:
    """Plain lines, flushed at once, on a terminal or not: each phase as it starts and
    ends, with the seconds since the demo started."""

    def __init__(self) -> None:
        self.t0 = time.monotonic()
        self.current: str | None = None
        self.since = self.t0

    def line(self, text: str) -> None:
        click.echo(f"[{time.monotonic() - self.t0:5.1f}s] {text}")
        sys.stdout.flush()

    def phase(self, text: str | None) -> None:
        """The scenario now running (None: none); the previous one is logged as ended."""
        if self.current is not None:
            self.line(f"{self.current}: done in {time.monotonic() - self.since:.1f}s")
        self.current, self.since = text, time.monotonic()
        if text is not None:
            self.line(f"{text}: start")
