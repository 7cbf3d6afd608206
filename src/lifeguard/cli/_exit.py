"""The exit status of every ``lifeguard`` command, in one place (docs/commands.md).

======  ==============================================================================
status  meaning
======  ==============================================================================
0       ok
1       warning (``check``, ``monitor``, ``doctor``), fail (``validate``, ``demo``)
2       critical
3       could not run: a bad option or value, an unreachable database or broker, a
        malformed URL, a missing privilege, an app that cannot be loaded, Ctrl-C
======  ==============================================================================

click exits 2 on a usage error, which Nagios reads as CRITICAL: :class:`ContractCommand`
and :class:`ContractGroup` turn every usage error, every :class:`click.ClickException`
and Ctrl-C into 3, with click's one-line message and no traceback. A worker stopped by
lifeguard's configuration exits 78 (EX_CONFIG); that one is
:class:`lifeguard.lifecycle.WorkerStartupError`.
"""

from __future__ import annotations

import enum
from typing import IO, Any, NoReturn

import click

from ..errors import LifeguardError


class Exit(enum.IntEnum):
    """The exit statuses of the contract."""

    OK = 0
    WARNING = 1  # also a failed validation, a demo scenario that went wrong
    CRITICAL = 2
    CANNOT_RUN = 3


class CannotRun(click.ClickException):
    """The command could not run: one line ``lifeguard <command>: <message>`` on stderr,
    exit status 3."""

    exit_code = Exit.CANNOT_RUN

    def __init__(self, message: str, command: str | None = None) -> None:
        super().__init__(message)
        self.command = command or command_name(click.get_current_context(silent=True))

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"{self.command}: {self.format_message()}", err=True, file=file)


def command_name(ctx: click.Context | None) -> str:
    """``lifeguard <command>``, whatever the program was started as (``python -c``...)."""
    names: list[str] = []
    while ctx is not None and ctx.parent is not None:
        names.append(ctx.info_name or "")
        ctx = ctx.parent
    return " ".join(["lifeguard", *reversed(names)])


def cannot_run(message: str) -> NoReturn:
    """Stop the running command with status 3 and this one-line message on stderr."""
    raise CannotRun(message)


class _Contract:
    """The exit-status rules, for a click command or group."""

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)  # type: ignore[misc, no-any-return]
        except click.ClickException as exc:  # a bad option or value, click's message
            setattr(exc, "exit_code", Exit.CANNOT_RUN)  # noqa: B010 - a class variable
            raise

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)  # type: ignore[misc]
        except click.ClickException as exc:  # a subcommand's usage error, or the command's
            setattr(exc, "exit_code", Exit.CANNOT_RUN)  # noqa: B010 - a class variable
            raise
        except LifeguardError as exc:  # a command that did not catch its own: no traceback
            raise CannotRun(str(exc), command_name(ctx)) from None
        except KeyboardInterrupt:
            raise CannotRun("interrupted", command_name(ctx)) from None


class ContractCommand(_Contract, click.Command):
    """A ``lifeguard`` subcommand that keeps the exit-status contract."""


class ContractGroup(_Contract, click.Group):
    """The ``lifeguard`` group: an unknown command exits 3 as well."""
