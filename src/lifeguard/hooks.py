"""The worker phases every lifeguard concern reacts to, and the base class of those concerns.

:mod:`lifeguard.lifecycle` turns Celery's signals into these calls; each concern
(Django connections, SQLAlchemy engines, the event loop, memory, metrics) subclasses
:class:`Hook` and overrides only the phases it needs. The order of a worker's life:

``on_worker_start`` (MainProcess, once) -> ``on_consumer_ready`` (MainProcess, when
the consumer is up) and ``on_process_start`` (each process that runs
tasks: a prefork child right after fork, or the worker process itself for the threads,
gevent, eventlet and solo pools) -> for every task, ``before_task``,
``before_result_stored`` and ``after_task`` in the thread or greenlet that runs it ->
``on_process_stop`` -> ``on_worker_stop``.
"""

from __future__ import annotations

import enum
import os
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

if TYPE_CHECKING:
    import logging

    from .options import Options
    from .stats import Stats


class PoolKind(str, enum.Enum):
    PREFORK = "prefork"
    THREADS = "threads"
    GEVENT = "gevent"
    EVENTLET = "eventlet"
    SOLO = "solo"
    OTHER = "other"

    @property
    def forks(self) -> bool:
        """Tasks run in child processes forked from the MainProcess."""
        return self is PoolKind.PREFORK

    @property
    def green(self) -> bool:
        """Tasks run in greenlets: thread-locals (Django connections) are per greenlet."""
        return self in (PoolKind.GEVENT, PoolKind.EVENTLET)

    @classmethod
    def from_pool_cls(cls, pool_cls: Any) -> PoolKind:
        """Classify Celery's ``WorkController.pool_cls`` (an alias or a class)."""
        if isinstance(pool_cls, str):
            text = pool_cls.lower()
        else:
            text = f"{getattr(pool_cls, '__module__', '')}.{getattr(pool_cls, '__name__', '')}"
            text = text.lower()
        if "prefork" in text or text in ("processes", "default"):
            return cls.PREFORK
        if "thread" in text:
            return cls.THREADS
        if "gevent" in text:
            return cls.GEVENT
        if "eventlet" in text:
            return cls.EVENTLET
        if "solo" in text:
            return cls.SOLO
        return cls.OTHER


@dataclass(frozen=True)
class WorkerInfo:
    """What lifeguard knows about the worker it runs in."""

    hostname: str  # Celery's node name, e.g. "celery@web-1"
    pool: PoolKind
    concurrency: int | None
    main_pid: int

    @property
    def is_main_process(self) -> bool:
        return os.getpid() == self.main_pid


