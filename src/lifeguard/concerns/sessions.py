"""Task-scoped SQLAlchemy sessions: one per task, rolled back and closed when it ends.

The usual pattern, a ``scoped_session`` removed in a ``task_postrun`` receiver, fails
exactly when it matters: after a soft time limit ``remove()`` raises (the rollback meets
a busy connection) before it clears the registry, and with a pool of one every later
task of that process fails (research note sqlalchemy_async.md §1.3, E4). Here:

* ``guard.session(engine)`` is the current task's Session (AsyncSession for an
  AsyncEngine), the same object for every call within the task;
* ``guard.scoped_session(factory)`` is a regular ``scoped_session`` (or
  ``async_scoped_session``) whose scope is the current task;
* at task end, after any busy connection of the task was cancelled and invalidated,
  every session of the task is closed (an error is logged, never raised, and the
  session is invalidated instead) and always removed from its registry. Whatever the
  task did not commit is rolled back.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Hashable
from typing import TYPE_CHECKING, Any

from ..hooks import Hook, TaskOutcome, TaskRun, WorkerInfo

if TYPE_CHECKING:
    from .event_loop import EventLoop
    from .sqlalchemy import SqlAlchemyEngines

logger = logging.getLogger("lifeguard.sqlalchemy")


class TaskSessions(Hook):
    """Registries of task-scoped sessions; closes each task's sessions at its end."""

    name = "sqlalchemy_sessions"

    def __init__(self, engines: SqlAlchemyEngines, event_loop: EventLoop) -> None:
        self.engines = engines
        self.event_loop = event_loop
        self._registries: list[tuple[Any, bool]] = []  # (scoped session, is_async)
        self._per_engine: dict[int, Any] = {}
        self._lock = threading.Lock()

    # --- the API ------------------------------------------------------------------------

    def scoped_session(self, factory: Any) -> Any:
        """A ``scoped_session`` (``async_scoped_session`` for an ``async_sessionmaker``)
        scoped to the current task and cleaned up by lifeguard at the task's end."""
        from sqlalchemy.orm import scoped_session

        try:  # needs greenlet, optional since SQLAlchemy 2.1; without it nothing is async
            from sqlalchemy.ext.asyncio import async_scoped_session, async_sessionmaker
        except ImportError:
            is_async = False
        else:
            is_async = isinstance(factory, async_sessionmaker)
        scoped: Any
        if is_async:
            scoped = async_scoped_session(factory, scopefunc=self._scope)
        else:
            scoped = scoped_session(factory, scopefunc=self._scope)
        with self._lock:
            self._registries.append((scoped, is_async))
        return scoped

    def session(self, engine: Any) -> Any:
        """The current task's session on ``engine`` (registered with the guard if needed)."""
        from sqlalchemy.orm import sessionmaker

        engine = engine() if callable(engine) and not hasattr(engine, "dialect") else engine
        managed = self.engines.register(engine)
        key = id(managed.engine)
        scoped = self._per_engine.get(key)
        if scoped is None:
            factory: Any
            if managed.is_async:  # sqlalchemy.ext.asyncio needs greenlet: only when async
                from sqlalchemy.ext.asyncio import async_sessionmaker

                factory = async_sessionmaker(engine)
            else:
                factory = sessionmaker(bind=engine)
            scoped = self._per_engine.setdefault(key, self.scoped_session(factory))
        return scoped()

    def _scope(self) -> Hashable:
        run = self.guard.lifecycle.current_run()
        return run if run is not None else ("thread", threading.get_ident())

    # --- task end ---------------------------------------------------------------------------

    def _take(self, run: TaskRun, want_async: bool) -> list[Any]:
        """Remove the run's sessions from every registry (they are closed next)."""
        with self._lock:
            registries = list(self._registries)
        taken = []
        for scoped, is_async in registries:
            if is_async is want_async:
                session = scoped.registry.registry.pop(run, None)
                if session is not None:
                    taken.append(session)
        return taken

    def after_task(self, run: TaskRun, outcome: TaskOutcome) -> None:
        sessions = self._take(run, want_async=False)
        if sessions:
            self.engines.discard_interrupted(run)
        for session in sessions:
            self._close(session, run)
        if self._has_async_sessions(run):
            self.event_loop.run(self.close_async(run))

    def _has_async_sessions(self, run: TaskRun) -> bool:
        return any(
            run in scoped.registry.registry for scoped, is_async in self._registries if is_async
        )

    def _close(self, session: Any, run: TaskRun) -> None:
        try:
            session.close()
        except Exception as exc:
            logger.warning(
                "lifeguard: closing the session of task %s failed (%s); invalidated it",
                run.name,
                exc,
            )
            try:
                session.invalidate()
            except Exception:
                logger.debug("invalidating the session failed", exc_info=True)

    async def close_async(self, run: TaskRun) -> None:
        """Close the run's async sessions; awaited on the loop when an async task ends."""
        for session in self._take(run, want_async=True):
            try:
                await session.close()
            except Exception as exc:
                logger.warning(
                    "lifeguard: closing the async session of task %s failed (%s); invalidated it",
                    run.name,
                    exc,
                )
                try:
                    await session.invalidate()
                except Exception:
                    logger.debug("invalidating the async session failed", exc_info=True)

    def on_process_start(self, worker: WorkerInfo, forked: bool) -> None:
        if forked:  # sessions of the parent's threads: not ours to close
            for scoped, _ in self._registries:
                scoped.registry.registry.clear()
