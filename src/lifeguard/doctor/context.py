"""Everything the doctor's rules look at, gathered once from the loaded app.

* the Celery configuration and its version; the lifeguard installed on the app (if any)
  and its options as a worker would resolve them;
* how workers are started: pool, concurrency, recycling, from the command-line flags the
  doctor was given, else ``app.conf``, else Celery's defaults (and which it was);
* the registered tasks (after importing the app's task modules, as a worker does);
* Django's ``DATABASES`` (PostgreSQL aliases) when Django settings are configured;
* SQLAlchemy engines: every ``Engine``/``AsyncEngine`` alive after the import (found by
  the garbage collector, so engines created at import time in any module count), and
  whether each is registered with ``guard.add_engine()``;
* an estimate of a prefork child's RSS at birth: this process's RSS once it holds what a
  worker's MainProcess holds before it forks (a child starts with its parent's pages);
* the database server, when read (:mod:`lifeguard.doctor.server`).

Nothing here connects anywhere or changes anything in the app.
"""

from __future__ import annotations

import contextlib
import gc
import importlib.util
import os
import sys
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigurationError
from ..hooks import PoolKind
from ..monitor.target import django_databases
from ..options import Options
from ..postgres.conninfo import describe_django_database, describe_sqlalchemy_url
from .findings import Skip
from .server import ServerInfo, endpoint

#: A task with a time limit at least this long (seconds) counts as a long task.
LONG_TASK_SECONDS = 60.0

DEFAULT = "Celery's default"


@dataclass(frozen=True)
class Setting:
    """A value and where it came from ("--pool", "app.conf", "Celery's default")."""

    name: str
    value: Any
    source: str


@dataclass(frozen=True)
class WorkerShape:
    """How the app's workers are started, as far as the doctor knows."""

    pool: Setting  # value: PoolKind
    concurrency: Setting  # value: int
    max_tasks_per_child: Setting | None
    max_memory_per_child: Setting | None  # KiB, as Celery takes it
    hosts: int = 1
    web_processes: int = 0

    @property
    def kind(self) -> PoolKind:
        kind: PoolKind = self.pool.value
        return kind

    @property
    def pool_known(self) -> bool:
        """Said by a flag or app.conf, not assumed."""
        return not self.pool.source.startswith(DEFAULT)

    @property
    def concurrency_known(self) -> bool:
        return not self.concurrency.source.startswith(DEFAULT)

    @property
    def processes(self) -> int:
        """Processes that run tasks, per host: the children of prefork, else one."""
        return int(self.concurrency.value) if self.kind.forks else 1

    @property
    def units(self) -> int:
        """Tasks one such process runs at once: one per prefork child or solo, else -c."""
        if self.kind.forks or self.kind is PoolKind.SOLO:
            return 1
        return int(self.concurrency.value)


@dataclass(frozen=True)
class TaskInfo:
    """A registered task's settings that matter to the rules (task value, else app.conf)."""

    name: str
    acks_late: bool
    reject_on_worker_lost: bool | None  # None: no decision anywhere
    retry_on_worker_lost: bool
    time_limit: float | None
    soft_time_limit: float | None
    # lifeguard.singleton_task's lock settings ({"url", "using", "engine"}); None: not one
    singleton: Mapping[str, Any] | None = None

    @property
    def longest_limit(self) -> float | None:
        limits = [limit for limit in (self.time_limit, self.soft_time_limit) if limit]
        return max(limits) if limits else None

    @property
    def long(self) -> bool:
        limit = self.longest_limit
        return limit is not None and limit >= LONG_TASK_SECONDS


@dataclass(frozen=True)
class DjangoAlias:
    """One PostgreSQL entry of Django's ``DATABASES``."""

    alias: str
    description: str  # "default (app@db:5432/app)", never the password
    conn_max_age: float | None  # None: no limit (Django's default is 0)
    pool: Mapping[str, Any] | None  # OPTIONS["pool"] ({} for True); None: no native pool
    options: Mapping[str, Any]  # OPTIONS
    disable_server_side_cursors: bool
    health_checks: bool  # CONN_HEALTH_CHECKS: a round trip before a reused connection's use
    endpoint: str

    @property
    def where(self) -> str:
        return f"DATABASES[{self.alias!r}]"

    @property
    def pool_min_size(self) -> int:
        """psycopg_pool's default min_size is 4."""
        return int((self.pool or {}).get("min_size", 4))

    @property
    def pool_max_size(self) -> int:
        """psycopg_pool's default max_size is min_size."""
        value = (self.pool or {}).get("max_size")
        return int(value) if value is not None else self.pool_min_size


