"""lifeguard: healthy database connections and memory for Celery workers.

One line in the module that creates the Celery app::

    import lifeguard
    guard = lifeguard.install(app)
"""

from __future__ import annotations

from .errors import ConfigurationError, LifeguardError
from .guard import Lifeguard, current_guard, install
from .hooks import Hook, OutcomeKind, PoolKind, TaskOutcome, TaskRun, WorkerInfo

__version__ = "0.1.0"

__all__ = [
    "ConfigurationError",
    "Hook",
    "Lifeguard",
    "LifeguardError",
    "OutcomeKind",
    "PoolKind",
    "TaskOutcome",
    "TaskRun",
    "WorkerInfo",
    "__version__",
    "current_guard",
    "install",
]
