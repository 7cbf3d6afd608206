"""Django connections in Celery workers: kept warm, reused only when proven clean.

Per PostgreSQL alias, in the thread (or greenlet) that ran the task:

* after fork: inherited connections and inherited native pools are dropped without a
  byte sent on the parent's sockets; the MainProcess is left holding no connection;
* at task end a connection is kept only if checks that cost no round trip pass (see
  :func:`_end_of_task_problem`); otherwise it is rolled back and closed, or handed back
  to Django's native pool clean;
* before the next task the socket/status check runs again, plus one real round trip if
  the connection sat idle longer than ``ping_after_idle``;
* a query interrupted by any exception (a soft time limit, a gevent timeout) is cancelled
  on the server and its connection discarded right away, inside the failing ``execute``,
  so neither ``atomic()`` nor the result backend trips over a busy connection;
* connections opened by threads or greenlets a task started are found and closed once
  their thread ends, and reported with the task's name.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from .. import stats as counters
from ..errors import ConfigurationError
from ..hooks import Hook, PoolKind, TaskOutcome, TaskRun, WorkerInfo, unit_label
from ..postgres import driver as pgdriver
from ..postgres.appname import application_name
from ..postgres.conninfo import describe_django_database
from ..postgres.driver import Problem
from .celery_fixup import CeleryDjangoFixup
from .database_trouble import DatabaseTrouble
from .green_pool import GreenBudget, GreenConnections, default_budget

logger = logging.getLogger("lifeguard.django")

# Discard reasons that are Django's own (the driver-level ones are pgdriver.Problem).
ATOMIC_BLOCK = "atomic_block"
AUTOCOMMIT_CHANGED = "autocommit_changed"
ERRORS_OCCURRED = "errors_occurred"
MAX_AGE = "max_age"
PING_FAILED = "ping_failed"
GREENLET_SCOPE = "greenlet_scope"
LEAKED = "leaked"
SHUTDOWN = "shutdown"
SLOTS_SCARCE = "slots_scarce"

_ROLLBACK_REASONS = {Problem.IN_TRANSACTION.value, Problem.FAILED_TRANSACTION.value}
_WARN_REASONS = {Problem.INTERRUPTED.value, Problem.IN_TRANSACTION.value, ATOMIC_BLOCK, LEAKED}


@dataclass
class _Alias:
    """One managed database alias and what was decided about it at worker start."""

    name: str
    pooled: bool
    user_set_application_name: bool


@dataclass(eq=False)
class _ForeignConnection:
    """A connection opened outside the task's own thread/greenlet while tasks ran."""

    wrapper: weakref.ReferenceType[Any]
    unit: weakref.ReferenceType[Any] | Callable[[], Any]
    unit_label: str
    task_ids: frozenset[str]
    task_names: tuple[str, ...]
    warned: bool = False
    seen: float = field(default_factory=time.monotonic)


def _django_ready() -> bool:
    try:
        from django.conf import settings
    except ImportError:
        return False
    return bool(settings.configured)