@dataclass(frozen=True)
class EngineInfo:
    """A SQLAlchemy engine alive in the app after import."""

    label: str  # the URL, password masked
    is_async: bool
    dialect: str  # "postgresql"
    driver: str  # "psycopg", "asyncpg", "psycopg2", ...
    pool_class: str  # "QueuePool", "AsyncAdaptedQueuePool", "NullPool", ...
    pool_size: int | None
    max_overflow: int | None  # -1: no limit
    pre_ping: bool
    recycle: float | None  # pool_recycle seconds; None when off
    connections: int  # connections the pool holds now: above 0, it connected at import
    connect_params: Mapping[str, Any] | None  # None: could not be read
    registered: bool  # with guard.add_engine()
    endpoint: str

    @property
    def pooled(self) -> bool:
        """Keeps connections between uses (NullPool does not)."""
        return self.pool_class != "NullPool"

    @property
    def capacity(self) -> int | None:
        """Connections the pool may open at once; None: unbounded or unknown."""
        if self.pool_class in ("StaticPool", "AssertionPool"):
            return 1
        if self.pool_size is None or self.max_overflow is None or self.max_overflow < 0:
            return None
        return self.pool_size + self.max_overflow


@dataclass
class DoctorContext:
    """What the rules read. Built by :func:`gather`; the server is attached afterwards."""

    app: Any
    app_name: str
    celery_version: tuple[int, int]
    guard: Any  # Lifeguard or None
    options: Options | None  # resolved as at worker start; None without lifeguard
    options_error: str | None  # the ConfigurationError a worker would stop with
    shape: WorkerShape
    assume_shape: bool  # use Celery's defaults when not said (the CLI); else rules skip
    tasks: tuple[TaskInfo, ...]
    django: tuple[DjangoAlias, ...] | None  # None: no Django settings
    django_psycopg3: bool
    engines: tuple[EngineInfo, ...] | None  # None: SQLAlchemy not imported by the app
    birth_rss: int | None  # bytes; None: not measured
    pgbouncer_mode: str | None = None  # --pgbouncer: session | transaction | statement | none
    target: str | None = None  # the database to read, as shown to users
    server: ServerInfo | None = None
    server_skip: str = "no database was read"
    server_failed: bool = False  # a database was named but could not be read

    # --- helpers for rules ---------------------------------------------------------

    @property
    def installed(self) -> bool:
        return self.guard is not None

    @property
    def conf(self) -> Any:
        return self.app.conf

    def conf_set(self, key: str) -> bool:
        """Whether the app's configuration gives ``key`` (not just Celery's default)."""
        return conf_is_set(self.app.conf, key)

    def spelled(self, key: str) -> str:
        """A Celery setting as the app writes it: ``CELERY_WORKER_POOL`` under Django's
        ``namespace="CELERY"``, else ``worker_pool``."""
        namespace = getattr(self.app, "namespace", None)
        return f"{namespace}_{key.upper()}" if namespace else key

    def option_spelled(self, name: str) -> str:
        """A lifeguard option as an app.conf key (``CELERY_LIFEGUARD_MEMORY_LIMIT``)."""
        return self.spelled(f"lifeguard_{name}")

    def manages(self, alias: DjangoAlias) -> bool:
        """Whether the app's lifeguard manages this Django alias in its workers."""
        if self.guard is None:
            return False
        options = self.options or self.guard.options
        if options.django is False:
            return False
        return options.django_aliases is None or alias.alias in options.django_aliases

    def require_server(self) -> ServerInfo:
        if self.server is None:
            raise Skip(self.server_skip)
        return self.server

    def require_pool(self) -> WorkerShape:
        """The worker shape, when its pool is known or may be assumed."""
        if not (self.shape.pool_known or self.assume_shape):
            raise Skip(
                "the worker pool is not in the configuration (set worker_pool, or run "
                "`lifeguard doctor --pool ...`)"
            )
        return self.shape

    def require_concurrency(self) -> WorkerShape:
        """The worker shape, when pool and concurrency are known or may be assumed."""
        shape = self.require_pool()
        if not (shape.concurrency_known or self.assume_shape):
            raise Skip(
                "the worker concurrency is not in the configuration (set "
                "worker_concurrency, or run `lifeguard doctor --concurrency N`)"
            )
        return shape

    def require_birth_rss(self) -> int:
        if self.birth_rss is None:
            raise Skip("no estimate of a child's birth RSS (run `lifeguard doctor`)")
        return self.birth_rss

    def postgres_aliases(self) -> tuple[DjangoAlias, ...]:
        return self.django or ()

    def all_engines(self) -> tuple[EngineInfo, ...]:
        return self.engines or ()

    @property
    def soft_time_limits(self) -> list[str]:
        """Tasks with a soft time limit (their own or the app's)."""
        return [task.name for task in self.tasks if task.soft_time_limit]


