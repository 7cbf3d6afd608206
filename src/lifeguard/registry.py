"""Which guard is installed on which Celery app: a lookup every layer may import.

:func:`lifeguard.install` registers the guard it builds; code that runs inside a task
without a reference to the guard (``AsyncTask``, the remote-control command) finds it
here, so no concern imports the module that composes it.
"""

from __future__ import annotations

import weakref
from typing import Any

from .hooks import GuardContext

_guards: weakref.WeakKeyDictionary[Any, GuardContext] = weakref.WeakKeyDictionary()


def register(app: Any, guard: GuardContext) -> None:
    _guards[app] = guard


def lookup(app: Any = None) -> GuardContext | None:
    """The guard installed on ``app`` (default: Celery's current app), if any."""
    if app is None:
        from celery import current_app

        app = current_app._get_current_object()
    return _guards.get(app)
