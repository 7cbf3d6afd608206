"""lifeguard's options: defaults, ``app.conf`` keys (``lifeguard_*``), install() arguments.

Precedence: arguments to :func:`lifeguard.install` win over ``app.conf``, which wins over
the defaults. With Django settings loaded under a namespace (``namespace="CELERY"``), the
keys are spelled ``CELERY_LIFEGUARD_<NAME>``. Values read from configuration may be
strings (environment variables); they are converted and checked like arguments.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from .errors import ConfigurationError
from .postgres.appname import DEFAULT_PREFIX, validate_prefix
from .postgres.conninfo import redact_url

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


def _port(name: str, value: Any) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in {"", "none"}):
        return None
    try:
        port = int(value)
    except (TypeError, ValueError):
        port = -1
    if not 1 <= port <= 65535 or isinstance(value, bool):
        raise ConfigurationError(
            f"lifeguard option {name!r} must be a TCP port (1-65535) or None, not {value!r}"
        )
    return port


def _text(name: str, value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise ConfigurationError(f"lifeguard option {name!r} must be a non-empty string")
    return value.strip()


def _optional_text(name: str, value: Any) -> str | None:
    return None if value is None else _text(name, value)


_SIZE_UNITS = {
    "": 1,
    "b": 1,
    "k": 1024,
    "kib": 1024,
    "kb": 1000,
    "m": 1024**2,
    "mib": 1024**2,
    "mb": 1000**2,
    "g": 1024**3,
    "gib": 1024**3,
    "gb": 1000**3,
}
_SIZE_PATTERN = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)\s*$", re.IGNORECASE)


def size_in_bytes(value: str | int | float) -> int:
    """A size in bytes: an integer, or a string with a unit ('512MiB', '1.5GB', '256k').

    Raises ValueError saying which units exist. Used by options and command-line flags.
    """
    if isinstance(value, bool):
        raise ValueError("a size must be a number of bytes or a string with a unit")
    if isinstance(value, (int, float)):
        return int(value)
    match = _SIZE_PATTERN.match(value)
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _SIZE_UNITS:
        raise ValueError("units: B, KiB, MiB, GiB, KB, MB, GB")
    return int(float(match.group(1)) * _SIZE_UNITS[unit])


def _to_size(name: str, value: Any, minimum: int) -> int | None:
    """An option's size in bytes; None (off) for None, '' or 'none'."""
    if value is None or (isinstance(value, str) and value.strip().lower() in {"none", ""}):
        return None
    if isinstance(value, bool):
        raise ConfigurationError(f"lifeguard option {name!r} must be a size, not {value!r}")
    try:
        size = size_in_bytes(value if isinstance(value, (int, float)) else str(value))
    except ValueError as exc:
        raise ConfigurationError(
            f"lifeguard option {name!r} must be a size such as '512MiB' or '2GB', "
            f"not {value!r} ({exc})."
        ) from None
    if size < minimum:
        raise ConfigurationError(
            f"lifeguard option {name!r} is {value!r}, i.e. {size} bytes: integers are bytes. "
            f"Give a unit, e.g. '{max(size, 1)}MiB'."
        )
    return size


def _memory_size(name: str, value: Any) -> int | None:
    return _to_size(name, value, minimum=1024**2)


def _growth_per_task(name: str, value: Any) -> int | None:
    return _to_size(name, value, minimum=1024)


def _to_int(name: str, value: Any, minimum: int, maximum: int | None = None) -> int:
    try:
        number = int(str(value).strip()) if not isinstance(value, int) else value
    except ValueError:
        number = None
    if isinstance(value, bool) or number is None or number < minimum:
        raise ConfigurationError(
            f"lifeguard option {name!r} must be a whole number >= {minimum}, not {value!r}"
        )
    if maximum is not None and number > maximum:
        raise ConfigurationError(
            f"lifeguard option {name!r} must be at most {maximum}, not {value!r}"
        )
    return number


def _task_count(name: str, value: Any) -> int:
    return _to_int(name, value, minimum=1)


def _task_count_or_zero(name: str, value: Any) -> int:
    return _to_int(name, value, minimum=0)