# --- Celery configuration ------------------------------------------------------------------


def conf_is_set(conf: Any, key: str) -> bool:
    """``key`` is given by the app (``app.conf`` changes or its configuration object).

    Celery's ``Settings`` chains the changes, the configuration objects, and last the
    defaults; a key found before the defaults was set by the app. Under a namespace
    (``CELERY_``) the key is looked up the way Celery does.
    """
    keys = getattr(conf, "_to_keys", lambda k: (k,))(key)
    maps = getattr(conf, "maps", None)
    if not maps:
        return key in conf
    return any(k in mapping for mapping in maps[:-1] for k in keys)


def _conf_value(conf: Any, key: str) -> Any:
    try:
        return conf.get(key)
    except Exception:
        return None


def worker_shape(
    conf: Any,
    *,
    pool: str | None = None,
    concurrency: int | None = None,
    max_tasks_per_child: int | None = None,
    max_memory_per_child: int | None = None,
    hosts: int = 1,
    web_processes: int = 0,
) -> WorkerShape:
    """The worker's shape from flags, else app.conf, else Celery's defaults."""
    if pool is not None:
        pool_setting = Setting("pool", PoolKind.from_pool_cls(pool), "--pool")
    elif conf_is_set(conf, "worker_pool"):
        value = _conf_value(conf, "worker_pool")
        pool_setting = Setting("worker_pool", PoolKind.from_pool_cls(value), "app.conf")
    else:
        pool_setting = Setting("worker_pool", PoolKind.PREFORK, DEFAULT)
    if concurrency is not None:
        concurrency_setting = Setting("concurrency", concurrency, "--concurrency")
    elif conf_is_set(conf, "worker_concurrency") and _conf_value(conf, "worker_concurrency"):
        value = _conf_value(conf, "worker_concurrency")
        number = (os.cpu_count() or 1) if str(value).lower() == "auto" else int(value)
        concurrency_setting = Setting("worker_concurrency", number, "app.conf")
    else:
        concurrency_setting = Setting(
            "worker_concurrency", os.cpu_count() or 1, f"{DEFAULT}: the number of CPUs"
        )
    shape = WorkerShape(
        pool=pool_setting,
        concurrency=concurrency_setting,
        max_tasks_per_child=_recycling(
            conf, "worker_max_tasks_per_child", max_tasks_per_child, "--max-tasks-per-child"
        ),
        max_memory_per_child=_recycling(
            conf, "worker_max_memory_per_child", max_memory_per_child, "--max-memory-per-child"
        ),
        hosts=hosts,
        web_processes=web_processes,
    )
    return shape


def _recycling(conf: Any, key: str, flag: int | None, flag_name: str) -> Setting | None:
    if flag is not None:
        return Setting(flag_name, flag, "command line")
    value = _conf_value(conf, key)
    if value:
        return Setting(key, int(value), "app.conf")
    return None


# --- lifeguard -----------------------------------------------------------------------------


def resolve_options(guard: Any) -> tuple[Options | None, str | None]:
    """The guard's options as a worker resolves them at start, or the error it stops with."""
    if guard is None:
        return None, None
    try:
        return guard.resolve_options(), None
    except ConfigurationError as exc:
        return None, str(exc)


# --- tasks ---------------------------------------------------------------------------------


