"""``lifeguard.install(app)`` and the :class:`Lifeguard` it returns."""

from __future__ import annotations

import logging
import weakref
from typing import Any

from .hooks import Hook
from .lifecycle import Lifecycle
from .options import Options, options_from_conf
from .stats import Stats

logger = logging.getLogger("lifeguard")

_guards: weakref.WeakKeyDictionary[Any, Lifeguard] = weakref.WeakKeyDictionary()


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
        from .django_connections import DjangoConnections
        from .memory import MemoryWatchdog
        from .metrics import WorkerMetrics

        # Metrics first: hooks leave in reverse order, so its after_task sees every count.
        self.add_hook(WorkerMetrics())
        self.add_hook(DjangoConnections())
        # Last in, first out: its task phases sit closest to the task body, so the RSS
        # delta it measures is the task's, not the other concerns' cleanup.
        self.add_hook(MemoryWatchdog())

    def configure(self) -> None:
        """Merge ``lifeguard_*`` keys of ``app.conf`` under the install() arguments.

        Called at worker start, when Celery's configuration is loaded.
        """
        conf = self.app.conf
        from_conf = options_from_conf(conf, getattr(self.app, "namespace", None))
        self.options = Options.resolve(self._arguments, from_conf)

    def add_hook(self, hook: Hook) -> Hook:
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
    """
    from .errors import ConfigurationError

    existing = _guards.get(app)
    if existing is not None:
        if options and options != existing._arguments:
            raise ConfigurationError(
                "lifeguard.install() was already called for this app with other options; "
                "call it once, in the module that creates the Celery app."
            )
        return existing
    guard = Lifeguard(app, options)
    guard.lifecycle.connect()
    _guards[app] = guard
    return guard


def current_guard(app: Any = None) -> Lifeguard | None:
    """The guard installed on ``app`` (default: Celery's current app), if any."""
    if app is None:
        from celery import current_app

        app = current_app._get_current_object()
    return _guards.get(app)