class DjangoConnections(Hook):
    """The Django concern: one instance per guard."""

    name = "django"

    def __init__(self) -> None:
        self.enabled = False
        self.aliases: dict[str, _Alias] = {}
        self.unmanaged: list[str] = []
        self.fixup: CeleryDjangoFixup | None = None
        self.worker: WorkerInfo | None = None
        self._idle_since: weakref.WeakKeyDictionary[Any, float] = weakref.WeakKeyDictionary()
        self._pool_opened_seen: dict[str, int] = {}
        self._known: weakref.WeakSet[Any] = weakref.WeakSet()
        self._foreign: list[_ForeignConnection] = []
        self._foreign_lock = threading.Lock()
        self._trouble: DatabaseTrouble | None = None
        self.green = GreenConnections()  # gevent/eventlet: warm connections shared by greenlets
        self.green.vet = self._vet_warm

    # --- worker start: decide, validate, take over from Celery's fixup -----------------

    def on_worker_start(self, worker: WorkerInfo) -> None:
        wanted = self.guard.options.django
        if wanted is False:
            return
        if not _django_ready():
            if wanted:
                raise ConfigurationError(
                    "lifeguard option django=True, but Django settings are not configured: "
                    "set DJANGO_SETTINGS_MODULE before the worker starts, or install "
                    "'celery-lifeguard[django]' if Django is missing."
                )
            return
        from django.db import connections
        from django.db.backends.signals import connection_created

        self.worker = worker
        self._choose_aliases(connections)
        if not self.aliases:
            self.guard.lifecycle.announce(
                logger, logging.INFO, "lifeguard: no PostgreSQL database in Django settings"
            )
            return
        self.enabled = True
        for alias in self.aliases.values():
            self._validate(alias, connections[alias.name].settings_dict, worker)

        self.fixup = CeleryDjangoFixup.of(self.guard.app)
        if self.fixup is not None:
            self.fixup.take_over_connections()
        connection_created.connect(
            self._on_connection_created, weak=False, dispatch_uid=f"lifeguard-{id(self)}"
        )
        # The MainProcess keeps nothing open: children must not inherit live sessions.
        for wrapper in connections.all(initialized_only=True):
            self._close_politely(wrapper)
        for alias in self.aliases.values():
            if alias.pooled:
                wrapper = connections[alias.name]
                if alias.name in getattr(type(wrapper), "_connection_pools", {}):
                    wrapper.close_pool()
        self._set_application_name(connections)
        for alias in self.aliases.values():
            settings_dict = connections[alias.name].settings_dict
            self.guard.lifecycle.announce(
                logger,
                logging.INFO,
                "lifeguard: managing Django connections of %s: %s",
                describe_django_database(alias.name, settings_dict),
                self._policy(alias, settings_dict, worker),
            )

    def _choose_aliases(self, connections: Any) -> None:
        requested = self.guard.options.django_aliases
        all_aliases = list(connections)
        if requested is not None:
            unknown = [name for name in requested if name not in all_aliases]
            if unknown:
                raise ConfigurationError(
                    f"lifeguard option django_aliases names {unknown}, which are not in "
                    f"DATABASES (aliases: {all_aliases})."
                )
        for name in all_aliases:
            wrapper = connections[name]
            if requested is not None and name not in requested:
                continue
            if wrapper.vendor != "postgresql":
                if requested is not None:
                    raise ConfigurationError(
                        f"DATABASES[{name!r}] uses {wrapper.settings_dict.get('ENGINE')}; "
                        "lifeguard manages PostgreSQL databases only: remove it from "
                        "django_aliases."
                    )
                self.unmanaged.append(name)
                continue
            options = wrapper.settings_dict.get("OPTIONS") or {}
            self.aliases[name] = _Alias(
                name=name,
                pooled=bool(options.get("pool")),
                user_set_application_name="application_name" in options
                or bool(os.environ.get("PGAPPNAME")),
            )

    def _validate(self, alias: _Alias, settings_dict: dict[str, Any], worker: WorkerInfo) -> None:
        where = f"DATABASES[{alias.name!r}]"
        if not alias.pooled:
            return
        max_age = settings_dict.get("CONN_MAX_AGE", 0)
        if max_age != 0:
            raise ConfigurationError(
                f"{where} sets OPTIONS['pool'] and CONN_MAX_AGE={max_age!r}: Django refuses "
                "persistent connections with its pool. Set CONN_MAX_AGE to 0; lifeguard keeps "
                "pooled connections warm across tasks by itself."
            )
        import django

        if django.VERSION < (5, 1):
            raise ConfigurationError(
                f"{where} sets OPTIONS['pool'], which needs Django 5.1 or later "
                f"(this is {django.get_version()}): upgrade Django or remove the pool option."
            )
        try:
            import psycopg_pool  # noqa: F401
        except ImportError:
            raise ConfigurationError(
                f"{where} sets OPTIONS['pool'], which needs psycopg 3 with psycopg_pool: "
                "pip install 'psycopg[pool]'."
            ) from None
        pool_options = settings_dict["OPTIONS"]["pool"]
        pool_options = pool_options if isinstance(pool_options, dict) else {}
        min_size = int(pool_options.get("min_size", 4))
        if worker.pool is PoolKind.PREFORK and min_size > 1:
            total = f" x {worker.concurrency} children" if worker.concurrency else " per child"
            self.guard.lifecycle.announce(
                logger,
                logging.WARNING,
                "lifeguard: %s pool keeps min_size=%d connections in every prefork child "
                "(%d%s), but a child runs one task at a time: set OPTIONS['pool'] = "
                "{'min_size': 1, 'max_size': 2} to hold one warm connection per child.",
                where,
                min_size,
                min_size,
                total,
            )

    def _policy(self, alias: _Alias, settings_dict: dict[str, Any], worker: WorkerInfo) -> str:
        if alias.pooled:
            return "native pool kept open for the process, connections returned after each task"
        max_age = settings_dict.get("CONN_MAX_AGE", 0)
        if worker.pool.green and max_age != 0:
            budget = self.guard.options.green_budget or default_budget(worker.concurrency)
            return (
                f"greenlets under {worker.pool.value} share up to {budget} warm connections "
                "across tasks (the lifeguard option green_budget)"
            )
        if worker.pool.green:
            return (
                f"CONN_MAX_AGE=0 under {worker.pool.value}: closed after each task (set "
                "CONN_MAX_AGE to share warm connections between greenlets)"
            )
        if max_age == 0:
            return "CONN_MAX_AGE=0: closed after each task (set CONN_MAX_AGE to reuse them)"
        limit = "no age limit" if max_age is None else f"up to {max_age}s old"
        return f"reused across tasks when clean ({limit})"

    def _set_application_name(self, connections: Any) -> None:
        prefix = self.guard.options.application_name_prefix
        if not prefix:
            return
        name = application_name(prefix)
        for alias in self.aliases.values():
            if not alias.user_set_application_name:
                settings_dict = connections[alias.name].settings_dict
                settings_dict.setdefault("OPTIONS", {})["application_name"] = name

    # --- after fork --------------------------------------------------------------------

    def on_process_start(self, worker: WorkerInfo, forked: bool) -> None:
        if not self.enabled:
            return
        from django.db import connections

        self._known = weakref.WeakSet()
        self._foreign = []
        self._trouble = self.guard.hook(DatabaseTrouble)  # looked up once, not per task
        if forked:
            self._drop_inherited(connections)
            self._set_application_name(connections)
        if self.fixup is not None:
            self.fixup.after_fork()
        for alias in self.aliases.values():
            if alias.pooled and worker.pool.green:
                settings_dict = connections[alias.name].settings_dict
                pool_options = settings_dict["OPTIONS"]["pool"]
                settings_dict["OPTIONS"]["pool"] = self.green.add_native_pool(
                    type(connections[alias.name]),
                    alias.name,
                    pool_options if isinstance(pool_options, dict) else {},
                    self.guard.options.green_budget or default_budget(worker.concurrency),
                    self.guard.options.green_wait_timeout,
                )
            if alias.pooled:
                pool = connections[alias.name].pool
                self._install_pool_check(pool)
                self._pool_opened_seen[alias.name] = 0
                if forked:
                    pool.open(wait=False)  # warm connections before the first task
            elif worker.pool.green and connections[alias.name].settings_dict["CONN_MAX_AGE"] != 0:
                options = self.guard.options
                budget = GreenBudget(
                    alias.name,
                    options.green_budget or default_budget(worker.concurrency),
                    options.green_wait_timeout,
                    auto=options.green_budget is None,
                )
                self.green.add(type(connections[alias.name]), budget)

    def _drop_inherited(self, connections: Any) -> None:
        """Forget every connection and pool copied from the parent, sending nothing."""
        for wrapper in connections.all(initialized_only=True):
            if wrapper.connection is not None:
                pgdriver.abandon_inherited(wrapper.connection)
                wrapper.connection = None
        seen: set[int] = set()
        for alias in self.aliases.values():
            pools = getattr(type(connections[alias.name]), "_connection_pools", None)
            if pools is None or id(pools) in seen:
                continue
            seen.add(id(pools))
            for pool in list(pools.values()):
                for conn in list(getattr(pool, "_pool", ())):
                    pgdriver.abandon_inherited(conn)
                pgdriver.keep_forever(pool)
            pools.clear()

    # --- tasks ---------------------------------------------------------------------------

    def _initialized(self) -> Iterator[tuple[_Alias, Any]]:
        from django.db import connections

        for wrapper in connections.all(initialized_only=True):
            alias = self.aliases.get(wrapper.alias)
            if alias is not None:
                yield alias, wrapper

    def before_task(self, run: TaskRun) -> None:
        if not self.enabled:
            return
        now = time.monotonic()
        for alias, wrapper in self._initialized():
            if wrapper.connection is None or alias.pooled:
                continue
            reason = self._reuse_problem(wrapper, now)
            if reason is not None:
                self._discard(wrapper, reason, run.name)
                continue
            self.guard.counters.incr(counters.CONNECTIONS_REUSED, task=run.name)
        self._close_unmanaged()

    def _reuse_problem(self, wrapper: Any, now: float) -> str | None:
        """Why a kept connection must not serve the next task: the cheap checks, then
        CONN_MAX_AGE, then one round trip if it idled past ``ping_after_idle``."""
        problem = pgdriver.reuse_problem(wrapper.connection)
        if problem is None and wrapper.close_at is not None and now >= wrapper.close_at:
            return MAX_AGE
        if problem is not None:
            return problem.value
        ping_after = self.guard.options.ping_after_idle
        idle = now - self._idle_since.get(wrapper, now)
        if ping_after is not None and idle > ping_after and not wrapper.is_usable():
            return PING_FAILED
        return None

    def _vet_warm(self, wrapper: Any, entry: Any) -> bool:
        """Under green pools: may this greenlet's wrapper take a warm connection from the
        process-wide set? The before-reuse checks, run inside Django's connect()."""
        fresh_close_at = wrapper.close_at
        wrapper.connection, wrapper.close_at = entry.raw, entry.close_at
        self._idle_since[wrapper] = entry.since
        reason = self._reuse_problem(wrapper, time.monotonic())
        if reason is None:
            wrapper.connection = None  # connect() assigns what get_new_connection returns
            return True
        run = self.guard.lifecycle.current_run()
        self._discard(wrapper, reason, run.name if run is not None else None)
        wrapper.close_at = fresh_close_at
        return False

    def watches_result_store(self, backend_class: type) -> bool:
        return backend_class.__module__.startswith("django_celery_results")

    def before_result_stored(self, run: TaskRun, backend: Any) -> None:
        """django-celery-results writes the result through the task's own connection:
        a transaction the task left open would take the result with it when rolled back
        at task end. Roll it back (and restore autocommit) before the result is written."""
        if not self.enabled or not type(backend).__module__.startswith("django_celery_results"):
            return
        for _alias, wrapper in self._initialized():
            raw = wrapper.connection
            if raw is None:
                continue
            status = pgdriver.transaction_status(raw)
            open_transaction = status in (
                pgdriver.TransactionStatus.INTRANS,
                pgdriver.TransactionStatus.INERROR,
            )
            autocommit = wrapper.settings_dict["AUTOCOMMIT"]
            changed = wrapper.autocommit != autocommit
            if not (open_transaction or changed or wrapper.in_atomic_block):
                continue
            logger.warning(
                "lifeguard: task %s left a transaction open on the %s connection; rolled "
                "it back before its result is stored (django-celery-results writes the "
                "result through that connection, and would lose it with the transaction)",
                run.name,
                wrapper.alias,
            )
            if wrapper.in_atomic_block:
                self._discard(wrapper, ATOMIC_BLOCK, run.name)  # rolls back, reconnects
                continue
            try:
                if changed:
                    wrapper.rollback()
                    wrapper.set_autocommit(autocommit)
                elif open_transaction and not pgdriver.rollback_quietly(raw):
                    raise RuntimeError("rollback failed")
            except Exception:
                logger.debug("rollback before the result store failed", exc_info=True)
                self._discard(wrapper, Problem.IN_TRANSACTION.value, run.name)
                continue
            if open_transaction:
                self.guard.counters.incr(counters.TRANSACTIONS_ROLLED_BACK, task=run.name)

    def after_task(self, run: TaskRun, outcome: TaskOutcome) -> None:
        if not self.enabled:
            return
        for alias, wrapper in self._initialized():
            if wrapper.connection is None:
                continue
            if alias.pooled:
                self._return_to_pool(wrapper, run.name)
                continue
            now = time.monotonic()
            reason = self._end_of_task_problem(wrapper, now)
            if reason is None:
                self._idle_since[wrapper] = now
                self.green.hand_back(wrapper, now)  # gevent/eventlet
            else:
                self._discard(wrapper, reason, run.name)
        self._close_unmanaged()
        self._sweep_foreign(run)
        self.green.settle()  # a connection closed above frees its place in the green budget
        if self.fixup is not None:
            self.fixup.close_caches()

    def _end_of_task_problem(self, wrapper: Any, now: float) -> str | None:
        """Why this connection can't be kept for the next task; None if it can.

        No round trip: driver state, transaction status, socket readability, then
        Django's own state (atomic block, autocommit, errors, CONN_MAX_AGE).
        """
        problem = pgdriver.reuse_problem(wrapper.connection)
        if problem is not None:
            return problem.value
        if wrapper.in_atomic_block:
            return ATOMIC_BLOCK
        if wrapper.autocommit != wrapper.settings_dict["AUTOCOMMIT"]:
            return AUTOCOMMIT_CHANGED
        if wrapper.errors_occurred:
            return ERRORS_OCCURRED
        if wrapper.close_at is not None and now >= wrapper.close_at:
            return MAX_AGE
        green = self.worker is not None and self.worker.pool.green
        if green and wrapper.alias not in self.green.budgets:
            return GREENLET_SCOPE
        trouble = self._trouble
        if trouble is not None and trouble.slots_scarce():
            return SLOTS_SCARCE
        return None

    def _close_unmanaged(self) -> None:
        """Non-PostgreSQL aliases keep Celery's stock behaviour: closed around each task."""
        if not self.unmanaged or self.fixup is None:
            return
        from django.db import connections

        for wrapper in connections.all(initialized_only=True):
            if wrapper.alias in self.unmanaged:
                self._close_politely(wrapper)

    # --- discarding ----------------------------------------------------------------------

    def _discard(
        self, wrapper: Any, reason: str, task: str | None, *, mid_task: bool = False
    ) -> None:
        """Throw a connection away, leaving the server and Django's wrapper clean.

        ``mid_task``: called from inside a failing query, where an enclosing ``atomic()``
        is still to exit; Django's own close() bookkeeping is left for it to finish.
        """
        raw = wrapper.connection
        if raw is None:
            return
        pid = pgdriver.backend_pid(raw)
        if reason == Problem.INTERRUPTED.value:
            if pgdriver.cancel_query(raw, self.guard.options.cancel_timeout):
                self.guard.counters.incr(counters.QUERIES_CANCELLED, task=task)
        elif reason in _ROLLBACK_REASONS and pgdriver.rollback_quietly(raw):
            self.guard.counters.incr(counters.TRANSACTIONS_ROLLED_BACK, task=task)
        pgdriver.close_quietly(raw)
        try:
            wrapper.close()  # pooled: hands the closed connection back, the pool replaces it
        except Exception:
            logger.debug("Django close() of a discarded connection failed", exc_info=True)
        if not mid_task:
            self._reset_wrapper(wrapper)
        self.guard.counters.incr(counters.CONNECTIONS_DISCARDED, task=task, reason=reason)
        level = logging.WARNING if reason in _WARN_REASONS else logging.INFO
        logger.log(
            level,
            "lifeguard: discarded the %s connection (backend %s) after task %s: %s",
            wrapper.alias,
            pid,
            task or "-",
            _explain(reason),
        )

    @staticmethod
    def _reset_wrapper(wrapper: Any) -> None:
        """Between tasks nothing runs on the wrapper: make it connect afresh next time."""
        wrapper.connection = None
        wrapper.in_atomic_block = False
        wrapper.closed_in_transaction = False
        wrapper.needs_rollback = False
        wrapper.savepoint_ids = []
        wrapper.atomic_blocks = []

    def _return_to_pool(self, wrapper: Any, task: str) -> None:
        problem = pgdriver.reuse_problem(wrapper.connection)
        # An open transaction is rolled back here (the pool would too, with a warning),
        # and the connection goes back clean.
        if (
            problem is not None
            and problem.value in _ROLLBACK_REASONS
            and (pgdriver.rollback_quietly(wrapper.connection))
        ):
            self.guard.counters.incr(counters.TRANSACTIONS_ROLLED_BACK, task=task)
            problem = pgdriver.reuse_problem(wrapper.connection)
        if problem is not None:
            self._discard(wrapper, problem.value, task)
            return
        self._idle_since[wrapper.connection] = time.monotonic()
        self._close_politely(wrapper)
        if wrapper.in_atomic_block:
            self._reset_wrapper(wrapper)

    @staticmethod
    def _close_politely(wrapper: Any) -> None:
        try:
            wrapper.close()
        except Exception:
            logger.debug("closing %s failed", wrapper.alias, exc_info=True)
            wrapper.connection = None

    # --- the native pool's checkout check ---------------------------------------------

    def _install_pool_check(self, pool: Any) -> None:
        """Make the pool run lifeguard's cheap check on every checkout.

        A pooled connection the server terminated while idle still looks IDLE to
        psycopg_pool; without a check the task's first query would fail. Django only
        installs psycopg_pool's check (a round trip per checkout) with
        CONN_HEALTH_CHECKS; ours costs microseconds and pings only after a long idle.
        """
        if not hasattr(pool, "_check"):
            return
        user_check = pool._check
        ping_after = self.guard.options.ping_after_idle
        idle_since = self._idle_since

        def check(conn: Any) -> None:
            problem = pgdriver.reuse_problem(conn)
            if problem is None and ping_after is not None:
                idle = time.monotonic() - idle_since.get(conn, time.monotonic())
                if idle > ping_after:
                    try:
                        conn.execute("")
                    except Exception:
                        problem = Problem.SERVER_CLOSED
            if problem is not None:
                self.guard.counters.incr(counters.CONNECTIONS_DISCARDED, reason=problem.value)
                pgdriver.close_quietly(conn)  # closed, so the pool replaces it
                raise RuntimeError(f"lifeguard: pooled connection not reusable ({problem.value})")
            if user_check is not None:
                user_check(conn)

        pool._check = check

    # --- new connections: counting, the execute guard, foreign threads -----------------

    def _on_connection_created(self, sender: Any = None, connection: Any = None, **_: Any) -> None:
        if connection is None or not self.enabled:
            return
        alias = self.aliases.get(connection.alias)
        if alias is None:
            return
        if self._guard_execute not in connection.execute_wrappers:
            connection.execute_wrappers.append(self._guard_execute)
        lifecycle = self.guard.lifecycle
        if not lifecycle.in_task_process:
            return
        self._known.add(connection)
        run = lifecycle.current_run()
        task = run.name if run is not None else None
        if alias.pooled:
            self._count_pool_checkout(alias, connection, task)
        elif self.green.took_warm(connection):
            self.guard.counters.incr(counters.CONNECTIONS_REUSED, task=task)
        else:
            self.guard.counters.incr(counters.CONNECTIONS_OPENED, task=task)
        if run is None:
            self._remember_foreign(connection)

    def _count_pool_checkout(self, alias: _Alias, wrapper: Any, task: str | None) -> None:
        stats = wrapper.pool.get_stats() if wrapper.pool is not None else {}
        opened = int(stats.get("connections_num", 0))
        new = opened - self._pool_opened_seen.get(alias.name, 0)
        self._pool_opened_seen[alias.name] = opened
        if new > 0:
            self.guard.counters.incr(counters.CONNECTIONS_OPENED, task=task, n=new)
        else:
            self.guard.counters.incr(counters.CONNECTIONS_REUSED, task=task)

    def _guard_execute(
        self, execute: Callable[..., Any], sql: Any, params: Any, many: bool, context: Any
    ) -> Any:
        """Django execute wrapper: an exception that leaves the query running on the
        server (soft time limit, gevent timeout, KeyboardInterrupt) cancels it and
        discards the connection before anything else can trip over it."""
        try:
            return execute(sql, params, many, context)
        except BaseException:
            wrapper = context.get("connection")
            raw = getattr(wrapper, "connection", None)
            if raw is not None and pgdriver.is_busy(raw):
                run = self.guard.lifecycle.current_run()
                task = run.name if run is not None else None
                self._discard(wrapper, Problem.INTERRUPTED.value, task, mid_task=True)
            raise

    def _remember_foreign(self, wrapper: Any) -> None:
        lifecycle = self.guard.lifecycle
        active = lifecycle.active_runs()
        if not active:
            return  # opened between tasks by the user's own background thread
        unit = lifecycle.current_unit()
        try:
            unit_ref: Any = weakref.ref(unit)
        except TypeError:
            unit_ref = lambda: unit  # noqa: E731
        record = _ForeignConnection(
            wrapper=weakref.ref(wrapper),
            unit=unit_ref,
            unit_label=unit_label(unit),
            task_ids=frozenset(run.id for run in active),
            task_names=tuple(sorted({run.name for run in active})),
        )
        with self._foreign_lock:
            self._foreign.append(record)

    def _sweep_foreign(self, ending: TaskRun | None) -> None:
        """Close connections of threads/greenlets that tasks started and that have ended.

        Called at every task end (cheap when there is nothing to do) and at shutdown
        (``ending`` None), when even still-running threads' connections are closed.
        """
        if not self._foreign:
            return
        with self._foreign_lock:
            records = list(self._foreign)
        lifecycle = self.guard.lifecycle
        for record in records:
            wrapper = record.wrapper()
            if wrapper is None or wrapper.connection is None:
                self._forget_foreign(record)
                continue
            unit = record.unit()
            alive = unit is not None and lifecycle.unit_alive(unit)
            if alive and ending is not None:
                if ending.id in record.task_ids and not record.warned:
                    record.warned = True
                    logger.warning(
                        "lifeguard: task %s ended while %s, which it started, still holds a "
                        "%s connection; lifeguard closes it when that thread ends",
                        ending.name,
                        record.unit_label,
                        wrapper.alias,
                    )
                continue
            task = record.task_names[0] if len(record.task_names) == 1 else None
            names = ", ".join(record.task_names)
            logger.warning(
                "lifeguard: task %s leaked a %s connection opened by %s; closed it",
                names,
                wrapper.alias,
                record.unit_label,
            )
            self.guard.counters.incr(counters.LEAKS_FOUND, task=task)
            wrapper.inc_thread_sharing()
            try:
                self._discard(wrapper, LEAKED, task)
            finally:
                wrapper.dec_thread_sharing()
            self._forget_foreign(record)

    def _forget_foreign(self, record: _ForeignConnection) -> None:
        with self._foreign_lock:
            if record in self._foreign:
                self._foreign.remove(record)

    # --- shutdown ----------------------------------------------------------------------

    def on_process_stop(self, worker: WorkerInfo) -> None:
        if not self.enabled:
            return
        from django.db import connections

        self._sweep_foreign(None)
        self.green.close_idle()
        for wrapper in list(self._known):
            if wrapper.connection is None:
                continue
            wrapper.inc_thread_sharing()
            try:
                self._close_politely(wrapper)
            finally:
                wrapper.dec_thread_sharing()
        for wrapper in connections.all(initialized_only=True):
            self._close_politely(wrapper)
        for alias in self.aliases.values():
            if alias.pooled and alias.name in getattr(
                type(connections[alias.name]), "_connection_pools", {}
            ):
                try:
                    connections[alias.name].close_pool()
                except Exception:
                    logger.debug("closing the %s pool failed", alias.name, exc_info=True)

    def stats(self) -> dict[str, Any] | None:
        if not self.enabled:
            return None
        from django.db import connections

        out: dict[str, Any] = {}
        for alias in self.aliases.values():
            entry: dict[str, Any] = {"pooled": alias.pooled}
            if alias.pooled:
                pools = getattr(type(connections[alias.name]), "_connection_pools", {})
                pool = pools.get(alias.name)
                if pool is not None:
                    entry["pool"] = pool.get_stats()
            green = self.green.stats(alias.name)
            if green is not None:
                entry["green"] = green
            out[alias.name] = entry
        return {"aliases": out}

    def metric_samples(self) -> list[Any]:
        """The green budgets' figures for the worker's metrics endpoint."""
        return self.green.metric_samples()


_EXPLANATIONS = {
    ATOMIC_BLOCK: "the task ended inside an atomic() block",
    AUTOCOMMIT_CHANGED: "the task changed autocommit",
    ERRORS_OCCURRED: "a database error occurred on it",
    MAX_AGE: "it reached CONN_MAX_AGE",
    PING_FAILED: "it failed the round-trip check after a long idle",
    GREENLET_SCOPE: "connections are per greenlet",
    LEAKED: "it was leaked by a thread or greenlet the task started",
    SHUTDOWN: "the worker is shutting down",
    SLOTS_SCARCE: "connection slots are exhausted: an idle connection gives its slot back",
}


def _explain(reason: str) -> str:
    return pgdriver.explain(reason, _EXPLANATIONS)
