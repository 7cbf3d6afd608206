"""Options shared by ``lifeguard monitor`` and ``lifeguard check``: which database,
which workers, which thresholds, which actions."""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from ..errors import ConfigurationError
from ..monitor.report import Monitor
from ..monitor.target import ENV_URL, resolve_target
from ..monitor.thresholds import ConnectionLimit, Thresholds
from ..postgres.appname import DEFAULT_PREFIX, validate_prefix
from ._exit import ContractCommand

F = TypeVar("F", bound=Callable[..., Any])

_DEFAULTS = Thresholds()


# The exit-status contract (0 ok, 1 warning, 2 critical, 3 could not run): _exit.py.
NagiosCommand = ContractCommand


def _apply(options: Sequence[Callable[[Any], Any]], function: F) -> F:
    for option in reversed(options):
        function = option(function)
    return function


# (option, default, type, help) of the timeouts.
_TIMEOUT_OPTIONS: list[tuple[str, float, Any, str]] = [
    (
        "--connect-timeout",
        5.0,
        click.FloatRange(min=1),
        "Seconds to wait for the database, per connection and per query.",
    ),
    (
        "--inspect-timeout",
        1.0,
        click.FloatRange(min=0.1),
        "Seconds to wait for the workers' answer to inspect().active(), with -A.",
    ),
]


def _check_prefix(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Refuse an unusable --prefix at the parser (``--prefix ""`` would match nothing)."""
    if value is None:
        return None
    if not value:
        raise click.BadParameter(
            "is empty: give the application_name prefix of the workers' connections "
            f"(their lifeguard option application_name_prefix, {DEFAULT_PREFIX!r} by "
            "default), or leave --prefix out to use the app's"
        )
    problem = validate_prefix(value)
    if problem:
        raise click.BadParameter(problem)
    return value


def database_options(function: F) -> F:
    return _apply(
        [
            click.option(
                "--database-url",
                metavar="URL",
                help=f"PostgreSQL URL of the database to watch (else ${ENV_URL}, "
                "else the app's Django/SQLAlchemy settings).",
            ),
            click.option(
                "-A",
                "--app",
                metavar="APP",
                help="The Celery app (as for celery -A): its database settings, its "
                "workers' prefix, and the task each worker process runs now.",
            ),
            click.option(
                "--database-alias",
                default="default",
                show_default=True,
                help="The Django DATABASES alias to watch, with -A.",
            ),
            click.option(
                "--prefix",
                metavar="PREFIX",
                callback=_check_prefix,
                help="application_name prefix of the workers' connections "
                f"(default: the app's lifeguard option, else {DEFAULT_PREFIX!r}).",
            ),
            *(
                click.option(name, type=kind, default=default, show_default=True, help=text)
                for name, default, kind, text in _TIMEOUT_OPTIONS
            ),
        ],
        function,
    )


_SECONDS = click.FloatRange(min=0)
# (option, default, type, help) of every threshold.
_THRESHOLD_OPTIONS: list[tuple[str, Any, Any, str]] = [
    (
        "--idle-warning",
        str(_DEFAULTS.idle_warning),
        str,
        "Idle connections above this (a count, or % of usable slots) warn.",
    ),
    (
        "--idle-critical",
        str(_DEFAULTS.idle_critical),
        str,
        "Idle connections above this are critical.",
    ),
    (
        "--idle-in-transaction-warning",
        _DEFAULTS.idle_in_transaction_warning,
        _SECONDS,
        "Seconds idle in transaction that warn.",
    ),
    (
        "--idle-in-transaction-critical",
        _DEFAULTS.idle_in_transaction_critical,
        _SECONDS,
        "Seconds idle in transaction that are critical.",
    ),
    (
        "--errors-warning",
        _DEFAULTS.errors_warning,
        _SECONDS,
        "Sessions ended abandoned/fatal/killed per minute that warn.",
    ),
    (
        "--errors-critical",
        _DEFAULTS.errors_critical,
        _SECONDS,
        "Sessions ended abnormally per minute that are critical.",
    ),
]


def threshold_options(function: F) -> F:
    options = [
        click.option(name, default=default, type=kind, show_default=True, help=text)
        for name, default, kind, text in _THRESHOLD_OPTIONS
    ]
    return _apply(options, function)


def action_options(function: F) -> F:
    return _apply(
        [
            click.option(
                "--terminate",
                is_flag=True,
                help="Terminate the workers' backends idle in transaction longer than the "
                "critical threshold (a dry run unless --no-dry-run).",
            ),
            click.option(
                "--dry-run/--no-dry-run",
                default=True,
                show_default=True,
                help="With --terminate: only log what would be terminated.",
            ),
            click.option(
                "--terminate-after",
                type=click.FloatRange(min=0),
                help="Seconds idle in transaction before --terminate acts "
                "(default: the critical threshold).",
            ),
        ],
        function,
    )


def thresholds_from(options: dict[str, Any]) -> Thresholds:
    return Thresholds(
        idle_warning=ConnectionLimit.parse(options["idle_warning"], "--idle-warning"),
        idle_critical=ConnectionLimit.parse(options["idle_critical"], "--idle-critical"),
        idle_in_transaction_warning=options["idle_in_transaction_warning"],
        idle_in_transaction_critical=options["idle_in_transaction_critical"],
        errors_warning=options["errors_warning"],
        errors_critical=options["errors_critical"],
    )


def load_app(name: str) -> Any:
    """The Celery app named as for ``celery -A`` (the current directory is importable)."""
    from celery.app.utils import find_app

    if "" not in sys.path:
        sys.path.insert(0, "")
    try:
        return find_app(name)
    except Exception as exc:
        raise ConfigurationError(f"cannot load the Celery app {name!r}: {exc}") from exc


def prefix_for(explicit: str | None, app: Any) -> str:
    """--prefix, else the prefix the app's lifeguard gives its workers, else the default."""
    prefix = explicit
    if prefix is None and app is not None:
        from ..guard import current_guard

        guard = current_guard(app)
        if guard is not None:
            guard.configure()  # lifeguard_* keys of app.conf, as at worker start
            prefix = guard.options.application_name_prefix
    prefix = prefix or DEFAULT_PREFIX
    problem = validate_prefix(prefix)
    if problem:
        raise ConfigurationError(f"--prefix: {problem}")
    return prefix


def build_monitor(options: dict[str, Any]) -> Monitor:
    """A :class:`Monitor` from the shared options; raises ConfigurationError."""
    thresholds = thresholds_from(options)
    app = load_app(options["app"]) if options.get("app") else None
    target = resolve_target(options.get("database_url"), app, options["database_alias"])
    return Monitor(
        target,
        prefix_for(options.get("prefix"), app),
        thresholds,
        app=app,
        inspect_timeout=options["inspect_timeout"],
        terminate=options["terminate"],
        dry_run=options["dry_run"],
        terminate_after=options.get("terminate_after"),
        connect_timeout=options["connect_timeout"],
    )


class _CommandLogHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Logs of a command to the stderr of the moment (the command's own)."""


def log_to_stderr() -> None:
    """Actions are logged on ``lifeguard.monitor``: show them on stderr."""
    logger = logging.getLogger("lifeguard")
    for old in [h for h in logger.handlers if isinstance(h, _CommandLogHandler)]:
        logger.removeHandler(old)
    handler = _CommandLogHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(handler)
    logger.setLevel(logging.INFO)