def _optional_task_count(name: str, value: Any) -> int | None:
    if value is None or (isinstance(value, str) and value.strip().lower() in {"none", ""}):
        return None
    return _to_int(name, value, minimum=1)


def _exit_status(name: str, value: Any) -> int:
    return _to_int(name, value, minimum=0, maximum=255)


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
    green_budget: int | None = _option(
        None,
        _optional_task_count,
        "Under gevent/eventlet: connections per Django alias the whole process may hold, "
        "shared by its greenlets across tasks; None: min(concurrency, 10), at most half "
        "the database's free slots at process start.",
    )
    green_wait_timeout: float = _option(
        30.0,
        _seconds,
        "Under gevent/eventlet: seconds a greenlet waits for one of the green_budget "
        "connections before its query fails with an error naming the budget.",
    )
    # --- worker metrics (Prometheus) ----------------------------------------------
    metrics_port: int | None = _option(
        None,
        _port,
        "Serve the worker's metrics (every process's counters) to Prometheus on this "
        "port, from the MainProcess; None serves nothing.",
    )
    metrics_address: str = _option(
        "0.0.0.0", _text, "Address the worker's metrics endpoint listens on."
    )
    metrics_dir: str | None = _option(
        None,
        _optional_text,
        "Directory of prometheus_client's per-process files; None uses "
        "PROMETHEUS_MULTIPROC_DIR when set, else a temporary directory. Wiped at worker "
        "start: it must belong to this worker alone.",
    )
    # --- recycling (a process leaving to be replaced; used by the memory limits) -----
    recycle_exit_code: int = _option(
        0,
        _exit_status,
        "Exit status of a worker that stops itself to be restarted, on pools that cannot "
        "replace a process (threads, gevent, eventlet, solo). 0 is a warm shutdown's status; "
        "set e.g. 1 if your supervisor restarts only failed processes (Restart=on-failure).",
    )
    # --- memory (see docs/memory.md) ----------------------------------------------
    memory: bool = _option(
        True,
        _to_bool,
        "Measure RSS around every task (per task name, growth slope); needed by the "
        "memory_* limits. Costs a few microseconds per task.",
    )
    memory_limit: int | None = _option(
        None,
        _memory_size,
        "Recycle a process whose current RSS is above this size after a task ('512MiB'). "
        "Unlike Celery's max_memory_per_child, a task that freed its memory is not punished.",
    )
    memory_growth_limit: int | None = _option(
        None,
        _memory_size,
        "Recycle a process whose RSS grew by more than this since its first task ('200MiB').",
    )
    memory_slope_limit: int | None = _option(
        None,
        _growth_per_task,
        "Recycle a process whose RSS keeps growing by more than this per task ('256KiB'), "
        "measured over the last memory_slope_window tasks, after memory_slope_warmup tasks.",
    )
    memory_slope_window: int = _option(
        100, _task_count, "Number of most recent tasks the growth slope is fitted over."
    )
    memory_slope_warmup: int = _option(
        50,
        _task_count_or_zero,
        "Tasks a new process runs before the slope limit applies (first-use caches, imports).",
    )
    memory_leak_sites_every: int | None = _option(
        None,
        _optional_task_count,
        "Leak-site mode: trace allocations with tracemalloc and log the top growing "
        "allocation sites every this many tasks. Slows allocation-heavy code; None is off.",
    )
    memory_leak_sites_top: int = _option(
        10, _task_count, "How many growing allocation sites a leak-site report lists."
    )
    memory_leak_sites_frames: int = _option(
        1, _task_count, "Frames of traceback tracemalloc keeps per allocation (more is slower)."
    )

    # --- database trouble (see docs/database-trouble.md) ----------------------------
    hand_back_unreachable: bool = _option(
        True,
        _to_bool,
        "A task whose database connection failed transiently (server down, restarting, "
        "no connection slot) before it ran any statement is handed back: re-published "
        "with a delay, not failed, and its max_retries untouched. False lets it fail.",
    )
    hand_back_limit: int = _option(
        10,
        _task_count,
        "Hand-backs of one task at most (waits of 0.5-1 s, doubling up to 30 s: about "
        "2 to 4 minutes in all); then it fails with the real error.",
    )
    pause_after_failures: int = _option(
        5,
        _task_count_or_zero,
        "Stop consuming new tasks after this many 'database unavailable' failures across "
        "the worker within pause_window seconds, until a probe connects; 0 never pauses.",
    )
    pause_window: float = _option(
        10.0,
        _seconds,
        "Seconds over which failures are counted for the pause; also how long after a "
        "refusal for lack of slots idle connections are closed at task end.",
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

    # --- singleton locks ------------------------------------------------------------
    singleton_database_url: str | None = _option(
        None,
        _optional_text,
        "The database URL of singleton (and effect) lock sessions when the workers' connections go "
        "through PgBouncer in transaction mode: a direct (or session-mode) URL of the same "
        "database; None uses the task's own database settings.",
    )

    @classmethod
    def names(cls) -> list[str]:
        return [field.name for field in dataclasses.fields(cls)]

    @classmethod
    def resolve(
        cls,
        arguments: Mapping[str, Any],
        conf: Mapping[str, Any] | None = None,
        spelled: Mapping[str, str] | None = None,
    ) -> Options:
        """Options from install() arguments over ``lifeguard_*`` configuration keys.

        ``spelled`` gives each ``conf`` name's key as the user wrote it (e.g.
        ``CELERY_LIFEGUARD_PING_AFTER_IDLE``, see :func:`conf_entries`): errors name
        it so. Unknown names raise :class:`ConfigurationError` naming the closest valid one.
        """
        known = {field.name: field for field in dataclasses.fields(cls)}
        values: dict[str, Any] = {}
        for source, mapping in ((CONF, conf or {}), (INSTALL, arguments)):
            for name, raw in mapping.items():
                written = name
                if source == CONF:
                    written = (spelled or {}).get(name) or f"{CONF_PREFIX}{name}"
                if name not in known:
                    raise ConfigurationError(_unknown_message(name, written, source, known))
                values[name] = known[name].metadata["parse"](written, raw)
        return cls(**values)

    def describe(self) -> dict[str, Any]:
        described = dataclasses.asdict(self)
        if self.singleton_database_url:  # a URL may carry a password: never shown
            described["singleton_database_url"] = redact_url(self.singleton_database_url)
        return described


CONF = "the Celery configuration"
INSTALL = "lifeguard.install()"


def _unknown_message(name: str, written: str, source: str, known: Mapping[str, Any]) -> str:
    """Names the option as written, and the closest valid one spelled the same way."""
    close = difflib.get_close_matches(name, list(known), n=1)
    head = written[: len(written) - len(name)]  # CELERY_LIFEGUARD_, lifeguard_ or nothing
    hint = ""
    if close:
        # CELERY_LIFEGUARD_PING_AFTERR_IDLE -> CELERY_LIFEGUARD_PING_AFTER_IDLE
        suggestion = head + (close[0].upper() if written.isupper() else close[0])
        hint = f" Did you mean {suggestion!r}?"
    where = "in lifeguard.install()" if source == INSTALL else f"in {source}"
    return (
        f"Unknown lifeguard option {written!r} {where}.{hint} "
        f"Valid options{f' (after {head})' if head else ''}: {', '.join(sorted(known))}."
    )


def conf_entries(
    conf: Mapping[str, Any], namespace: str | None = None
) -> dict[str, tuple[str, Any]]:
    """The ``lifeguard_*`` keys of a Celery configuration: option name -> (the key as
    written, its value).

    Accepts ``lifeguard_x``, ``LIFEGUARD_X`` and, under a namespace such as ``CELERY``,
    ``CELERY_LIFEGUARD_X``.
    """
    found: dict[str, tuple[str, Any]] = {}
    prefixes = [CONF_PREFIX]
    if namespace:
        prefixes.append(f"{namespace.lower()}_{CONF_PREFIX}")
    for key in list(conf.keys()):
        lowered = str(key).lower()
        for prefix in prefixes:
            if lowered.startswith(prefix):
                found[lowered[len(prefix) :]] = (str(key), conf[key])
                break
    return found


def options_from_conf(conf: Mapping[str, Any], namespace: str | None = None) -> dict[str, Any]:
    """The ``lifeguard_*`` keys of a Celery configuration, without their prefix."""
    return {name: value for name, (_, value) in conf_entries(conf, namespace).items()}
