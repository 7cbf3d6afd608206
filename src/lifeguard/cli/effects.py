"""``lifeguard effects``: the external effects claimed and not completed, and resolving one.

``list`` exits 1 when an orphaned claim is there (its owner died mid-effect and nothing
resolved it yet: with ``on_orphan="fail"`` every run of that key fails until an operator
resolves it), 0 otherwise; ``resolve`` exits 0 when done, 3 when it could not (no such
unresolved claim, an owner still alive, an unreachable database, a bad ``--result``).
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

from ..concerns.effects import resolve_effect, unresolved_effects
from ..postgres import once_sql as sql
from ..postgres.conninfo import error_line
from ._exit import ContractCommand, ContractGroup, Exit, cannot_run
from .migrate import DATABASE_URL_HELP, connect

_database_url = click.option("--database-url", metavar="URL", help=DATABASE_URL_HELP)


@click.group(cls=ContractGroup)
def effects() -> None:
    """External effects (lifeguard.effect) claimed and never completed."""


@effects.command("list", cls=ContractCommand)
@_database_url
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
def list_claims(database_url: str | None, limit: int) -> None:
    """The claims not completed, oldest first: a live owner is running the effect; an
    orphaned one died mid-effect (exit status 1)."""
    import psycopg

    url, conn = connect(database_url)
    with conn:
        try:
            claims = unresolved_effects(conn, limit)
        except psycopg.Error as exc:
            error = sql.effect_storage_error(exc)
            cannot_run(str(error) if error else error_line(exc, url))
    if not claims:
        click.echo("no effect claimed and not completed")
        return
    for claim in claims:
        owner = "running (owner alive)" if claim.owner_alive else "ORPHANED (owner died)"
        click.echo(
            f"{claim.key}\t{owner}\ttask {claim.task_name or '-'}\tclaimed "
            f"{claim.claimed_at.isoformat(sep=' ', timespec='seconds')} by "
            f"{claim.claimed_by or '-'}\tidempotency key {claim.idempotency_key}"
        )
    if any(not claim.owner_alive for claim in claims):
        sys.exit(Exit.WARNING)


@effects.command(cls=ContractCommand)
@_database_url
@click.argument("key")
@click.option("--done", "action", flag_value="done", help="It happened: reruns return --result.")
@click.option("--skip", "action", flag_value="skip", help="Reruns do not run it (nor return).")
@click.option(
    "--release",
    "action",
    flag_value="release",
    help="Delete the claim: the next run runs it, with the same idempotency key.",
)
@click.option("--result", "result_json", metavar="JSON", help="With --done: the stored result.")
def resolve(
    database_url: str | None, key: str, action: str | None, result_json: str | None
) -> None:
    """Resolve the orphaned claim of KEY, after checking the remote side."""
    if action is None:
        cannot_run("say what happened: --done, --skip or --release")
    if result_json is not None and action != "done":
        cannot_run("--result goes with --done")
    result: Any = None
    if result_json is not None:
        try:
            result = json.loads(result_json)
        except ValueError as exc:
            cannot_run(f"--result is not JSON: {exc}")
    import psycopg

    url, conn = connect(database_url)
    with conn:
        try:
            resolve_effect(conn, key, action, result)  # type: ignore[arg-type]
        except psycopg.Error as exc:
            error = sql.effect_storage_error(exc)
            cannot_run(str(error) if error else error_line(exc, url))
    click.echo(f"{key}: {action}")
