"""lifeguard's options: defaults, ``app.conf`` keys (``lifeguard_*``), install() arguments.

Precedence: arguments to :func:`lifeguard.install` win over ``app.conf``, which wins over
the defaults. With Django settings loaded under a namespace (``namespace="CELERY"``), the
keys are spelled ``CELERY_LIFEGUARD_<NAME>``. Values read from configuration may be
strings (environment variables); they are converted and checked like arguments.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .appname import DEFAULT_PREFIX, validate_prefix
from .errors import ConfigurationError

CONF_PREFIX = "lifeguard_"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}


def _to_bool(name: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in _TRUE | _FALSE:
        return value.strip().lower() in _TRUE
    raise ConfigurationError(f"lifeguard option {name!r} must be true or false, not {value!r}")


def _to_optional_bool(name: str, value: Any) -> bool | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in {"auto", "none"}):
        return None
    return _to_bool(name, value)


def _to_seconds(name: str, value: Any, *, allow_none: bool) -> float | None:
    if value is None or (isinstance(value, str) and value.strip().lower() == "none"):
        if allow_none:
            return None
        raise ConfigurationError(f"lifeguard option {name!r} needs a number of seconds, not None")
    try:
        number = float(value)
    except (TypeError, ValueError):
        raise ConfigurationError(
            f"lifeguard option {name!r} must be a number of seconds, not {value!r}"
        ) from None
    if number < 0:
        raise ConfigurationError(f"lifeguard option {name!r} must not be negative ({value!r})")
    return number


def _seconds(name: str, value: Any) -> float:
    result = _to_seconds(name, value, allow_none=False)
    assert result is not None
    return result


def _optional_seconds(name: str, value: Any) -> float | None:
    return _to_seconds(name, value, allow_none=True)


def _prefix(name: str, value: Any) -> str | None:
    if value is None or value is False:
        return None
    if not isinstance(value, str):
        raise ConfigurationError(f"lifeguard option {name!r} must be a string, not {value!r}")
    problem = validate_prefix(value)
    if problem:
        raise ConfigurationError(f"lifeguard option {name!r}: {problem}")
    return value


def _optional_names(name: str, value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if isinstance(value, str):
        items = [part.strip() for part in value.split(",") if part.strip()]
    elif isinstance(value, Iterable):
        items = [str(part) for part in value]
    else:
        raise ConfigurationError(
            f"lifeguard option {name!r} must be a list of names, not {value!r}"
        )
    return tuple(items)


def _option(default: Any, parse: Callable[[str, Any], Any], doc: str) -> Any:
    return dataclasses.field(default=default, metadata={"parse": parse, "doc": doc})


@dataclasses.dataclass(frozen=True)
class Options:
    """Every lifeguard option with its default. Build with :meth:`Options.resolve`."""

    # --- attribution -------------------------------------------------------------
    application_name_prefix: str | None = _option(
        DEFAULT_PREFIX,
        _prefix,
        "Prefix of the application_name set on worker connections "
        "('<prefix>:<hostname>:<pid>'); None leaves application_name alone.",
    )
    # --- connection reuse --------------------------------------------------------
    ping_after_idle: float | None = _option(
        30.0,
        _optional_seconds,
        "A kept connection idle longer than this many seconds gets one real round trip "
        "before the next task uses it; None never pings (the cheap checks still run).",
    )
    cancel_timeout: float = _option(
        5.0,
        _seconds,
        "Seconds to wait for the server to accept a query cancel request, and for an "
        "async task cancelled by a soft time limit to finish its cleanup.",
    )
    # --- Django ------------------------------------------------------------------
    django: bool | None = _option(
        None,
        _to_optional_bool,
        "Manage Django connections: None (auto: when Django settings are configured), "
        "True or False.",
    )
    django_aliases: tuple[str, ...] | None = _option(
        None,
        _optional_names,
        "Django database aliases to manage; None manages every PostgreSQL alias.",
    )

    # --- SQLAlchemy ---------------------------------------------------------------
    pgbouncer_transaction_mode: bool = _option(
        False,
        _to_bool,
        "Connections of engines registered with guard.add_engine() go through PgBouncer "
        "in transaction mode: turn off server-side prepared statements (asyncpg: "
        "statement_cache_size=0, prepared_statement_cache_size=0; psycopg: "
        "prepare_threshold=None).",
    )

    @classmethod
    def names(cls) -> list[str]:
        return [field.name for field in dataclasses.fields(cls)]

    @classmethod
    def resolve(
        cls, arguments: Mapping[str, Any], conf: Mapping[str, Any] | None = None
    ) -> Options:
        """Options from install() arguments over ``lifeguard_*`` configuration keys.

        Unknown names raise :class:`ConfigurationError` naming the closest valid one.
        """
        known = {field.name: field for field in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for source, mapping in (("app.conf", conf or {}), ("install()", arguments)):
            for name, raw in mapping.items():
                if name not in known:
                    raise ConfigurationError(_unknown_message(name, source, known))
                values[name] = known[name].metadata["parse"](name, raw)
        return cls(**values)

    def describe(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def _unknown_message(name: str, source: str, known: Mapping[str, Any]) -> str:
    spelled = f"{CONF_PREFIX}{name}" if source == "app.conf" else name
    close = difflib.get_close_matches(name, list(known), n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return (
        f"Unknown lifeguard option {spelled!r} (from {source}).{hint} "
        f"Valid options: {', '.join(sorted(known))}."
    )


def options_from_conf(conf: Mapping[str, Any], namespace: str | None = None) -> dict[str, Any]:
    """The ``lifeguard_*`` keys of a Celery configuration, without their prefix.

    Accepts ``lifeguard_x``, ``LIFEGUARD_X`` and, under a namespace such as ``CELERY``,
    ``CELERY_LIFEGUARD_X``.
    """
    found: dict[str, Any] = {}
    prefixes = [CONF_PREFIX]
    if namespace:
        prefixes.append(f"{namespace.lower()}_{CONF_PREFIX}")
    for key in list(conf.keys()):
        lowered = str(key).lower()
        for prefix in prefixes:
            if lowered.startswith(prefix):
                found[lowered[len(prefix) :]] = conf[key]
                break
    return found
