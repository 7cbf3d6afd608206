"""Celery's SQLAlchemy result backend (``result_backend = "db+postgresql://..."``).

Celery's ``SessionManager`` builds its own engines: in a prefork child (``forked``) one
pooled engine per URL, kept in ``_engines``; elsewhere a ``NullPool`` engine per session.
Left alone, the child's connections carry no ``application_name`` and are never closed:
every child exit leaves an abandoned session on the server.

This concern hands each pooled engine the session manager creates to the SQLAlchemy
concern (:class:`~lifeguard.concerns.sqlalchemy.SqlAlchemyEngines`), which then names its
connections, forgets them after fork without touching the parent's sockets, checks them
before reuse and disposes of them when the process stops. Nothing is created earlier
than Celery would: the backend class is looked up at worker start without instantiating
it, and each backend instance (Celery keeps one per thread) is taken over in the task's
thread, just before the task that will use it. In a solo worker the session manager is
told to keep its engines, so result connections are reused across tasks instead of
opened for every store.
"""

from __future__ import annotations

import logging
import threading
import weakref
from typing import TYPE_CHECKING, Any

from ..hooks import Hook, PoolKind, TaskRun, WorkerInfo

if TYPE_CHECKING:
    from .sqlalchemy import SqlAlchemyEngines

logger = logging.getLogger("lifeguard.result_backend")

_MARK = "_lifeguard_result_backend"  # set on a SessionManager once it is taken over


def _database_backend_class() -> type[Any] | None:
    try:
        from celery.backends.database import DatabaseBackend
    except Exception:  # SQLAlchemy missing: nobody can use the backend either
        return None
    return DatabaseBackend  # type: ignore[no-any-return]


def configured_backend_class(app: Any) -> type[Any] | None:
    """The class of ``app``'s result backend, found without instantiating it."""
    from celery.app import backends

    spec = getattr(app, "backend_cls", None) or app.conf.result_backend
    if not spec:
        return None
    try:
        cls, _url = backends.by_url(spec, app.loader)
    except Exception:
        logger.debug("could not resolve the result backend %r", spec, exc_info=True)
        return None
    return cls if isinstance(cls, type) else None


class ResultBackendEngines(Hook):
    """The ``db+...`` result backend concern: one instance per guard."""

    name = "result_backend"

    def __init__(self, sqlalchemy: SqlAlchemyEngines) -> None:
        self.sqlalchemy = sqlalchemy
        self.enabled = False
        self.keep_engines = False  # tell the session manager to pool (solo)
        self._managers: weakref.WeakSet[Any] = weakref.WeakSet()
        self._registered: weakref.WeakSet[Any] = weakref.WeakSet()
        self._lock = threading.Lock()

    def on_worker_start(self, worker: WorkerInfo) -> None:
        database_backend = _database_backend_class()
        cls = configured_backend_class(self.guard.app)
        if database_backend is None or cls is None or not issubclass(cls, database_backend):
            return
        self.enabled = True
        # Celery keeps one backend per thread (per greenlet under gevent/eventlet, hence
        # per task), so only the solo pool, where every task runs on one thread, has its
        # engines kept; the threads and green pools keep Celery's NullPool.
        self.keep_engines = worker.pool is PoolKind.SOLO
        self.guard.lifecycle.announce(
            logger,
            logging.INFO,
            "lifeguard: managing the engines of the SQLAlchemy result backend (%s)",
            "pooled per process" if worker.pool.forks or self.keep_engines else "NullPool",
        )

    def on_process_start(self, worker: WorkerInfo, forked: bool) -> None:
        if forked:
            self._managers = weakref.WeakSet()

    def before_task(self, run: TaskRun) -> None:
        if not self.enabled:
            return
        task = self.guard.app.tasks.get(run.name)
        backend = getattr(task, "backend", None) if task is not None else None
        database_backend = _database_backend_class()
        if backend is None or database_backend is None or not isinstance(backend, database_backend):
            return
        manager = getattr(backend, "session_manager", None)
        if manager is not None and manager not in self._managers:
            self._take_over(manager)

    def _take_over(self, manager: Any) -> None:
        """Register the manager's pooled engines now and whenever it creates one."""
        with self._lock:
            if manager in self._managers:
                return
            self._managers.add(manager)
        if self.keep_engines and not manager.forked:
            manager.forked = True  # Celery's switch for "keep one pooled engine per URL"
        for engine in list(getattr(manager, "_engines", {}).values()):
            self._register(engine)
        if getattr(manager, _MARK, False):
            return  # wrapped already (inherited from the parent): engines still register
        original = manager.get_engine

        def get_engine(dburi: Any, **kwargs: Any) -> Any:
            engine = original(dburi, **kwargs)
            if getattr(manager, "_engines", {}).get(dburi) is engine:
                self._register(engine)
            return engine

        manager.get_engine = get_engine
        setattr(manager, _MARK, True)

    def _register(self, engine: Any) -> None:
        if engine in self._registered:
            return
        self.sqlalchemy.register(engine)
        self._registered.add(engine)
