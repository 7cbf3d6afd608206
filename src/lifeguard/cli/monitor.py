"""``lifeguard monitor``: the database's sessions, attributed to workers, refreshed live.

In a terminal it draws a live view (rich); piped, it prints the report as text, or as
one JSON document per line with ``--json``. With ``--prometheus-port`` it also serves
the latest report's figures to Prometheus (``--quiet`` to run as an exporter only).
A database that goes away after the start is reported and retried, not fatal.

Exit status (docs/commands.md): with ``--count``, the last report's status (0 OK,
1 WARNING, 2 CRITICAL, 3 UNKNOWN); without it the view runs until Ctrl-C, its normal
end, and exits 0. 3 when it could not start (a bad option, an unreachable database), or
when Ctrl-C stops a ``--count`` run early.
"""

from __future__ import annotations

import json
import sys
import time
from typing import Any

import click

from ..errors import ConfigurationError
from ..monitor.render import live_view, report_lines
from ..monitor.report import Monitor, Report
from ..monitor.target import DatabaseUnreachable
from ._database import (
    NagiosCommand,
    action_options,
    build_monitor,
    database_options,
    log_to_stderr,
    threshold_options,
)
from ._exit import Exit, cannot_run


def _count(ctx: click.Context, param: click.Parameter, value: int | None) -> int | None:
    if value is not None and value < 1:
        raise click.BadParameter(
            f"{value} refreshes: give 1 or more, or leave --count out to run until Ctrl-C"
        )
    return value


@click.command(cls=NagiosCommand)
@database_options
@threshold_options
@action_options
@click.option(
    "-i",
    "--interval",
    type=click.FloatRange(min=0.2),
    default=2.0,
    show_default=True,
    help="Seconds between refreshes.",
)
@click.option(
    "-n",
    "--count",
    type=int,
    callback=_count,
    metavar="N",
    help="Stop after N refreshes (at least 1) and exit with the last report's status "
    "(0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN). Default: run until Ctrl-C, then exit 0.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON report per line.")
@click.option(
    "--prometheus-port",
    type=click.IntRange(1, 65535),
    help="Serve the latest report's figures to Prometheus on this port.",
)
@click.option(
    "--prometheus-address",
    default="0.0.0.0",
    show_default=True,
    help="Address the Prometheus endpoint listens on.",
)
@click.option("--quiet", is_flag=True, help="Print no report (e.g. as a Prometheus exporter).")
def monitor(
    *,
    interval: float,
    count: int | None,
    as_json: bool,
    prometheus_port: int | None,
    prometheus_address: str,
    quiet: bool,
    **options: Any,
) -> None:
    """Watch the database's sessions and the worker processes behind them.

    Exit status: with --count, the last report's (0 OK, 1 WARNING, 2 CRITICAL,
    3 UNKNOWN); without, 0 at Ctrl-C. 3 when it could not run (docs/commands.md).
    """
    log_to_stderr()
    try:
        watcher = build_monitor(options)
    except ConfigurationError as exc:
        cannot_run(str(exc))
    try:
        try:
            report = watcher.report()
        except DatabaseUnreachable as exc:
            cannot_run(str(exc))
        collector = _serve(prometheus_port, prometheus_address) if prometheus_port else None
        last = _run(
            watcher, report, collector, interval=interval, count=count, as_json=as_json, quiet=quiet
        )
    except KeyboardInterrupt:
        if count is not None:
            cannot_run(f"interrupted before {count} refreshes")
        click.get_current_context().exit(Exit.OK)  # the normal end of a live view
    finally:
        watcher.close()
    if last is None:
        cannot_run("the database did not answer the last refresh")
    click.get_current_context().exit(last.status.exit_code)


def _serve(port: int, address: str) -> Any:
    try:
        from ..monitor.prometheus import ReportCollector, serve
    except ImportError:
        cannot_run(
            "--prometheus-port needs prometheus_client: pip install 'celery-lifeguard[prometheus]'"
        )
    collector = ReportCollector()
    try:
        serve(collector, port, address)
    except OSError as exc:
        cannot_run(f"cannot listen on {address}:{port}: {exc}")
    return collector


def _run(
    watcher: Monitor,
    report: Report | None,
    collector: Any,
    *,
    interval: float,
    count: int | None,
    as_json: bool,
    quiet: bool,
) -> Report | None:
    """Refresh until ``count`` refreshes (forever if None); the last report, or None if
    the database did not answer it."""
    live = None
    if not (as_json or quiet) and sys.stdout.isatty():
        from rich.live import Live

        live = Live(auto_refresh=False, transient=False)
        live.start()
    refreshes = 0
    try:
        while True:
            started = time.monotonic()
            if report is not None:
                if collector is not None:
                    collector.update(report)
                _show(report, live, interval, as_json, quiet)
            refreshes += 1
            if count is not None and refreshes >= count:
                return report
            time.sleep(max(interval - (time.monotonic() - started), 0.0))
            try:
                report = watcher.report()
            except DatabaseUnreachable as exc:
                report = None
                if collector is not None:
                    collector.failed()
                click.echo(f"lifeguard monitor: {exc}; retrying in {interval:g}s", err=True)
    finally:
        if live is not None:
            live.stop()


def _show(report: Report, live: Any, interval: float, as_json: bool, quiet: bool) -> None:
    if quiet:
        return
    if as_json:
        click.echo(json.dumps(report.to_json(), default=str))
    elif live is not None:
        live.update(live_view(report, interval), refresh=True)
    else:
        click.echo("\n".join(report_lines(report)) + "\n")
