"""``async def`` Celery tasks, run on the worker process's one event loop.

Celery (up to 5.7 at least) has no ``async def`` tasks: the coroutine is returned
un-awaited and the task "succeeds" (celery issue #6552). With ``base=AsyncTask`` the
coroutine runs to completion on lifeguard's per-process loop (:mod:`lifeguard.event_loop`),
so async engines and their pools serve every task of the process::

    @app.task(base=lifeguard.AsyncTask)
    async def fetch(user_id): ...

    @lifeguard.async_task(app, soft_time_limit=10)
    async def fetch(user_id): ...
"""

from __future__ import annotations

import inspect
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from celery import Task

from .. import registry
from ..errors import LifeguardError

if TYPE_CHECKING:
    from ..hooks import GuardContext, TaskRun


class AsyncTask(Task):  # type: ignore[misc]  # Celery's Task is untyped
    """Task base class whose ``run`` may be an ``async def``."""

    abstract = True
    #: How :class:`~lifeguard.concerns.event_loop.EventLoop` recognises async tasks.
    lifeguard_async = True

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        # Task.__call__ pushes the request and calls run(); for a coroutine function that
        # only creates the coroutine. It runs here, while the worker's request is current.
        outcome = super().__call__(*args, **kwargs)
        if not inspect.isawaitable(outcome):
            return outcome
        return run_coroutine(self.app, outcome)


def run_coroutine(app: Any, awaitable: Awaitable[Any]) -> Any:
    """Run a task's coroutine on the process's loop, as the current task run."""
    from .event_loop import EventLoop

    guard = registry.lookup(app)
    if guard is None:
        if inspect.iscoroutine(awaitable):
            awaitable.close()
        raise LifeguardError(
            "lifeguard.AsyncTask needs lifeguard on the task's app: call "
            "lifeguard.install(app) in the module that creates the Celery app."
        )
    loop: EventLoop = guard.hook(EventLoop)
    run = guard.lifecycle.current_run()
    return loop.run(_as_task_run(guard, run, awaitable))


async def _as_task_run(guard: GuardContext, run: TaskRun | None, awaitable: Awaitable[Any]) -> Any:
    """The task's coroutine, with the task run current (it may execute on the loop's
    thread) and the task's async sessions closed on the loop when it ends."""
    from .sessions import TaskSessions

    guard.lifecycle.adopt_run(run)
    try:
        return await awaitable
    finally:
        sessions: TaskSessions | None = guard.hook(TaskSessions)
        if sessions is not None and run is not None:
            await sessions.close_async(run)


def async_task(app: Any, **options: Any) -> Callable[[Callable[..., Any]], Any]:
    """``@lifeguard.async_task(app, **options)``: ``app.task(base=AsyncTask, ...)``."""
    options.setdefault("base", AsyncTask)
    decorator: Callable[[Callable[..., Any]], Any] = app.task(**options)
    return decorator
