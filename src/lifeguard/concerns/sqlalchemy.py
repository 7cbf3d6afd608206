"""SQLAlchemy engines in Celery workers: fork-safe, interrupt-safe, attributed and counted.

Register an engine (sync ``Engine`` or ``AsyncEngine``) with ``guard.add_engine()``;
everything else follows from SQLAlchemy's own events on it:

* after fork, connections copied from the parent are forgotten without a byte sent on
  the parent's sockets, then ``engine.dispose(close=False)`` gives the child a fresh
  pool; a process-id check on every checkout is the backstop for anything missed;
* the MainProcess of a prefork worker keeps no connection: using an engine there before
  forking is reported, and its pool is closed at worker start;
* a statement interrupted by any exception (a soft time limit, a gevent timeout) is
  cancelled on the server and its connection invalidated inside the failing call
  (``handle_error``), so no rollback is attempted on a busy connection and the original
  exception, not a follow-up error, reaches Celery;
* every checkout runs pgdriver's no-round-trip check: a connection the server closed
  while idle is replaced before the task sees it;
* connections a task leaves checked out are leaks: reported with the task's name and
  handed back clean at task end; so are those a thread or greenlet the task started
  checked out and never returned, once that thread or greenlet has ended;
* under gevent/eventlet, each engine's ``pool_size + max_overflow`` is checked against
  the concurrency and ``pool_timeout`` (at process start), and against the database's
  free connection slots (at the engine's first connection in the process);
* ``application_name`` names the worker process, and the PgBouncer transaction-mode
  profile is applied to new connections when the option asks for it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .. import stats as counters
from ..errors import ConfigurationError
from ..hooks import Hook, TaskOutcome, TaskRun, WorkerInfo, unit_label
from ..postgres import driver as pgdriver
from ..postgres.appname import application_name
from ..postgres.conninfo import describe_sqlalchemy_url, libpq_url
from ..postgres.driver import Problem, TransactionStatus
from ..postgres.pgbouncer import transaction_mode_connect_args
from ..postgres.slots import fair_share, limits_on

if TYPE_CHECKING:
    from .event_loop import EventLoop

logger = logging.getLogger("lifeguard.sqlalchemy")

# Discard reasons of our own (the driver-level ones are pgdriver.Problem values).
INHERITED = "inherited"  # created in another process (the parent, before fork)
DISCONNECT = "disconnect"  # SQLAlchemy saw the connection fail
INVALIDATED = "invalidated"  # the application invalidated it
LEAKED = "leaked"  # still checked out at task end, and not reusable as it was
SHUTDOWN = "shutdown"

# Keys lifeguard keeps in SQLAlchemy's ``ConnectionRecord.info``.
_PID = "lifeguard_pid"
_NEW = "lifeguard_new"
_REASON = "lifeguard_discard_reason"

_WARN_REASONS = {Problem.INTERRUPTED.value, INHERITED, LEAKED}

#: Under green pools a ``pool_timeout`` above this (seconds) is as good as no bound: a
#: greenlet past the pool's capacity waits that long before its task fails.
LONG_POOL_TIMEOUT = 300.0


class _StatementStillRunning(Exception):
    """Raised from the pool's reset event: SQLAlchemy then invalidates the connection."""


@dataclass(eq=False)
class ManagedEngine:
    """An engine registered with the guard, and what lifeguard learned about it."""

    engine: Any  # the sync Engine (an AsyncEngine's ``sync_engine``)
    async_engine: Any  # the AsyncEngine, or None
    label: str  # the URL, password masked
    user_application_name: bool | None = None  # decided at the first connect
    main_process_checkouts: int = 0
    warned_main_process: bool = False
    slots_checked: bool = False  # green pools: capacity read against the free slots

    @property
    def is_async(self) -> bool:
        return self.async_engine is not None

    @property
    def is_postgresql(self) -> bool:
        return str(self.engine.dialect.name) == "postgresql"