def task_infos(app: Any) -> tuple[TaskInfo, ...]:
    """The app's own tasks (Celery's built-ins left out), with their effective settings."""
    conf = app.conf
    infos = []
    for name, task in sorted(app.tasks.items()):
        if name.startswith("celery."):
            continue
        infos.append(
            TaskInfo(
                name=name,
                acks_late=bool(task.acks_late),
                reject_on_worker_lost=task.reject_on_worker_lost,
                retry_on_worker_lost=bool(getattr(task, "retry_on_worker_lost", False)),
                time_limit=_number(task.time_limit or _conf_value(conf, "task_time_limit")),
                soft_time_limit=_number(
                    task.soft_time_limit or _conf_value(conf, "task_soft_time_limit")
                ),
                singleton=getattr(getattr(task, "run", None), "__lifeguard_singleton__", None),
            )
        )
    return tuple(infos)


def _number(value: Any) -> float | None:
    try:
        return float(value) if value else None
    except (TypeError, ValueError):
        return None


# --- Django --------------------------------------------------------------------------------


def django_aliases() -> tuple[DjangoAlias, ...] | None:
    """The PostgreSQL aliases of Django's DATABASES; None when Django isn't configured."""
    if "django" not in sys.modules and not os.environ.get("DJANGO_SETTINGS_MODULE"):
        return None
    databases = django_databases()
    if databases is None:
        return None
    aliases = []
    for alias, entry in databases.items():
        if "postg" not in str(entry.get("ENGINE", "")):
            continue
        options = dict(entry.get("OPTIONS") or {})
        pool = options.pop("pool", None)
        aliases.append(
            DjangoAlias(
                alias=alias,
                description=describe_django_database(alias, entry),
                conn_max_age=entry.get("CONN_MAX_AGE", 0),
                pool=(pool if isinstance(pool, dict) else {}) if pool else None,
                options=options,
                disable_server_side_cursors=bool(entry.get("DISABLE_SERVER_SIDE_CURSORS")),
                health_checks=bool(entry.get("CONN_HEALTH_CHECKS")),
                endpoint=endpoint(entry.get("HOST"), entry.get("PORT")),
            )
        )
    return tuple(aliases)


def _django_uses_psycopg3() -> bool:
    """Django's PostgreSQL backend picks psycopg 3 whenever it can import it."""
    return importlib.util.find_spec("psycopg") is not None


# --- SQLAlchemy ----------------------------------------------------------------------------


def live_engines() -> Iterator[tuple[Any, Any]]:
    """``(sync_engine, async_engine_or_None)`` for every engine alive in this process.

    Only when the app imported SQLAlchemy: the doctor never imports it itself.
    """
    if "sqlalchemy" not in sys.modules:
        return
    from sqlalchemy.engine import Engine

    async_engine: type | None
    try:  # needs greenlet, optional since SQLAlchemy 2.1; without it no AsyncEngine exists
        from sqlalchemy.ext.asyncio import AsyncEngine as async_engine
    except ImportError:
        async_engine = None

    sync_engines: list[Any] = []
    async_by_sync: dict[int, Any] = {}
    for obj in gc.get_objects():
        kind = type(obj)  # not isinstance(): it would wake lazy proxies (Django settings)
        if issubclass(kind, Engine):
            sync_engines.append(obj)
        elif async_engine is not None and issubclass(kind, async_engine):
            async_by_sync[id(obj.sync_engine)] = obj
    for engine in sync_engines:
        yield engine, async_by_sync.get(id(engine))


def engine_infos(guard: Any) -> tuple[EngineInfo, ...] | None:
    if "sqlalchemy" not in sys.modules:
        return None
    registered = set()
    if guard is not None:
        registered = {id(managed.engine) for managed in guard.sqlalchemy.engines}
    infos = []
    for engine, async_engine in live_engines():
        pool = engine.pool
        recycle = getattr(pool, "_recycle", -1)
        infos.append(
            EngineInfo(
                label=describe_sqlalchemy_url(engine.url),
                is_async=async_engine is not None,
                dialect=str(engine.dialect.name),
                driver=str(engine.dialect.driver),
                pool_class=type(pool).__name__,
                pool_size=_call(pool, "size"),
                max_overflow=getattr(pool, "_max_overflow", None),
                pre_ping=bool(getattr(pool, "_pre_ping", False)),
                recycle=float(recycle) if recycle and recycle > 0 else None,
                connections=(_call(pool, "checkedin") or 0) + (_call(pool, "checkedout") or 0),
                connect_params=connect_params(engine),
                registered=id(engine) in registered,
                endpoint=endpoint(engine.url.host, engine.url.port),
            )
        )
    return tuple(infos)


