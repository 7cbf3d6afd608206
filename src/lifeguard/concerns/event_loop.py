"""One asyncio event loop per worker process, for ``async def`` tasks and async engines.

Pooled async connections belong to the loop that opened them: with ``asyncio.run()`` per
task, asyncpg fails on the second task and poisons the pool (research note
sqlalchemy_async.md §2.2, E1), so the common advice is a new connection per task, about
10 ms each over TLS against 0.9 ms on a pooled connection kept on one loop (E2). Here
each process that runs tasks gets one loop, created in that process (never inherited
across fork) and closed when the process stops.

* prefork and solo: the loop runs in the task's own thread (``run_until_complete``), so
  a soft time limit, raised by a signal handler in that thread, stops it. The exception
  usually surfaces outside the coroutine (in the selector), leaving it pending with its
  connection checked out: lifeguard cancels it and runs the loop until it has finished
  cleaning up, then re-raises the time-limit error (E11).
* threads pool, and code outside a worker: one loop thread per process; callers submit
  with ``run_coroutine_threadsafe`` and wait. Celery has no time limits in this pool.
* gevent and eventlet: refused. One loop shared by many greenlets can't be driven from
  each of them, and a loop thread would wake greenlets from a foreign OS thread.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import threading
from collections.abc import Coroutine
from typing import Any

from ..errors import ConfigurationError, LifeguardError
from ..hooks import Hook, PoolKind, WorkerInfo
from ..postgres import driver as pgdriver

logger = logging.getLogger("lifeguard.asyncio")


class LoopMode(str, enum.Enum):
    INLINE = "inline"  # run_until_complete in the caller's thread (prefork, solo)
    THREAD = "thread"  # a loop thread; callers wait on a future (threads pool, no worker)


def green_pool_error(pool: PoolKind, tasks: list[str]) -> str:
    shown = ", ".join(tasks[:5]) + (" ..." if len(tasks) > 5 else "")
    return (
        f"async def tasks can't run under the {pool.value} pool ({shown}): lifeguard "
        "runs them on one asyncio event loop per process, which greenlets can't share "
        "soundly. Route these tasks to a queue served by a prefork, solo or threads "
        "worker (celery worker -P prefork -Q <queue>)."
    )


class EventLoop(Hook):
    """The process's event loop: created on first use, closed at process stop."""

    name = "event_loop"

    def __init__(self) -> None:
        self.worker: WorkerInfo | None = None
        self.mode = LoopMode.THREAD
        self._loop: asyncio.AbstractEventLoop | None = None
        self._pid: int | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    # --- worker phases --------------------------------------------------------------------

    def on_worker_start(self, worker: WorkerInfo) -> None:
        self.worker = worker
        if worker.pool.green:
            names = self.async_task_names()
            if names:
                raise ConfigurationError(green_pool_error(worker.pool, names))
        if worker.pool in (PoolKind.PREFORK, PoolKind.SOLO):
            self.mode = LoopMode.INLINE
        else:
            self.mode = LoopMode.THREAD

    def async_task_names(self) -> list[str]:
        tasks = self.guard.app.tasks
        return sorted(
            name for name, task in tasks.items() if getattr(task, "lifeguard_async", False)
        )

    def on_process_start(self, worker: WorkerInfo, forked: bool) -> None:
        if forked:
            with self._lock:
                self._forget_inherited()

    def on_process_stop(self, worker: WorkerInfo) -> None:
        self.close()

    def stats(self) -> dict[str, Any] | None:
        if self._loop is None or self._pid != os.getpid():
            return None
        return {"mode": self.mode.value, "running": not self._loop.is_closed()}

    # --- the loop -------------------------------------------------------------------------

    def _forget_inherited(self) -> None:
        """A loop copied from the parent shares its epoll and self-pipe: never use or
        close it here; keep it alive so no destructor touches those descriptors."""
        if self._loop is not None and self._pid != os.getpid():
            pgdriver.keep_forever(self._loop)
            self._loop = None
            self._thread = None
            self._pid = None

    def loop(self) -> asyncio.AbstractEventLoop:
        """This process's loop, created (and, in thread mode, started) on first use."""
        with self._lock:
            self._forget_inherited()
            if self._loop is None:
                loop = asyncio.new_event_loop()
                self._pid = os.getpid()
                if self.mode is LoopMode.THREAD:
                    ready = threading.Event()
                    thread = threading.Thread(
                        target=_run_forever, args=(loop, ready), name="lifeguard-loop", daemon=True
                    )
                    thread.start()
                    ready.wait()
                    self._thread = thread
                self._loop = loop
            return self._loop

    def run(self, coro: Coroutine[Any, Any, Any]) -> Any:
        """Run a coroutine on this process's loop and return its result.

        Called from the thread that runs a task (never from a coroutine). If an
        exception interrupts the wait (a soft time limit), the coroutine is cancelled
        and given up to ``cancel_timeout`` seconds to finish its cleanup, then the
        exception is re-raised.
        """
        problem = self._cannot_run()
        if problem is not None:
            coro.close()
            raise LifeguardError(problem)
        loop = self.loop()
        if self.mode is LoopMode.THREAD:
            return self._run_threadsafe(loop, coro)
        return self._run_inline(loop, coro)

    def _cannot_run(self) -> str | None:
        if self.worker is not None and self.worker.pool.green:
            return green_pool_error(self.worker.pool, self.async_task_names() or ["this task"])
        if threading.current_thread() is self._thread:
            return "lifeguard's loop.run() was called from the loop's own thread; await instead"
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return None
        return "lifeguard's loop.run() was called inside a running event loop; await instead"

    @property
    def _drain_timeout(self) -> float:
        return float(self.guard.options.cancel_timeout)

    def _run_inline(self, loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any]) -> Any:
        task = loop.create_task(coro)
        try:
            return loop.run_until_complete(task)
        except BaseException as exc:
            if not task.done():
                self._cancel_inline(loop, task, exc)
            raise

    def _cancel_inline(
        self, loop: asyncio.AbstractEventLoop, task: asyncio.Task[Any], exc: BaseException
    ) -> None:
        """Cancel a coroutine the caller gave up on; run the loop until it has cleaned up
        (its connections are then invalidated and returned, E11)."""
        task.cancel()
        try:
            loop.run_until_complete(asyncio.wait([task], timeout=self._drain_timeout))
        except BaseException:
            logger.warning("lifeguard: error while cancelling an async task", exc_info=True)
        if not task.done():
            logger.warning(
                "lifeguard: an async task interrupted by %s did not finish its cleanup within "
                "%.1fs; it goes on in the background",
                type(exc).__name__,
                self._drain_timeout,
            )
        elif not task.cancelled():
            task.exception()  # retrieved: no "exception was never retrieved" warning

    def _run_threadsafe(
        self, loop: asyncio.AbstractEventLoop, coro: Coroutine[Any, Any, Any]
    ) -> Any:
        finished = threading.Event()
        future = asyncio.run_coroutine_threadsafe(_signal_when_done(coro, finished), loop)
        try:
            return future.result()
        except BaseException:
            if not future.done():
                future.cancel()
                if not finished.wait(self._drain_timeout):
                    logger.warning(
                        "lifeguard: a cancelled async task did not finish its cleanup within %.1fs",
                        self._drain_timeout,
                    )
            raise

    def close(self) -> None:
        """Cancel what is left on the loop, let it clean up, and close the loop."""
        with self._lock:
            self._forget_inherited()
            loop, thread = self._loop, self._thread
            self._loop = self._thread = self._pid = None
        if loop is None or loop.is_closed():
            return
        try:
            if thread is not None:
                asyncio.run_coroutine_threadsafe(_shutdown(loop), loop).result(
                    self._drain_timeout + 5
                )
                loop.call_soon_threadsafe(loop.stop)
                thread.join(5)
            elif not loop.is_running():
                loop.run_until_complete(_shutdown(loop))
        except BaseException:
            logger.warning("lifeguard: closing the event loop failed", exc_info=True)
        if not loop.is_running():
            loop.close()


def _run_forever(loop: asyncio.AbstractEventLoop, ready: threading.Event) -> None:
    asyncio.set_event_loop(loop)
    loop.call_soon(ready.set)
    loop.run_forever()


async def _signal_when_done(coro: Coroutine[Any, Any, Any], finished: threading.Event) -> Any:
    try:
        return await coro
    finally:
        finished.set()


async def _shutdown(loop: asyncio.AbstractEventLoop) -> None:
    current = asyncio.current_task()
    pending = [task for task in asyncio.all_tasks(loop) if task is not current]
    for task in pending:
        task.cancel()
    if pending:
        await asyncio.wait(pending, timeout=5)
    await loop.shutdown_asyncgens()
    await loop.shutdown_default_executor()
