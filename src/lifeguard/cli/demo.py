"""``lifeguard demo``: stock Celery against lifeguard, on real servers, in about a minute.

With no arguments it needs no running services: it starts an embedded PostgreSQL
(password authentication, TLS when the binaries have it) and an embedded Redis, and
stops them at the end. The scenarios are in :mod:`lifeguard.demo.runner`.

Exit status (docs/commands.md): 0 every scenario showed what it should, 1 one did not,
3 could not run (a bad option, a given server malformed or not answering, Ctrl-C); the
servers given are checked before anything starts.
"""

from __future__ import annotations

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
    "--report",
    "report_path",
    default="lifeguard-demo.html",
    show_default=True,
    type=click.Path(dir_okay=False, writable=True),
    help="Where to write the HTML report (charts of the same load on stock and lifeguard).",
)
def demo(database_url: str | None, broker_url: str | None, tasks: int, report_path: str) -> None:
    """Show the problems lifeguard fixes, side by side with stock Celery."""
    from rich.console import Console
    from rich.table import Table

    try:
        from ..demo.runner import Demo, Services, ServiceUnavailable
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        cannot_run(f"the demo needs the 'demo' extra: pip install 'celery-lifeguard[demo]' ({exc})")

    console = Console()
    try:
        with console.status("starting services"):
            services = Services.start(database_url, broker_url)
    except ServiceUnavailable as exc:
        cannot_run(str(exc))
    run = Demo(services)
    try:
        console.print(f"PostgreSQL: {redact_url(services.server.url(run.database))}")
        console.print(f"Redis:      {redact_url(services.broker)}")
        run.create()
        with console.status("") as status:

            def progress(text: str) -> None:
                status.update(f"running: {text}")

            run.run(tasks, progress)
            records = run.report_records(progress)
    finally:
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
    from ..report import write_html

    written = write_html(records, report_path, title="lifeguard demo: stock Celery vs lifeguard")
    console.print(f"report: {written}")
    if not all(row.ok for row in run.rows):
        raise SystemExit(Exit.WARNING)