@dataclass(eq=False)
class _Checkout:
    """A connection checked out of a managed pool in this process."""

    record: Any
    fairy: weakref.ReferenceType[Any]
    managed: ManagedEngine
    run: TaskRun | None
    # Checked out outside any task's own thread/greenlet while tasks ran: the thread or
    # greenlet that did it, and the tasks running then (one of them started it).
    unit: Callable[[], Any] | None = None
    unit_label: str = ""
    started_by: tuple[str, ...] = ()


class LazyEngine:
    """What ``guard.add_engine(factory)`` returns: call it for the engine.

    The factory runs once, on the first call (in whichever process makes it); the
    engine is then managed like one passed directly, including across fork.
    """

    def __init__(self, hook: SqlAlchemyEngines, factory: Callable[[], Any]) -> None:
        self._hook = hook
        self._factory = factory
        self._engine: Any = None
        self._lock = threading.Lock()

    def __call__(self) -> Any:
        if self._engine is None:
            with self._lock:
                if self._engine is None:
                    engine = self._factory()
                    self._hook.register(engine)
                    self._engine = engine
        return self._engine


def _is_engine(obj: Any) -> bool:
    from sqlalchemy.engine import Engine

    if isinstance(obj, Engine):
        return True
    try:  # needs greenlet, optional since SQLAlchemy 2.1; without it no AsyncEngine exists
        from sqlalchemy.ext.asyncio import AsyncEngine
    except ImportError:
        return False
    return isinstance(obj, AsyncEngine)


def _is_exit_exception(exc: BaseException | None) -> bool:
    """SQLAlchemy's own rule: such exceptions already invalidate the connection."""
    return exc is not None and (
        not isinstance(exc, Exception) or isinstance(exc, asyncio.CancelledError)
    )