def _call(pool: Any, name: str) -> int | None:
    method = getattr(pool, name, None)
    try:
        return int(method()) if method is not None else None
    except Exception:
        return None


def connect_params(engine: Any) -> dict[str, Any] | None:
    """The keyword arguments the engine's pool passes to the driver's ``connect()``.

    SQLAlchemy 2 keeps them (URL query and ``connect_args`` merged) in the closure of
    the pool's creator function, as ``cparams``; None when that is not found (a custom
    ``creator``, another SQLAlchemy version).
    """
    creator = getattr(engine.pool, "_creator", None)
    code = getattr(creator, "__code__", None)
    cells = getattr(creator, "__closure__", None)
    if code is None or cells is None:
        return None
    for name, cell in zip(code.co_freevars, cells, strict=True):
        if name == "cparams":
            try:
                return dict(cell.cell_contents)
            except (TypeError, ValueError):
                return None
    return None


# --- memory --------------------------------------------------------------------------------


#: What a worker's MainProcess has imported before it forks, besides the app.
_WORKER_MODULES = (
    "celery.apps.worker",
    "celery.worker.consumer",
    "celery.worker.strategy",
    "celery.app.trace",
    "celery.concurrency.prefork",
)


def estimate_birth_rss(app: Any, django: tuple[DjangoAlias, ...] | None) -> int | None:
    """This process's RSS once it holds what a worker's MainProcess holds before it
    forks: the app, Celery's worker modules, the broker transport and result backend
    modules, and the Django database backends (lifeguard looks at every alias at worker
    start). Only imports: nothing connects. Every prefork child starts with about that."""
    import importlib

    from celery.app.backends import by_url

    for module in _WORKER_MODULES:
        with contextlib.suppress(Exception):
            importlib.import_module(module)
    with contextlib.suppress(Exception):
        app.connection_for_write().get_transport_cls()
    with contextlib.suppress(Exception):
        if app.conf.result_backend:
            by_url(app.conf.result_backend, app.loader)
    if django:
        with contextlib.suppress(Exception):
            from django.db import connections

            for alias in django:
                _ = connections[alias.alias].vendor  # imports the backend and its driver
    from ..concerns.memory import read_rss_once

    return read_rss_once()


# --- all of it -----------------------------------------------------------------------------

_in_progress: list[None] = []  # one entry per doctor inspecting an app in this process


@contextlib.contextmanager
def inspecting() -> Iterator[None]:
    """While the doctor imports and inspects an app.

    Celery's Django fixup runs Django's system checks when the task modules are imported;
    lifeguard's own check (``lifeguard.contrib.django``) then stays quiet instead of
    starting a second doctor.
    """
    _in_progress.append(None)
    try:
        yield
    finally:
        _in_progress.pop()


def in_progress() -> bool:
    return bool(_in_progress)


def import_task_modules(app: Any) -> None:
    """Import the app's task modules as a worker does (``imports``, ``include``,
    autodiscovery); raises :class:`ConfigurationError` with the import error."""
    try:
        app.loader.import_default_modules()
    except Exception as exc:
        raise ConfigurationError(
            f"cannot import the task modules of the app: {type(exc).__name__}: {exc}"
        ) from exc


def gather(
    app: Any,
    app_name: str,
    *,
    assume_shape: bool = True,
    measure_rss: bool = True,
    pgbouncer_mode: str | None = None,
    **shape: Any,
) -> DoctorContext:
    """The context of a loaded app whose task modules are imported."""
    import celery

    from ..guard import current_guard

    guard = current_guard(app)
    options, options_error = resolve_options(guard)
    worker = worker_shape(app.conf, **shape)
    django = django_aliases()
    return DoctorContext(
        app=app,
        app_name=app_name,
        celery_version=(int(celery.VERSION[0]), int(celery.VERSION[1])),
        guard=guard,
        options=options,
        options_error=options_error,
        shape=worker,
        assume_shape=assume_shape,
        tasks=task_infos(app),
        django=django,
        django_psycopg3=_django_uses_psycopg3(),
        engines=engine_infos(guard),
        birth_rss=estimate_birth_rss(app, django) if measure_rss else None,
        pgbouncer_mode=pgbouncer_mode,
    )
