"""``lifeguard migrate``: create the ``lifeguard_once`` table (with the effect columns of
an external effect's claim, added to an older table), and prune old keys.

Exit status (docs/commands.md): 0 done, 3 could not run (no URL, unreachable database,
a role that may not create or delete, a bad ``--prune-older-than``).
"""

from __future__ import annotations

import os
from typing import Any

import click

from ..concerns.once import prune
from ..monitor.target import ENV_URL
from ..postgres import once_sql as sql
from ..postgres.conninfo import error_line, redact_url
from ..postgres.failures import chain_sqlstate
from ._exit import ContractCommand, cannot_run


def _retention(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    if value is None:
        return None
    try:
        sql.parse_retention(value)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None
    return value


def connect(database_url: str | None) -> tuple[str, Any]:
    """(the URL, a psycopg connection in autocommit) of ``--database-url`` or ``$ENV_URL``."""
    url = database_url or os.environ.get(ENV_URL)
    if not url:
        cannot_run(f"give --database-url or set ${ENV_URL}")
    import psycopg

    try:
        return url, psycopg.connect(url, autocommit=True, connect_timeout=10)
    except psycopg.Error as exc:
        cannot_run(f"cannot connect to {redact_url(url)}: {error_line(exc, url)}")


DATABASE_URL_HELP = (
    f"PostgreSQL URL of the database that holds the tasks' tables (else ${ENV_URL})."
)


@click.command(cls=ContractCommand)
@click.option(
    "--database-url",
    metavar="URL",
    help=DATABASE_URL_HELP,
)
@click.option(
    "--prune-older-than",
    metavar="AGE",
    callback=_retention,
    help="Also delete keys older than AGE (30d, 12h, 2w; the documented retention is "
    f"{sql.DEFAULT_RETENTION_DAYS}d, longer than any redelivery window).",
)
@click.option("--sql", "print_sql", is_flag=True, help="Print the SQL instead of running it.")
def migrate(database_url: str | None, prune_older_than: str | None, print_sql: bool) -> None:
    """Create the lifeguard_once table and its index (idempotent); optionally prune."""
    if print_sql:
        for statement in [*sql.MIGRATION, *sql.EFFECT_MIGRATION]:
            click.echo(f"{statement};")
        return
    url, conn = connect(database_url)
    import psycopg

    with conn:
        try:
            for statement in [*sql.MIGRATION, *sql.EFFECT_MIGRATION]:
                conn.execute(statement)
            click.echo(f"{sql.TABLE}: ready")
            if prune_older_than:
                deleted = prune(conn, prune_older_than)
                click.echo(f"{sql.TABLE}: {deleted} keys older than {prune_older_than} deleted")
        except psycopg.Error as exc:
            user = conn.info.user
            if chain_sqlstate(exc) == sql.INSUFFICIENT_PRIVILEGE:
                cannot_run(
                    f"role {user!r} may not create or change {sql.TABLE}: "
                    f"{error_line(exc, url)}; as the schema's owner run "
                    f"`lifeguard migrate`, then GRANT SELECT, INSERT, UPDATE, DELETE ON "
                    f"{sql.TABLE} TO {user}"
                )
            cannot_run(error_line(exc, url))
