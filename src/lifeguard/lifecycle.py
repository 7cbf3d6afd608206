"""The only module that listens to Celery's signals: it turns them into worker phases.

=====================================  ==========================================
Celery signal                          phase (see :mod:`lifeguard.hooks`)
=====================================  ==========================================
``worker_init`` (MainProcess)          ``on_worker_start``; for pools that don't
                                       fork, also ``on_process_start``
``worker_process_init`` (prefork       ``on_process_start(forked=True)``
child)
``task_prerun``                        ``before_task``
backend ``mark_as_*`` (done, failure,  ``before_result_stored`` (not a signal:
retry)                                 Celery stores, then signals the outcome)
``task_failure`` / ``task_retry``      remembered for the outcome
``task_postrun``                       ``after_task(outcome)``
``worker_process_shutdown``            ``on_process_stop`` (prefork child)
``worker_shutdown`` (MainProcess)      ``on_process_stop`` (pools that don't fork),
                                       then ``on_worker_stop``
``worker_ready`` (MainProcess)         log what ``on_worker_start`` announced,
                                       then ``on_consumer_ready(consumer)``
=====================================  ==========================================

A hook may ask for the process that runs tasks to be replaced between tasks
(:meth:`Lifecycle.request_recycle`, prepared by :meth:`Lifecycle.prepare_recycling`);
:mod:`lifeguard.recycle` explains why that loses no task on each pool.

Eager tasks (``task.apply()``, ``task_always_eager``) are left alone, as Celery's own
Django fixup does. Hooks run in registration order on the way in and in reverse order
on the way out. An exception from a hook is logged and counted, never raised into the
task: lifeguard must not make a task fail.
"""

from __future__ import annotations

import contextvars
import logging
import os
import sys
import threading
from typing import Any, Protocol

from celery import signals

from . import recycle, stats
from .errors import ConfigurationError
from .hooks import GuardContext, Hook, PoolKind, TaskOutcome, TaskRun, WorkerInfo

logger = logging.getLogger("lifeguard")

_STORE_WATCHED = "_lifeguard_store_watched"  # on a backend whose mark_as_* are wrapped


class WorkerStartupError(SystemExit):
    """Stops ``celery worker`` at start with lifeguard's message (exit status 78, EX_CONFIG).

    Celery swallows ordinary exceptions raised by signal receivers, so a configuration
    error found at worker start has to leave as a ``SystemExit``.
    """

    def __init__(self, message: str) -> None:
        super().__init__(78)
        self.message = message

    @classmethod
    def report(cls, message: str) -> WorkerStartupError:
        """The error, its message written to stderr now in one line: used before
        Celery's logging exists (while the app is imported), when nothing else would
        show it (a ``SystemExit`` prints nothing)."""
        sys.stderr.write(f"lifeguard: {' '.join(message.split())}\n")
        sys.stderr.flush()
        return cls(message)


def under_celery_command() -> bool:
    """True while Celery's command line (``celery -A proj worker``, ``beat``...) runs,
    e.g. while it imports the app: its click context is the current one."""
    cli = sys.modules.get("celery.bin.celery")
    group = getattr(cli, "celery", None)
    if group is None:
        return False
    import click

    ctx = click.get_current_context(silent=True)
    while ctx is not None:
        if ctx.command is group:
            return True
        ctx = ctx.parent
    return False


def _unwrap(app: Any) -> Any:
    getter = getattr(app, "_get_current_object", None)
    return getter() if getter is not None else app


class Composer(GuardContext, Protocol):
    """The guard as the lifecycle sees it: the concerns' context, plus the resolution
    of ``app.conf`` options once the worker's configuration is loaded."""

    def configure(self) -> None: ...