class OutcomeKind(str, enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    RETRY = "retry"
    SOFT_TIME_LIMIT = "soft_time_limit"
    REVOKED = "revoked"
    OTHER = "other"  # ignored, rejected


@dataclass(frozen=True)
class TaskOutcome:
    """How a task ended, as seen in the process that ran it."""

    state: str | None  # Celery's state: SUCCESS, FAILURE, RETRY, ...
    exception: BaseException | None = None

    @property
    def kind(self) -> OutcomeKind:
        from celery.exceptions import SoftTimeLimitExceeded

        if isinstance(self.exception, SoftTimeLimitExceeded):
            return OutcomeKind.SOFT_TIME_LIMIT
        if self.state == "SUCCESS":
            return OutcomeKind.SUCCESS
        if self.state == "RETRY":
            return OutcomeKind.RETRY
        if self.state == "REVOKED":
            return OutcomeKind.REVOKED
        if self.state == "FAILURE":
            return OutcomeKind.FAILURE
        return OutcomeKind.OTHER


@dataclass(eq=False)
class TaskRun:
    """One execution of a task in this process; hooks may keep per-run state in ``scratch``."""

    id: str
    name: str
    unit: Any  # the thread or greenlet running it
    started: float = field(default_factory=time.monotonic)
    exception: BaseException | None = None
    scratch: dict[str, Any] = field(default_factory=dict)


class RunTracker(Protocol):
    """What a concern may ask the lifecycle: where it runs and which task is current.

    :class:`lifeguard.lifecycle.Lifecycle` is the implementation; concerns see only this.
    """

    worker: WorkerInfo | None

    @property
    def in_task_process(self) -> bool: ...

    @property
    def recycle_requested(self) -> bool: ...

    def current_unit(self) -> Any: ...

    def unit_alive(self, unit: Any) -> bool: ...

    def current_run(self) -> TaskRun | None: ...

    def adopt_run(self, run: TaskRun | None) -> None: ...

    def active_runs(self) -> list[TaskRun]: ...

    def announce(self, log: logging.Logger, level: int, message: str, *args: Any) -> None: ...

    def prepare_recycling(self) -> None: ...

    def request_recycle(self, reason: str) -> str | None: ...


class GuardContext(Protocol):
    """What a concern receives in :meth:`Hook.bind`: the app, the options, the counters,
    the lifecycle and its sibling concerns. :class:`lifeguard.guard.Lifeguard` (which
    composes the concerns) provides it; concerns never import the module that composes
    them."""

    app: Any
    options: Options
    counters: Stats
    hooks: list[Hook]

    @property
    def lifecycle(self) -> RunTracker: ...

    def hook(self, kind: type[Hook]) -> Any: ...

    def stats(self) -> dict[str, Any]: ...


class Hook:
    """One concern of lifeguard. Every phase does nothing by default.

    Hooks must not raise from task phases: the lifecycle logs and counts any error,
    and the task goes on as if lifeguard weren't there. A :class:`ConfigurationError`
    raised from ``on_worker_start`` stops the worker with its message.
    """

    #: Short name used in logs and as the key of this hook's section in ``guard.stats()``.
    name = "hook"

    def bind(self, guard: GuardContext) -> None:
        """Called once when the hook is added to a guard."""
        self.guard = guard

    def on_worker_start(self, worker: WorkerInfo) -> None:
        """The worker's MainProcess is starting (``worker_init``)."""

    def on_process_start(self, worker: WorkerInfo, forked: bool) -> None:
        """A process that will run tasks is ready; ``forked`` for a prefork child."""

    def on_consumer_ready(self, consumer: Any) -> None:
        """The MainProcess's consumer is consuming (``worker_ready``); ``consumer`` is
        Celery's ``Consumer``: change it only through ``consumer.call_soon``."""

    def before_task(self, run: TaskRun) -> None:
        """A task is about to run, in the thread or greenlet that runs it."""

    def before_result_stored(self, run: TaskRun, backend: Any) -> None:
        """The task's body has ended and ``backend`` is about to store its outcome.

        Celery stores a task's result before any signal tells of the outcome, so this is
        the last moment to make the store independent of what the task left behind (a
        transaction left open on the connection the backend writes through).
        """

    def watches_result_store(self, backend_class: type) -> bool:
        """Whether :meth:`before_result_stored` has anything to do for backends of this
        class; when no hook does, the task's backend is left unwrapped (and, under green
        pools, where Celery makes one backend per greenlet, untouched before the store)."""
        return True

    def after_task(self, run: TaskRun, outcome: TaskOutcome) -> None:
        """A task has finished and its result is stored."""

    def on_process_stop(self, worker: WorkerInfo) -> None:
        """The process that ran tasks is shutting down."""

    def on_worker_stop(self, worker: WorkerInfo) -> None:
        """The worker's MainProcess is shutting down."""

    def stats(self) -> dict[str, Any] | None:
        """This hook's own figures for ``guard.stats()``, or None."""
        return None


def unit_label(unit: Any) -> str:
    """A thread or greenlet (:meth:`Lifecycle.current_unit`) as log lines name it."""
    name = getattr(unit, "name", None)
    kind = "greenlet" if hasattr(unit, "dead") else "thread"  # gevent's greenlets have names
    if name:
        return f"{kind} {name!r}"
    return f"{kind} {type(unit).__name__} at {id(unit):#x}"  # eventlet's have none
