"""``lifeguard demo``: stock Celery against lifeguard, on real servers, in one minute."""

from __future__ import annotations

import click


@click.command()
def demo() -> None:
    """Show the problems lifeguard fixes, side by side with stock Celery."""
    raise click.ClickException("the demo is being written")