class Lifecycle:
    """Connects one guard (:class:`lifeguard.guard.Lifeguard`) to Celery's signals."""

    def __init__(self, guard: Composer) -> None:
        self.guard = guard
        self.worker: WorkerInfo | None = None
        self._process_pid: int | None = None
        self._local = threading.local()
        # The run of an async task's coroutine, which may execute on the loop's thread.
        self._context_run: contextvars.ContextVar[TaskRun | None] = contextvars.ContextVar(
            f"lifeguard_run_{id(guard)}", default=None
        )
        self._runs: dict[int, TaskRun] = {}
        self._runs_lock = threading.Lock()
        self._uid = f"lifeguard-{id(guard)}"
        self._implementers: dict[str, list[Hook]] = {}
        # Task name -> whether a hook watches its backend's result store (see
        # _watch_result_store): one look at the backend per task name, not per task.
        self._store_watched: dict[str, bool] = {}
        self._announcements: list[tuple[logging.Logger, int, str, tuple[Any, ...]]] | None = []
        self._recycling = False
        self._exit: recycle.ProcessExit | None = None

    # --- wiring --------------------------------------------------------------------

    _RECEIVERS = (
        ("worker_init", "_on_worker_init"),
        ("worker_process_init", "_on_worker_process_init"),
        ("task_prerun", "_on_task_prerun"),
        ("task_failure", "_on_task_failure"),
        ("task_retry", "_on_task_retry"),
        ("task_postrun", "_on_task_postrun"),
        ("worker_process_shutdown", "_on_worker_process_shutdown"),
        ("worker_shutdown", "_on_worker_shutdown"),
        ("worker_ready", "_on_worker_ready"),
    )

    def connect(self) -> None:
        for signal_name, method in self._RECEIVERS:
            getattr(signals, signal_name).connect(
                getattr(self, method), weak=False, dispatch_uid=(self._uid, signal_name)
            )

    def disconnect(self) -> None:
        for signal_name, method in self._RECEIVERS:
            getattr(signals, signal_name).disconnect(
                getattr(self, method), dispatch_uid=(self._uid, signal_name)
            )

    # --- where we are ----------------------------------------------------------------

    @property
    def in_task_process(self) -> bool:
        """True in a process where ``on_process_start`` ran (and ``on_process_stop`` not yet)."""
        return self._process_pid == os.getpid()

    def current_unit(self) -> Any:
        """The thread, or under gevent/eventlet the greenlet, running this code."""
        if self.worker is not None and self.worker.pool.green:
            import greenlet

            return greenlet.getcurrent()
        return threading.current_thread()

    @staticmethod
    def unit_alive(unit: Any) -> bool:
        if hasattr(unit, "dead"):  # a greenlet
            return not unit.dead
        return bool(unit.is_alive())

    def current_run(self) -> TaskRun | None:
        """The task running in this thread or greenlet (or this asyncio task), if any."""
        run: TaskRun | None = getattr(self._local, "run", None)
        return run if run is not None else self._context_run.get()

    def adopt_run(self, run: TaskRun | None) -> None:
        """Make ``run`` current in this context: called by an async task's coroutine,
        which may run on the event loop's thread rather than the task's."""
        self._context_run.set(run)

    def active_runs(self) -> list[TaskRun]:
        """Every task running in this process now (several under threads/gevent)."""
        with self._runs_lock:
            return list(self._runs.values())

    def announce(self, log: logging.Logger, level: int, message: str, *args: Any) -> None:
        """Log a worker-start message once Celery's logging is set up.

        ``worker_init`` comes before Celery configures logging, so messages from
        ``on_worker_start`` are held until the worker is ready.
        """
        if self._announcements is None:
            log.log(level, message, *args)
        else:
            self._announcements.append((log, level, message, args))

    # --- recycling --------------------------------------------------------------------

    def prepare_recycling(self) -> None:
        """Call from ``on_worker_start`` if the hook may call :meth:`request_recycle`.

        Each process that runs tasks then gets its exit mechanism when it starts (a
        prefork child must get it before billiard's loop starts). Without a call, no
        process is touched.
        """
        self._recycling = True

    def request_recycle(self, reason: str) -> str | None:
        """Have this process replaced once the task now ending is handed over.

        Call from ``after_task``: on prefork the child exits after its result reached
        the MainProcess and the pool forks another; on the other pools the worker does
        a warm shutdown. Returns what will happen, for the caller's log line, or None
        if a recycle was already requested.
        """
        if self._exit is None:
            raise RuntimeError("request_recycle() needs prepare_recycling() at worker start")
        if self._exit.requested:
            return None
        self._exit.request()
        run = self.current_run()
        self.guard.counters.incr(
            stats.RECYCLES, task=run.name if run is not None else None, reason=reason
        )
        return self._exit.outcome

    @property
    def recycle_requested(self) -> bool:
        return self._exit is not None and self._exit.requested

    # --- phases ----------------------------------------------------------------------

    def hooks_changed(self) -> None:
        self._implementers.clear()
        self._store_watched.clear()

    def _hooks_for(self, phase: str) -> list[Hook]:
        """The hooks that override ``phase``, in order: the others are not even called."""
        hooks = self._implementers.get(phase)
        if hooks is None:
            base = getattr(Hook, phase)
            hooks = [h for h in self.guard.hooks if getattr(type(h), phase) is not base]
            self._implementers[phase] = hooks
        return hooks

    def _run(self, phase: str, *args: Any, reverse: bool = False) -> None:
        """Call ``phase`` on every hook that has it; log and count errors, never raise."""
        hooks = self._hooks_for(phase)
        for hook in reversed(hooks) if reverse else hooks:
            try:
                getattr(hook, phase)(*args)
            except Exception:
                logger.exception(
                    "lifeguard: %s.%s failed; the task is not affected", hook.name, phase
                )
                self.guard.counters.incr(stats.HOOK_ERRORS, reason=f"{hook.name}.{phase}")

    def _start_worker(self, worker: WorkerInfo) -> None:
        self.worker = worker
        try:
            self.guard.configure()
            for hook in self.guard.hooks:
                hook.on_worker_start(worker)
        except ConfigurationError as exc:
            logger.critical("lifeguard: %s", exc)
            raise WorkerStartupError(str(exc)) from exc
        if not worker.pool.forks:
            self._start_process(forked=False)

    def _start_process(self, forked: bool, *, during_task: bool = False) -> None:
        assert self.worker is not None
        pid = os.getpid()
        if self._process_pid == pid:
            return
        self._process_pid = pid
        self._local = threading.local()
        with self._runs_lock:
            self._runs.clear()
        if forked:
            self.guard.counters.reset()
        self._exit = None
        if self._recycling:
            self._exit = recycle.for_process(
                forked, self.guard.options.recycle_exit_code, too_late=during_task
            )
        self._run("on_process_start", self.worker, forked)

    def _stop_process(self) -> None:
        if not self.in_task_process or self.worker is None:
            return
        self._run("on_process_stop", self.worker, reverse=True)
        self._process_pid = None

    # --- receivers -------------------------------------------------------------------

    def _on_worker_init(self, sender: Any = None, **_: Any) -> None:
        if sender is None or _unwrap(getattr(sender, "app", None)) is not _unwrap(self.guard.app):
            return
        concurrency = getattr(sender, "concurrency", None)
        worker = WorkerInfo(
            hostname=str(getattr(sender, "hostname", "") or ""),
            pool=PoolKind.from_pool_cls(getattr(sender, "pool_cls", "")),
            concurrency=concurrency if isinstance(concurrency, int) else None,
            main_pid=os.getpid(),
        )
        self._start_worker(worker)

    def _on_worker_process_init(self, sender: Any = None, **_: Any) -> None:
        if self.worker is None:
            return  # not a worker of our app
        self._start_process(forked=os.getpid() != self.worker.main_pid)

    def _on_task_prerun(self, sender: Any = None, task_id: str = "", **_: Any) -> None:
        if self.worker is None or sender is None:
            return
        if getattr(sender.request, "is_eager", False):
            return
        if not self.in_task_process:
            # A pool that forked without telling us (no worker_process_init).
            self._start_process(forked=os.getpid() != self.worker.main_pid, during_task=True)
        unit = self.current_unit()
        run = TaskRun(id=task_id, name=sender.name, unit=unit)
        self._local.run = run
        with self._runs_lock:
            self._runs[id(unit)] = run
        self.guard.counters.incr(stats.TASKS, task=run.name)
        self._run("before_task", run)
        self._watch_result_store(sender)

    def _watch_result_store(self, task: Any) -> None:
        """Run ``before_result_stored`` when ``task``'s backend stores the task's outcome.

        Celery's tracer stores the outcome (``mark_as_done``, ``mark_as_failure``,
        ``mark_as_retry``) before ``task_success``/``task_failure``/``task_postrun``, so
        the backend instance the task uses (Celery keeps one per thread) gets
        pass-through methods, once. ``update_state()`` from the body is not an outcome
        and goes straight to ``store_result``: the phase never runs mid-task.
        """
        hooks = self._hooks_for("before_result_stored")
        if not hooks:
            return
        watched = self._store_watched.get(task.name)
        if watched is False:
            return
        try:
            backend = task.backend
            if watched is None:
                watched = any(hook.watches_result_store(type(backend)) for hook in hooks)
                self._store_watched[task.name] = watched
                if not watched:
                    return
            state = getattr(backend, "__dict__", None)
            if state is None or state.get(_STORE_WATCHED) == self._uid:
                return
            for name in ("mark_as_done", "mark_as_failure", "mark_as_retry"):
                setattr(backend, name, self._before_store(backend, getattr(backend, name)))
            state[_STORE_WATCHED] = self._uid
        except Exception:
            logger.exception("lifeguard: watching the result backend failed; tasks are unaffected")
            self.guard.counters.incr(stats.HOOK_ERRORS, reason="lifecycle.before_result_stored")

    def _before_store(self, backend: Any, original: Any) -> Any:
        def mark_as(task_id: str, *args: Any, **kwargs: Any) -> Any:
            run = self.current_run()
            if run is not None and run.id == task_id:
                self._run("before_result_stored", run, backend)
            return original(task_id, *args, **kwargs)

        return mark_as

    def _on_task_failure(
        self,
        sender: Any = None,
        task_id: str = "",
        exception: BaseException | None = None,
        **_: Any,
    ) -> None:
        run = self.current_run()
        if run is not None and run.id == task_id:
            run.exception = exception

    def _on_task_retry(self, sender: Any = None, reason: Any = None, **_: Any) -> None:
        run = self.current_run()
        if run is not None:
            run.exception = getattr(reason, "exc", None) or reason

    def _on_task_postrun(
        self, sender: Any = None, task_id: str = "", state: str | None = None, **_: Any
    ) -> None:
        run = self.current_run()
        if run is None or run.id != task_id:
            return
        outcome = TaskOutcome(state=state, exception=run.exception)
        try:
            self._run("after_task", run, outcome, reverse=True)
        finally:
            self._local.run = None
            with self._runs_lock:
                self._runs.pop(id(run.unit), None)

    def _on_worker_ready(self, sender: Any = None, **_: Any) -> None:
        pending, self._announcements = self._announcements or [], None
        for log, level, message, args in pending:
            log.log(level, message, *args)
        if self.worker is not None and self.worker.is_main_process and sender is not None:
            self._run("on_consumer_ready", sender)

    def _on_worker_process_shutdown(self, **_: Any) -> None:
        self._stop_process()

    def _on_worker_shutdown(self, sender: Any = None, **_: Any) -> None:
        if self.worker is None or not self.worker.is_main_process:
            return
        self._stop_process()
        self._run("on_worker_stop", self.worker, reverse=True)