class SqlAlchemyEngines(Hook):
    """The SQLAlchemy engines concern: one instance per guard."""

    name = "sqlalchemy"

    def __init__(self, event_loop: EventLoop) -> None:
        self.event_loop = event_loop
        self.engines: list[ManagedEngine] = []
        self.worker: WorkerInfo | None = None
        self._lock = threading.Lock()
        self._checked_out: dict[int, _Checkout] = {}

    # --- registration --------------------------------------------------------------------

    def add_engine(self, engine_or_factory: Any) -> Any:
        """Manage an engine; returns it (or, for a factory, a :class:`LazyEngine`)."""
        try:
            import sqlalchemy  # noqa: F401
        except ImportError:
            raise ConfigurationError(
                "guard.add_engine() needs SQLAlchemy: pip install 'celery-lifeguard[sqlalchemy]'"
            ) from None
        if _is_engine(engine_or_factory):
            self.register(engine_or_factory)
            return engine_or_factory
        if callable(engine_or_factory):
            return LazyEngine(self, engine_or_factory)
        raise ConfigurationError(
            f"guard.add_engine() takes an Engine, an AsyncEngine or a function returning one, "
            f"not {engine_or_factory!r}"
        )

    def register(self, engine: Any) -> ManagedEngine:
        if not _is_engine(engine):
            raise ConfigurationError(
                f"lifeguard expected a SQLAlchemy Engine or AsyncEngine (from guard.session() "
                f"or an engine factory), got {engine!r}"
            )
        sync_engine = getattr(engine, "sync_engine", engine)
        with self._lock:
            for managed in self.engines:
                if managed.engine is sync_engine:
                    return managed
            managed = ManagedEngine(
                engine=sync_engine,
                async_engine=engine if engine is not sync_engine else None,
                label=describe_sqlalchemy_url(sync_engine.url),
            )
            self.engines.append(managed)
        self._listen(managed)
        return managed

    def _listen(self, managed: ManagedEngine) -> None:
        from sqlalchemy import event

        engine = managed.engine

        def on_connect(dbapi_connection: Any, record: Any) -> None:
            self._on_connect(managed, dbapi_connection, record)

        def on_checkout(dbapi_connection: Any, record: Any, fairy: Any) -> None:
            self._on_checkout(managed, record, fairy)

        def on_checkin(dbapi_connection: Any, record: Any) -> None:
            self._forget_checkout(record)

        def on_invalidate(dbapi_connection: Any, record: Any, exception: Any) -> None:
            self._on_invalidate(managed, record, exception)

        def on_reset(dbapi_connection: Any, record: Any, reset_state: Any) -> None:
            self._on_reset(managed, record)

        def do_connect(dialect: Any, record: Any, cargs: Any, cparams: dict[str, Any]) -> None:
            self._prepare_connect(managed, cargs, cparams)

        def handle_error(context: Any) -> None:
            self._on_error(managed, context)

        event.listen(engine, "connect", on_connect)
        event.listen(engine, "checkout", on_checkout)
        event.listen(engine, "checkin", on_checkin)
        event.listen(engine, "invalidate", on_invalidate)
        event.listen(engine, "reset", on_reset)
        event.listen(engine, "do_connect", do_connect)
        event.listen(engine, "handle_error", handle_error)

    # --- worker start: the MainProcess keeps nothing --------------------------------------

    def on_worker_start(self, worker: WorkerInfo) -> None:
        self.worker = worker
        if not worker.pool.forks:
            return
        for managed in list(self.engines):
            if managed.main_process_checkouts:
                self._warn_main_process_use(managed)
            self._close_in_main_process(managed)

    def _warn_main_process_use(self, managed: ManagedEngine) -> None:
        managed.warned_main_process = True
        self.guard.lifecycle.announce(
            logger,
            logging.WARNING,
            "lifeguard: engine %s was used in the worker's MainProcess before it forked "
            "(%d checkout(s)); prefork children would inherit its connections. lifeguard "
            "closes them in the MainProcess and gives each child a fresh pool; use the "
            "engine only inside tasks.",
            managed.label,
            managed.main_process_checkouts,
        )

    def _close_in_main_process(self, managed: ManagedEngine) -> None:
        """Close the MainProcess's idle connections before children are forked.

        A sync engine gets a real close (this process owns them). An async engine's
        connections may belong to a loop that is gone (``asyncio.run`` at import), where
        a polite close fails: their sockets are let go at the descriptor level instead
        (:func:`pgdriver.abandon_inherited`), which the server sees as an ordinary
        disconnect of an idle session.
        """
        try:
            if managed.is_async:
                self._abandon_pool(managed)
            else:
                managed.engine.dispose()
        except Exception:
            logger.debug("closing %s in the MainProcess failed", managed.label, exc_info=True)

    # --- after fork ---------------------------------------------------------------------

    def on_process_start(self, worker: WorkerInfo, forked: bool) -> None:
        self.worker = worker
        with self._lock:
            self._checked_out.clear()
        if worker.pool.green and worker.concurrency:
            for managed in list(self.engines):
                self._check_green_pool_size(managed, worker)
        if not forked:
            return
        for managed in list(self.engines):
            self._abandon_pool(managed)

    def _check_green_pool_size(self, managed: ManagedEngine, worker: WorkerInfo) -> None:
        """Under gevent/eventlet every greenlet may check out a connection at once: say
        what a QueuePool smaller than the concurrency (or unbounded) means there."""
        pool = managed.engine.pool
        size = _pool_figure(pool, "size")
        overflow = getattr(pool, "_max_overflow", None)
        if managed.is_async or size is None or overflow is None:
            return
        concurrency = worker.concurrency or 0
        if overflow < 0:
            self.guard.lifecycle.announce(
                logger,
                logging.WARNING,
                "lifeguard: engine %s has max_overflow=-1 (unbounded) under %s -c %d: it may "
                "open a connection per greenlet, up to %d; set max_overflow so pool_size + "
                "max_overflow is the connections you want this process to hold.",
                managed.label,
                worker.pool.value,
                concurrency,
                concurrency,
            )
            return
        capacity = size + overflow
        if capacity >= concurrency:
            return
        timeout = getattr(pool, "_timeout", None)
        if timeout is None or timeout > LONG_POOL_TIMEOUT:
            waits = "forever" if timeout is None else f"{timeout:g}s"
            self.guard.lifecycle.announce(
                logger,
                logging.WARNING,
                "lifeguard: engine %s holds at most %d connections (pool_size + max_overflow) "
                "for the %d greenlets of this %s worker, and pool_timeout=%s: a greenlet past "
                "%d waits %s for a connection, its task hanging while the others keep "
                "theirs. Set pool_timeout (SQLAlchemy's default is 30) so the wait ends in "
                "SQLAlchemy's TimeoutError, or raise pool_size/max_overflow.",
                managed.label,
                capacity,
                concurrency,
                worker.pool.value,
                timeout,
                capacity,
                waits,
            )
            return
        self.guard.lifecycle.announce(
            logger,
            logging.INFO,
            "lifeguard: engine %s holds at most %d connections (pool_size + max_overflow) "
            "for the %d greenlets of this %s worker: a greenlet past %d waits up to "
            "pool_timeout=%ss, then its task fails with SQLAlchemy's TimeoutError. Raise "
            "pool_size/max_overflow if tasks keep connections long.",
            managed.label,
            capacity,
            concurrency,
            worker.pool.value,
            capacity,
            f"{timeout:g}",
        )

    def _check_free_slots(
        self, managed: ManagedEngine, dbapi_connection: Any, worker: WorkerInfo
    ) -> None:
        """At an engine's first connection under gevent/eventlet: can the server give this
        process the connections its pool may open? A default pool shares the rule of the
        Django green budget: at most half the slots still free for ordinary roles."""
        if managed.is_async or not managed.is_postgresql:
            return
        pool = managed.engine.pool
        size = _pool_figure(pool, "size")
        overflow = getattr(pool, "_max_overflow", None)
        if size is None or overflow is None:
            return
        concurrency = worker.concurrency or 0
        capacity = concurrency if overflow < 0 else min(size + overflow, concurrency or size)
        limits = limits_on(dbapi_connection)
        if limits is None:
            return
        room = limits.free_slots + 1  # this connection is one of the pool's
        if capacity <= fair_share(room):
            return
        level = logging.WARNING if capacity > room else logging.INFO
        logger.log(
            level,
            "lifeguard: engine %s may open %d connections in this %s -c %d process "
            "(pool_size=%d + max_overflow=%s), but the server has %d free connection slots "
            "now (%s): set pool_size + max_overflow to at most %d (half the free slots), "
            "put PgBouncer in front, or raise max_connections.",
            managed.label,
            capacity,
            worker.pool.value,
            concurrency,
            size,
            overflow,
            room,
            limits.summary(),
            fair_share(room),
        )

    def _abandon_pool(self, managed: ManagedEngine) -> None:
        """Give this process a fresh pool; forget the old one's connections without I/O.

        ``dispose(close=False)`` is SQLAlchemy's documented way; letting the sockets go at
        the descriptor level and keeping the old pool alive means no destructor ever
        sends a Terminate on the parent's session.
        """
        old_pool = managed.engine.pool
        for record in _idle_records(old_pool):
            if getattr(record, "dbapi_connection", None) is not None:
                pgdriver.abandon_inherited(record.driver_connection)
                record.dbapi_connection = None
        pgdriver.keep_forever(old_pool)
        managed.engine.dispose(close=False)

    # --- pool events --------------------------------------------------------------------

    def _task_name(self) -> str | None:
        run = self.guard.lifecycle.current_run()
        return run.name if run is not None else None

    def _on_connect(self, managed: ManagedEngine, dbapi_connection: Any, record: Any) -> None:
        record.info[_PID] = os.getpid()
        record.info[_NEW] = True
        if self.guard.lifecycle.in_task_process:
            self.guard.counters.incr(counters.CONNECTIONS_OPENED, task=self._task_name())
            worker = self.worker
            if worker is not None and worker.pool.green and not managed.slots_checked:
                managed.slots_checked = True
                self._check_free_slots(managed, dbapi_connection, worker)

    def _on_checkout(self, managed: ManagedEngine, record: Any, fairy: Any) -> None:
        from sqlalchemy.exc import DisconnectionError

        pid = os.getpid()
        owner = record.info.get(_PID, pid)
        if owner != pid:
            # SQLAlchemy's pid recipe: forget the parent's connection, sending nothing.
            pgdriver.abandon_inherited(record.driver_connection)
            record.dbapi_connection = fairy.dbapi_connection = None
            self._count_discard(INHERITED, self._task_name())
            raise DisconnectionError(f"lifeguard: connection inherited from process {owner}")
        new = record.info.pop(_NEW, False)
        lifecycle = self.guard.lifecycle
        if not lifecycle.in_task_process:
            self._note_main_process_use(managed)
            return
        if not new:
            problem = self._reuse_problem(record)
            if problem is not None:
                record.info[_REASON] = problem.value
                # SQLAlchemy invalidates the record and connects afresh for this checkout.
                raise DisconnectionError(f"lifeguard: connection not reusable ({problem.value})")
            self.guard.counters.incr(counters.CONNECTIONS_REUSED, task=self._task_name())
        checkout = _Checkout(
            record=record, fairy=weakref.ref(fairy), managed=managed, run=lifecycle.current_run()
        )
        if checkout.run is None:
            self._note_foreign(checkout)
        with self._lock:
            self._checked_out[id(record)] = checkout

    @staticmethod
    def _reuse_problem(record: Any) -> Problem | None:
        driver = record.driver_connection
        if pgdriver.adapter_for(driver) is None:
            return None  # not a driver lifeguard knows: SQLAlchemy's own checks only
        return pgdriver.reuse_problem(driver)

    def _note_main_process_use(self, managed: ManagedEngine) -> None:
        worker = self.worker
        if worker is not None and not worker.is_main_process:
            return  # a forked process before on_process_start: nothing to say
        managed.main_process_checkouts += 1
        if worker is not None and worker.pool.forks and not managed.warned_main_process:
            self._warn_main_process_use(managed)

    def _note_foreign(self, checkout: _Checkout) -> None:
        """A checkout outside any task's own thread/greenlet while tasks run: a thread or
        greenlet a task started (``gevent.spawn`` in a task). Remember which, so a
        connection it never returns is found once it has ended."""
        lifecycle = self.guard.lifecycle
        active = lifecycle.active_runs()
        if not active:
            return  # between tasks: the application's own background thread
        unit = lifecycle.current_unit()
        try:
            checkout.unit = weakref.ref(unit)
        except TypeError:
            checkout.unit = lambda: unit
        checkout.unit_label = unit_label(unit)
        checkout.started_by = tuple(sorted({run.name for run in active}))

    def _forget_checkout(self, record: Any) -> None:
        with self._lock:
            self._checked_out.pop(id(record), None)

    def _on_invalidate(self, managed: ManagedEngine, record: Any, exception: Any) -> None:
        self._forget_checkout(record)
        reason = record.info.pop(_REASON, None)
        if reason is None:
            if exception is None:
                reason = INVALIDATED
            elif _is_exit_exception(exception):
                reason = Problem.INTERRUPTED.value
            else:
                reason = DISCONNECT
        if self.guard.lifecycle.in_task_process:
            self._count_discard(reason, self._task_name(), managed)

    def _count_discard(
        self, reason: str, task: str | None, managed: ManagedEngine | None = None
    ) -> None:
        self.guard.counters.incr(counters.CONNECTIONS_DISCARDED, task=task, reason=reason)
        level = logging.WARNING if reason in _WARN_REASONS else logging.INFO
        logger.log(
            level,
            "lifeguard: discarded a connection of %s during task %s: %s",
            managed.label if managed is not None else "an engine",
            task or "-",
            _explain(reason),
        )

    def _on_reset(self, managed: ManagedEngine, record: Any) -> None:
        """Checkin of a connection still running a statement (the application used the
        driver connection directly, or something escaped ``handle_error``): cancel it on
        the server and make SQLAlchemy invalidate instead of rolling back."""
        driver = record.driver_connection
        if driver is None or not pgdriver.is_busy(driver):
            return
        self._cancel(driver, self._task_name())
        record.info[_REASON] = Problem.INTERRUPTED.value
        raise _StatementStillRunning("lifeguard: statement still running at checkin; cancelled")

    def _cancel(self, driver: Any, task: str | None) -> None:
        if pgdriver.cancel_query(driver, self.guard.options.cancel_timeout):
            self.guard.counters.incr(counters.QUERIES_CANCELLED, task=task)

    # --- interrupted statements -----------------------------------------------------------

    def _on_error(self, managed: ManagedEngine, context: Any) -> None:
        """``handle_error``: an exception escaped a statement, commit or fetch.

        A statement still in flight (libpq ``ACTIVE``) means the exception interrupted it
        client-side: cancel it on the server and let SQLAlchemy invalidate the connection
        (``is_disconnect``) so nobody rolls back on it. SQLAlchemy then re-raises the
        original exception. asyncio cancellation is SQLAlchemy's own disconnect case, and
        the async drivers cancel the statement themselves; it is counted here.
        """
        connection = context.connection
        if connection is None or connection.closed or connection.invalidated:
            return
        fairy = connection.connection  # no I/O: the connection is valid
        driver = fairy.driver_connection
        exception = context.original_exception
        task = self._task_name()
        if driver is not None and pgdriver.is_busy(driver):
            self._cancel(driver, task)
            fairy.info[_REASON] = Problem.INTERRUPTED.value
            context.is_disconnect = True
            context.invalidate_pool_on_disconnect = False
            logger.warning(
                "lifeguard: %s interrupted a statement on %s during task %s; cancelled it "
                "on the server and discarded the connection",
                type(exception).__name__,
                managed.label,
                task or "-",
            )
        elif isinstance(exception, asyncio.CancelledError) and context.execution_context:
            fairy.info[_REASON] = Problem.INTERRUPTED.value
            self.guard.counters.incr(counters.QUERIES_CANCELLED, task=task)

    # --- task end: leaks ------------------------------------------------------------------

    def checkouts_of(self, run: TaskRun) -> list[_Checkout]:
        with self._lock:
            return [c for c in self._checked_out.values() if c.run is run]

    def discard_interrupted(self, run: TaskRun) -> None:
        """Before a task's sessions close: no connection of the task may still be busy."""
        for checkout in self.checkouts_of(run):
            fairy = checkout.fairy()
            if checkout.managed.is_async or fairy is None or not fairy.is_valid:
                continue
            driver = fairy.driver_connection
            if pgdriver.is_busy(driver):
                self._cancel(driver, run.name)
                fairy.info[_REASON] = Problem.INTERRUPTED.value
                self._invalidate(fairy)

    def after_task(self, run: TaskRun, outcome: TaskOutcome) -> None:
        self._sweep_foreign()
        leaked = self.checkouts_of(run)
        if not leaked:
            return
        self.guard.counters.incr(counters.LEAKS_FOUND, task=run.name, n=len(leaked))
        engines = sorted({c.managed.label for c in leaked})
        logger.warning(
            "lifeguard: task %s ended with %d connection(s) of %s still checked out "
            "(a Session or Connection not closed); lifeguard gave them back to the pool",
            run.name,
            len(leaked),
            ", ".join(engines),
        )
        self._give_back(leaked, run.name)

    def _sweep_foreign(self) -> None:
        """Give back what ended threads/greenlets that tasks started left checked out."""
        with self._lock:
            foreign = [c for c in self._checked_out.values() if c.unit is not None]
        lifecycle = self.guard.lifecycle
        for checkout in foreign:
            assert checkout.unit is not None
            unit = checkout.unit()
            if unit is not None and lifecycle.unit_alive(unit):
                continue
            fairy = checkout.fairy()
            if fairy is None or not fairy.is_valid:
                self._forget_checkout(checkout.record)
                continue
            names = ", ".join(checkout.started_by)
            task = checkout.started_by[0] if len(checkout.started_by) == 1 else None
            self.guard.counters.incr(counters.LEAKS_FOUND, task=task)
            logger.warning(
                "lifeguard: task %s leaked a connection of %s checked out by %s, which "
                "ended without returning it (a Session or Connection not closed); "
                "lifeguard gave it back to the pool",
                names,
                checkout.managed.label,
                checkout.unit_label,
            )
            self._give_back([checkout], task)

    def _give_back(self, checkouts: list[_Checkout], task: str | None) -> None:
        sync = [c for c in checkouts if not c.managed.is_async]
        for checkout in sync:
            self._give_back_one(checkout, task)
        pending = [c for c in checkouts if c.managed.is_async]

        def give_back_async() -> None:
            for checkout in pending:
                self._give_back_one(checkout, task)

        if pending:
            self._on_loop(give_back_async)

    def _give_back_one(self, checkout: _Checkout, task: str | None) -> None:
        """Return a leaked connection clean: cancel and invalidate a busy one, roll back
        an open transaction (the pool's reset does it), invalidate a broken one."""
        self._forget_checkout(checkout.record)
        fairy = checkout.fairy()
        if fairy is None or not fairy.is_valid:
            return
        driver = fairy.driver_connection
        known = pgdriver.adapter_for(driver) is not None
        status = pgdriver.transaction_status(driver)
        try:
            if known and status is TransactionStatus.ACTIVE:
                self._cancel(driver, task)
                fairy.info[_REASON] = Problem.INTERRUPTED.value
                self._invalidate(fairy)
            elif known and status is TransactionStatus.UNKNOWN:
                fairy.info[_REASON] = LEAKED
                self._invalidate(fairy)
            else:
                if status in (TransactionStatus.INTRANS, TransactionStatus.INERROR):
                    self.guard.counters.incr(counters.TRANSACTIONS_ROLLED_BACK, task=task)
                fairy._checkin()  # the pool's reset rolls back; a failure invalidates
        except Exception:
            logger.debug("giving back a leaked connection failed", exc_info=True)

    @staticmethod
    def _invalidate(fairy: Any) -> None:
        try:
            fairy.invalidate()
        except Exception:
            logger.debug("invalidating a connection failed", exc_info=True)

    def _on_loop(self, work: Callable[[], Any]) -> None:
        """Run pool work for async engines on the process's event loop, in a greenlet
        (SQLAlchemy's sync facade over asyncio drivers needs both)."""
        from sqlalchemy.util import greenlet_spawn

        try:
            self.event_loop.run(greenlet_spawn(work))
        except Exception:
            logger.debug("async pool work failed", exc_info=True)

    # --- shutdown -------------------------------------------------------------------------

    def on_process_stop(self, worker: WorkerInfo) -> None:
        with self._lock:
            remaining = list(self._checked_out.values())
        if remaining:
            logger.warning(
                "lifeguard: %d connection(s) still checked out at process shutdown; closing",
                len(remaining),
            )
            for checkout in remaining:
                checkout.record.info[_REASON] = SHUTDOWN
            self._give_back(remaining, None)
        for managed in list(self.engines):
            self._dispose(managed)

    def on_worker_stop(self, worker: WorkerInfo) -> None:
        if not worker.pool.forks:
            return  # on_process_stop disposed them in this very process
        for managed in list(self.engines):
            self._close_in_main_process(managed)

    def _dispose(self, managed: ManagedEngine) -> None:
        try:
            if not managed.is_async:
                managed.engine.dispose()
            elif managed.engine.pool.checkedin():
                self.event_loop.run(managed.async_engine.dispose())
        except Exception:
            logger.debug("disposing %s failed", managed.label, exc_info=True)

    # --- connect arguments: application_name, the PgBouncer profile -----------------------

    def _prepare_connect(self, managed: ManagedEngine, cargs: Any, cparams: dict[str, Any]) -> None:
        """Adjust the connect arguments SQLAlchemy is about to use.

        ``cparams`` is the engine's own dict, reused for every connection: what is set
        here stays, so the application name is rewritten on every connect (a forked
        child has another pid).
        """
        if not managed.is_postgresql:
            return
        driver = str(managed.engine.dialect.driver)
        if managed.user_application_name is None:
            managed.user_application_name = _application_name_given(cargs, cparams)
        options = self.guard.options
        if options.pgbouncer_transaction_mode:
            cparams.update(transaction_mode_connect_args(driver))
        prefix = options.application_name_prefix
        if prefix and not managed.user_application_name:
            name = application_name(prefix)
            if driver == "asyncpg":
                server_settings = dict(cparams.get("server_settings") or {})
                server_settings["application_name"] = name
                cparams["server_settings"] = server_settings
            else:
                cparams["application_name"] = name

    # --- the database, for `lifeguard monitor -A` and `lifeguard doctor -A` --------------

    def monitor_database_url(self) -> str | None:
        """The URL of the first registered PostgreSQL engine (see monitor/target.py)."""
        for managed in self.engines:
            if managed.is_postgresql:
                return libpq_url(managed.engine.url)
        return None

    # --- figures --------------------------------------------------------------------------

    def stats(self) -> dict[str, Any] | None:
        if not self.engines:
            return None
        engines = []
        for managed in self.engines:
            pool = managed.engine.pool
            engines.append(
                {
                    "url": managed.label,
                    "async": managed.is_async,
                    "checked_out": _pool_figure(pool, "checkedout"),
                    "idle": _pool_figure(pool, "checkedin"),
                }
            )
        return {"engines": engines}


