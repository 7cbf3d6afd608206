"""lifeguard: healthy database connections and memory for Celery workers.

One line in the module that creates the Celery app::

    import lifeguard
    guard = lifeguard.install(app)
"""

from __future__ import annotations

from .concerns.async_task import AsyncTask, async_task
from .concerns.effects import (
    Effect,
    EffectBusy,
    EffectOrphaned,
    current_effect,
    effect,
    effect_async,
    effect_task,
)
from .concerns.once import (
    OnceBlock,
    SingletonBusy,
    SingletonLock,
    once,
    once_async,
    once_task,
    singleton,
    singleton_task,
)
from .errors import ConfigurationError, LifeguardError
from .guard import Lifeguard, current_guard, install
from .hooks import Hook, OutcomeKind, PoolKind, TaskOutcome, TaskRun, WorkerInfo
from .version import __version__

__all__ = [
    "AsyncTask",
    "ConfigurationError",
    "Effect",
    "EffectBusy",
    "EffectOrphaned",
    "Hook",
    "Lifeguard",
    "LifeguardError",
    "OnceBlock",
    "OutcomeKind",
    "PoolKind",
    "SingletonBusy",
    "SingletonLock",
    "TaskOutcome",
    "TaskRun",
    "WorkerInfo",
    "__version__",
    "async_task",
    "current_effect",
    "current_guard",
    "effect",
    "effect_async",
    "effect_task",
    "install",
    "once",
    "once_async",
    "once_task",
    "singleton",
    "singleton_task",
]
