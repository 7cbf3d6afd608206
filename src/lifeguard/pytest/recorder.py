"""Worker side of the pytest plugin: what lifeguard saw, per task, written to files.

The plugin's worker loads :mod:`lifeguard.pytest.worker_app`, which adds a
:class:`Recorder` to the app's guard. Every process that runs tasks (each prefork child)
appends JSON lines to ``<events dir>/<pid>.jsonl``: one per counter lifeguard increments
for a task (a transaction rolled back, a query cancelled, a leak, a discard and its
reason), one per warning lifeguard logs while a task is current (the words and the
place), one when a task fails on a database error, one per task a task sends, a
``start`` line when a task begins and a ``done`` line when its last phase has run,
carrying the process's RSS. The test
process reads the files: no broker round trip, nothing shared between processes but the
directory.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from typing import IO, Any

from ..hooks import Hook, OutcomeKind, TaskOutcome, TaskRun, WorkerInfo
from ..postgres import failures

# How the plugin tells its worker what to do (read by lifeguard.pytest.worker_app).
ENV_EVENTS = "LIFEGUARD_PYTEST_EVENTS"
ENV_APP = "LIFEGUARD_PYTEST_APP"
ENV_BROKER = "LIFEGUARD_PYTEST_BROKER_URL"
ENV_BACKEND = "LIFEGUARD_PYTEST_RESULT_BACKEND"
ENV_DATABASES = "LIFEGUARD_PYTEST_DATABASES"  # JSON {alias: database name}


class Recorder(Hook):
    """Appends what lifeguard counts and logs during each task to this process's file."""

    name = "pytest"

    def __init__(self, directory: str) -> None:
        self.directory = directory
        self._lock = threading.Lock()
        self._file: IO[str] | None = None
        self._pid = 0

    def bind(self, guard: Any) -> None:
        super().bind(guard)
        guard.counters.add_listener(self._counted)
        handler = _WarningHandler(self)
        logging.getLogger("lifeguard").addHandler(handler)
        from celery.signals import before_task_publish

        before_task_publish.connect(self._sent, weak=False)

    def _sent(self, headers: dict[str, Any] | None = None, **_: Any) -> None:
        """A task a task sends (a chain's next link, a ``.delay()`` in the body) is
        the sender's test's task too."""
        run = self.current()
        child = (headers or {}).get("id")
        if run is not None and child:
            self.write({"kind": "sent", "task_id": run.id, "child": str(child)})

    def write(self, record: dict[str, Any]) -> None:
        line = json.dumps(record, default=str) + "\n"
        with self._lock:
            pid = os.getpid()
            if self._file is None or self._pid != pid:  # a forked child writes its own file
                self._file = open(  # noqa: SIM115  (kept open for the process's life)
                    os.path.join(self.directory, f"{pid}.jsonl"), "a", encoding="utf-8"
                )
                self._pid = pid
            self._file.write(line)
            self._file.flush()

    def current(self) -> TaskRun | None:
        lifecycle = getattr(self.guard, "lifecycle", None)
        return lifecycle.current_run() if lifecycle is not None else None

    def _counted(self, counter: str, task: str | None, reason: str | None, n: int) -> None:
        if counter == "tasks" or not self.guard.lifecycle.in_task_process:
            return
        run = self.current()
        # A count for another task than the current one (a leak swept when the thread
        # that held it ended, during a later task) belongs to no run lifeguard can name.
        mine = run is not None and task in (None, run.name)
        self.write(
            {
                "kind": "count",
                "counter": counter,
                "reason": reason,
                "n": n,
                "task": task or (run.name if run else None),
                "task_id": run.id if run is not None and mine else None,
            }
        )

    def on_process_start(self, worker: WorkerInfo, forked: bool) -> None:
        self.write({"kind": "process", "forked": forked})

    def before_task(self, run: TaskRun) -> None:
        # Which process runs it: if that process dies mid-task, no "done" line follows.
        self.write({"kind": "start", "task": run.name, "task_id": run.id})

    def after_task(self, run: TaskRun, outcome: TaskOutcome) -> None:
        exc = outcome.exception
        # A soft time limit is its own finding (the statement it interrupted), not a fault.
        soft_limit = outcome.kind is OutcomeKind.SOFT_TIME_LIMIT
        if exc is not None and not soft_limit and _database_error(exc):
            first_line = (str(exc).strip().splitlines() or [""])[0]
            self.write(
                {
                    "kind": "database_fault",
                    "task": run.name,
                    "task_id": run.id,
                    "sqlstate": failures.chain_sqlstate(exc),
                    "failure": failures.classify(exc).value,
                    "message": f"{type(exc).__name__}: {first_line}",
                }
            )
        memory = next((h for h in self.guard.hooks if h.name == "memory"), None)
        rss = getattr(memory, "last_rss", None)
        self.write({"kind": "done", "task": run.name, "task_id": run.id, "rss": rss})


def _database_error(exc: BaseException) -> bool:
    """A driver, Django or SQLAlchemy database error anywhere in the exception's chain."""
    if failures.sqlstate(exc) is not None or failures.classify(exc).transient:
        return True
    seen: BaseException | None = exc
    for _ in range(10):
        if seen is None:
            return False
        module = type(seen).__module__.split(".")[0]
        if module in ("psycopg", "psycopg2", "asyncpg", "sqlalchemy") or (
            module == "django" and type(seen).__module__.startswith("django.db")
        ):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


class _WarningHandler(logging.Handler):
    """lifeguard's warnings while a task is current: the words and the place."""

    def __init__(self, recorder: Recorder) -> None:
        super().__init__(logging.WARNING)
        self.recorder = recorder

    def emit(self, record: logging.LogRecord) -> None:
        try:
            run = self.recorder.current()
            self.recorder.write(
                {
                    "kind": "warning",
                    "task": run.name if run else None,
                    "task_id": run.id if run else None,
                    "message": record.getMessage(),
                    "thread": record.threadName,
                }
            )
        except Exception:
            self.handleError(record)