def _idle_records(pool: Any) -> list[Any]:
    """The connection records waiting in a QueuePool (sync or asyncio-adapted)."""
    queue = getattr(pool, "_pool", None)
    if queue is None:
        return []
    items = getattr(queue, "queue", None)  # sqlalchemy.util.queue.Queue: a deque
    if items is None:  # AsyncAdaptedQueue wraps an asyncio.Queue, itself over a deque
        items = getattr(getattr(queue, "_queue", None), "_queue", None)
    return list(items or ())


def _pool_figure(pool: Any, name: str) -> int | None:
    method = getattr(pool, name, None)
    return int(method()) if method is not None else None


def _application_name_given(cargs: Any, cparams: dict[str, Any]) -> bool:
    """Whether the application set application_name itself (URL, connect_args, DSN, env)."""
    if os.environ.get("PGAPPNAME"):
        return True
    if "application_name" in cparams:
        return True
    if "application_name" in (cparams.get("server_settings") or {}):
        return True
    texts = [str(value) for value in cparams.values() if isinstance(value, str)]
    texts += [str(value) for value in (cargs or ()) if isinstance(value, str)]
    return any("application_name" in text for text in texts)


_EXPLANATIONS = {
    INHERITED: "it was inherited from the parent process (left untouched for the parent)",
    DISCONNECT: "SQLAlchemy saw it fail (a disconnect error)",
    INVALIDATED: "the application invalidated it",
    LEAKED: "the task left it checked out, unusable",
    SHUTDOWN: "the worker is shutting down",
}


def _explain(reason: str) -> str:
    return pgdriver.explain(reason, _EXPLANATIONS)
