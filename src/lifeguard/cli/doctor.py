"""``lifeguard doctor``: audit a Celery app's configuration for connection and memory
health, with the setting that fixes each finding.

Loads the app as a worker would (its task modules and Django settings), reads the
database server's settings when it can, runs every rule (docs/doctor.md) and prints the
findings, worst first. Exit status (docs/commands.md): 0 OK (no finding, or only
info), 1 WARNING, 2 CRITICAL, 3 UNKNOWN (the app could not be loaded, a bad option, or
the database could not be read; a critical finding still exits 2).
"""

from __future__ import annotations

import json
from typing import Any, NoReturn

import click

from ..errors import ConfigurationError
from ..monitor.target import ENV_URL
from ._database import NagiosCommand, load_app
from ._exit import Exit

POOLS = ["prefork", "threads", "gevent", "eventlet", "solo"]
PGBOUNCER_MODES = ["transaction", "statement", "session", "none"]


@click.command(cls=NagiosCommand)
@click.option(
    "-A",
    "--app",
    metavar="APP",
    help="The Celery app, as for celery -A (e.g. proj.celery:app).",
)
@click.option(
    "--database-url",
    metavar="URL",
    help=f"PostgreSQL URL of the app's database (else ${ENV_URL}, else the app's "
    "Django/SQLAlchemy settings). Connect as the workers' role: per-role settings count.",
)
@click.option(
    "--database-alias",
    default="default",
    show_default=True,
    help="The Django DATABASES alias to read the server through.",
)
@click.option("--no-database", is_flag=True, help="Do not read the server; its rules are skipped.")
@click.option(
    "-P",
    "--pool",
    type=click.Choice(POOLS),
    help="The pool the workers run (celery worker -P), when app.conf does not say.",
)
@click.option(
    "-c",
    "--concurrency",
    type=click.IntRange(min=1),
    help="The workers' concurrency (celery worker -c; with --autoscale, its maximum).",
)
@click.option(
    "--max-tasks-per-child",
    type=click.IntRange(min=1),
    help="As given to celery worker, when not in app.conf.",
)
@click.option(
    "--max-memory-per-child",
    type=click.IntRange(min=1),
    metavar="KIB",
    help="As given to celery worker (KiB), when not in app.conf.",
)
@click.option(
    "--hosts",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Worker hosts (or worker instances) started this way on the same database.",
)
@click.option(
    "--web-processes",
    type=click.IntRange(min=0),
    default=0,
    show_default=True,
    help="Web processes using the same Django DATABASES (processes x threads for threaded "
    "servers), for the connection budget.",
)
@click.option(
    "--pgbouncer",
    type=click.Choice(PGBOUNCER_MODES),
    help="How PgBouncer in front of the database pools (default: detected; 'none': no pooler).",
)
@click.option(
    "--ignore",
    multiple=True,
    metavar="ID",
    help="Leave out these rules (repeat, or comma-separated: --ignore LG009,LG020).",
)
@click.option(
    "--connect-timeout",
    type=click.FloatRange(min=1),
    default=5.0,
    show_default=True,
    help="Seconds to wait for the database, per connection and per query.",
)
@click.option("--list-rules", is_flag=True, help="List the rules and exit.")
@click.option("--json", "as_json", is_flag=True, help="Print the findings as one JSON document.")
@click.pass_context
def doctor(
    ctx: click.Context,
    /,
    *,
    app: str | None,
    database_url: str | None,
    database_alias: str,
    no_database: bool,
    ignore: tuple[str, ...],
    connect_timeout: float,
    list_rules: bool,
    as_json: bool,
    pgbouncer: str | None,
    **shape: Any,
) -> None:
    """Audit a Celery app; exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN."""
    from ..doctor import all_rules, diagnose
    from ..doctor.render import print_report, to_json

    if list_rules:
        for entry in all_rules():
            click.echo(f"{entry.id}  {entry.name}: {entry.title}")
        return
    if not app:
        _fail(ctx, "which app? pass -A/--app (as for celery -A)", as_json)
    ignored = {part.strip().upper() for item in ignore for part in item.split(",") if part.strip()}
    unknown = sorted(ignored - {entry.id for entry in all_rules()})
    if unknown:
        _fail(ctx, f"--ignore: no rule {', '.join(unknown)} (see --list-rules)", as_json)
    try:
        context = _examine(
            app,
            database_url=database_url,
            database_alias=database_alias,
            no_database=no_database,
            timeout=connect_timeout,
            pgbouncer=pgbouncer,
            shape=shape,
        )
    except ConfigurationError as exc:
        _fail(ctx, str(exc), as_json)
    diagnosis = diagnose(context, ignored)
    if as_json:
        click.echo(json.dumps(to_json(context, diagnosis), indent=2, default=str))
    else:
        from rich.console import Console

        print_report(context, diagnosis, Console(highlight=False))
    ctx.exit(diagnosis.exit_code)


def _examine(
    app_name: str,
    *,
    database_url: str | None,
    database_alias: str,
    no_database: bool,
    timeout: float,
    pgbouncer: str | None,
    shape: dict[str, Any],
) -> Any:
    """Load the app as a worker does and gather the doctor's context; raises
    :class:`ConfigurationError` (exit 3) when the app cannot be loaded."""
    from ..doctor.context import gather, import_task_modules, inspecting
    from ..doctor.reading import attach_server

    with inspecting():
        app = load_app(app_name)
        import_task_modules(app)
        context = gather(app, app_name, pgbouncer_mode=pgbouncer, **shape)
    if no_database:
        context.server_skip = "--no-database"
    else:
        attach_server(context, url=database_url, alias=database_alias, timeout=timeout)
    return context


def _fail(ctx: click.Context, message: str, as_json: bool) -> NoReturn:
    from ..doctor.render import error_json

    if as_json:
        click.echo(json.dumps(error_json(message)))
    else:
        click.echo(f"lifeguard doctor: {message}", err=True)
    ctx.exit(Exit.CANNOT_RUN)
    raise AssertionError("unreachable: click's exit raises")
