"""The ``lifeguard`` command. Each subcommand lives in a module of its own."""

from __future__ import annotations

import importlib
from typing import Any

import click

from ..version import __version__
from ._exit import ContractGroup

# name -> "module:attribute" of a click command, imported only when it runs.
COMMANDS: dict[str, str] = {
    "check": "lifeguard.cli.check:check",
    "demo": "lifeguard.cli.demo:demo",
    "doctor": "lifeguard.cli.doctor:doctor",
    "effects": "lifeguard.cli.effects:effects",
    "migrate": "lifeguard.cli.migrate:migrate",
    "monitor": "lifeguard.cli.monitor:monitor",
    "validate": "lifeguard.cli.validate:validate",
}


class _LazyGroup(ContractGroup):
    """Imports a subcommand's module only when that subcommand is used."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        target = COMMANDS.get(cmd_name)
        if target is None:
            return None
        module, _, attribute = target.partition(":")
        command: Any = getattr(importlib.import_module(module), attribute)
        return command  # type: ignore[no-any-return]


@click.group(cls=_LazyGroup)
@click.version_option(__version__, prog_name="lifeguard")
def main() -> None:
    """Healthy database connections and memory for Celery workers."""
