"""``lifeguard check``: one look at the database, Nagios-style, for cron and alerting.

Exit status: 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN (database unreachable, bad option,
or a monitor that may not see the workers' sessions). The first line of output is the
status, the worst finding and performance data; the lines after it name the backends,
the worker processes and (with ``-A``) the tasks behind each finding.

Connection-error rates need two readings of the session counters: each run keeps its
reading in a small state file and compares it with the previous run's.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, NoReturn

import click

from ..errors import ConfigurationError
from ..monitor.render import report_lines
from ..monitor.report import Monitor
from ..monitor.snapshot import Baseline, baseline_from_json, baseline_to_json
from ..monitor.target import DatabaseUnreachable
from ..monitor.thresholds import Severity
from ._database import (
    UsageErrorExits3,
    action_options,
    build_monitor,
    database_options,
    log_to_stderr,
    threshold_options,
)


@click.command(cls=UsageErrorExits3)
@database_options
@threshold_options
@action_options
@click.option(
    "--state-file",
    type=click.Path(dir_okay=False),
    help="Where to keep the session counters between runs (default: a file per "
    "database under $XDG_STATE_HOME/lifeguard).",
)
@click.option(
    "--no-state", is_flag=True, help="Keep nothing between runs (no connection-error rate)."
)
@click.option("--json", "as_json", is_flag=True, help="Print the whole report as JSON.")
@click.pass_context
def check(
    ctx: click.Context, /, *, as_json: bool, state_file: str | None, no_state: bool, **options: Any
) -> None:
    """Check the database once; exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN."""
    log_to_stderr()
    try:
        monitor = build_monitor(options)
    except ConfigurationError as exc:
        _unknown(ctx, str(exc), as_json)
    path = None if no_state else Path(state_file) if state_file else _default_state(monitor)
    try:
        report = monitor.report(_read_baseline(path, monitor))
    except DatabaseUnreachable as exc:
        _unknown(ctx, str(exc), as_json)
    finally:
        monitor.close()
    if path is not None:
        _write_baseline(path, monitor, report.snapshot.baseline())
    if as_json:
        click.echo(json.dumps(report.to_json(), indent=2, default=str))
    else:
        click.echo("\n".join(report_lines(report)))
    ctx.exit(report.status.exit_code)


def _unknown(ctx: click.Context, message: str, as_json: bool) -> NoReturn:
    code = Severity.UNKNOWN.exit_code
    if as_json:
        click.echo(json.dumps({"status": "UNKNOWN", "exit_code": code, "error": message}))
    else:
        click.echo(f"LIFEGUARD UNKNOWN - {message}")
    ctx.exit(code)


def _identity(monitor: Monitor) -> str:
    return f"{monitor.target.where}|{monitor.prefix}"


def _default_state(monitor: Monitor) -> Path:
    root = os.environ.get("XDG_STATE_HOME") or os.path.expanduser("~/.local/state")
    digest = hashlib.sha1(_identity(monitor).encode()).hexdigest()[:16]
    return Path(root) / "lifeguard" / f"check-{digest}.json"


def _read_baseline(path: Path | None, monitor: Monitor) -> Baseline | None:
    if path is None or not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
        if data.get("identity") != _identity(monitor):
            return None  # another database or prefix: no rate this time
        return baseline_from_json(data["baseline"])
    except (OSError, ValueError, KeyError, TypeError):
        return None  # unreadable: start over


def _write_baseline(path: Path, monitor: Monitor, baseline: Baseline) -> None:
    """Write atomically: a cron run killed halfway leaves the previous file whole."""
    data = {"identity": _identity(monitor), "baseline": baseline_to_json(baseline)}
    temporary: str | None = None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
        with os.fdopen(fd, "w") as file:
            json.dump(data, file)
        os.replace(temporary, path)
    except OSError as exc:
        click.echo(f"lifeguard check: cannot write the state file {path}: {exc}", err=True)
        if temporary is not None:
            with contextlib.suppress(OSError):
                os.unlink(temporary)
