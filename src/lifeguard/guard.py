"""``lifeguard.install(app)`` and the :class:`Lifeguard` it returns."""

from __future__ import annotations

import logging
from typing import Any, TypeVar, cast

from . import registry
from .errors import ConfigurationError
from .hooks import Hook
from .lifecycle import Lifecycle, WorkerStartupError, under_celery_command
from .options import Options, conf_entries
from .stats import Stats

logger = logging.getLogger("lifeguard")

_H = TypeVar("_H", bound=Hook)


class Lifeguard:
    """lifeguard installed on one Celery app: its options, its concerns, its counters."""

    def __init__(self, app: Any, arguments: dict[str, Any]) -> None:
        self.app = app
        self._arguments = dict(arguments)
        # Check install() arguments now, so a typo fails at import, not at worker start.
        self.options = Options.resolve(self._arguments)
        self.counters = Stats()
        self.hooks: list[Hook] = []
        self.lifecycle = Lifecycle(self)
        from .concerns.control import RemoteControl
        from .concerns.database_trouble import DatabaseTrouble
        from .concerns.django import DjangoConnections
        from .concerns.event_loop import EventLoop
        from .concerns.memory import MemoryWatchdog
        from .concerns.metrics import WorkerMetrics
        from .concerns.sessions import TaskSessions
        from .concerns.sqlalchemy import SqlAlchemyEngines

        # Metrics first: hooks leave in reverse order, so its after_task sees every count.
        self.add_hook(WorkerMetrics())
        self.add_hook(RemoteControl())  # lifeguard_processes, for `lifeguard validate`
        self.add_hook(DjangoConnections())
        # Database trouble: hands back tasks that never reached the database, pauses the
        # consumer during an outage, tells the Django concern when slots are scarce.
        self.add_hook(DatabaseTrouble())
        # On the way out hooks run in reverse: sessions close before the leak sweep, and
        # async engines are disposed on the event loop before it closes.
        self.event_loop: EventLoop = self.add_hook(EventLoop())
        self.sqlalchemy: SqlAlchemyEngines = self.add_hook(SqlAlchemyEngines(self.event_loop))
        self.sessions: TaskSessions = self.add_hook(TaskSessions(self.sqlalchemy, self.event_loop))
        from .concerns.result_backend import ResultBackendEngines

        # Celery's db+ result backend: its engines are handed to the SQLAlchemy concern.
        self.add_hook(ResultBackendEngines(self.sqlalchemy))
        # Last in, first out: its task phases sit closest to the task body, so the RSS
        # delta it measures is the task's, not the other concerns' cleanup.
        self.add_hook(MemoryWatchdog())

    def configure(self) -> None:
        """Merge ``lifeguard_*`` keys of ``app.conf`` under the install() arguments.

        Called at worker start, when Celery's configuration is loaded.
        """
        self.options = self.resolve_options()

    def resolve_options(self) -> Options:
        """The install() arguments over the ``lifeguard_*`` keys of ``app.conf``, as a
        worker resolves them at start; raises :class:`ConfigurationError`."""
        entries = conf_entries(self.app.conf, getattr(self.app, "namespace", None))
        from_conf = {name: value for name, (_, value) in entries.items()}
        spelled = {name: key for name, (key, _) in entries.items()}
        return Options.resolve(self._arguments, from_conf, spelled)

    # --- SQLAlchemy and async tasks ------------------------------------------------------

    def add_engine(self, engine: Any) -> Any:
        """Manage a SQLAlchemy ``Engine`` or ``AsyncEngine`` in the worker; returns it.

        Given a function that builds an engine instead, returns a callable that builds
        it on first use and returns that same engine afterwards. See docs/sqlalchemy.md.
        """
        return self.sqlalchemy.add_engine(engine)

    def session(self, engine: Any) -> Any:
        """The current task's ``Session`` (``AsyncSession`` for an ``AsyncEngine``) on
        ``engine``: the same object within a task, rolled back and closed at its end."""
        return self.sessions.session(engine)

    def scoped_session(self, factory: Any) -> Any:
        """A ``scoped_session`` (or ``async_scoped_session``) of ``factory`` whose scope
        is the current task; lifeguard closes and removes it at every task's end."""
        return self.sessions.scoped_session(factory)

    def run_async(self, coro: Any) -> Any:
        """Run a coroutine on this process's event loop from synchronous task code."""
        return self.event_loop.run(coro)

    def add_hook(self, hook: _H) -> _H:
        """Add a concern; it receives every worker phase from now on."""
        hook.bind(self)
        self.hooks.append(hook)
        self.lifecycle.hooks_changed()
        return hook

    def hook(self, kind: type[Hook]) -> Any:
        """The installed hook of this class, or None."""
        for hook in self.hooks:
            if isinstance(hook, kind):
                return hook
        return None

    def stats(self) -> dict[str, Any]:
        """This process's counters, in total and per task name, plus each concern's figures.

        In a prefork worker every child counts for itself: call it from a task to see
        the child that ran the task, or use the metrics exporter for the whole worker.
        """
        snapshot = self.counters.snapshot()
        for hook in self.hooks:
            extra = hook.stats()
            if extra:
                snapshot[hook.name] = extra
        return snapshot


def install(app: Any, **options: Any) -> Lifeguard:
    """Install lifeguard on a Celery app; call once in the module that creates the app.

    Options may be given here or in ``app.conf`` as ``lifeguard_<name>``; see
    :class:`lifeguard.options.Options`. Calling it again with the same options returns
    the same guard.

    A bad option raises :class:`ConfigurationError` (a typo fails at import), except
    while Celery's command line (``celery -A proj worker``) loads the app: there the
    message goes to stderr in one line and the process exits 78, as a worker refused by
    its configuration does, instead of Celery's "Unable to load" and a traceback.
    """
    try:
        return _install(app, options)
    except ConfigurationError as exc:
        if under_celery_command():
            raise WorkerStartupError.report(str(exc)) from None
        raise


def _install(app: Any, options: dict[str, Any]) -> Lifeguard:
    existing = current_guard(app)
    if existing is not None:
        if options and options != existing._arguments:
            raise ConfigurationError(
                "lifeguard.install() was already called for this app with other options; "
                "call it once, in the module that creates the Celery app."
            )
        return existing
    guard = Lifeguard(app, options)
    guard.lifecycle.connect()
    registry.register(app, guard)
    return guard


def current_guard(app: Any = None) -> Lifeguard | None:
    """The guard installed on ``app`` (default: Celery's current app), if any."""
    return cast("Lifeguard | None", registry.lookup(app))
