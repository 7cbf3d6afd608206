"""Terminating stale idle-in-transaction backends of lifeguard workers: opt-in, dry run first.

A backend is a candidate when it belongs to this database, its ``application_name``
carries the workers' prefix, and it has sat idle in transaction longer than the limit
(by default the critical threshold). The statement that terminates it checks all of that
again on the server, together with the backend's start time, so a backend that moved on
since the snapshot, or a pid reused by a new session, is left alone. Every decision is
logged on the ``lifeguard.monitor`` logger.

Terminating needs ``pg_signal_backend`` (or membership in the backend's role), and
backends of superusers can only be terminated by a superuser.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from typing import Any

from ..postgres.failures import sqlstate
from .attribution import WorkerTasks
from .snapshot import Backend, Snapshot
from .target import time_limited

logger = logging.getLogger("lifeguard.monitor")

_INSUFFICIENT_PRIVILEGE = "42501"

_TERMINATE = """
SELECT pg_terminate_backend(pid) FROM pg_stat_activity
WHERE pid = %(pid)s
  AND datname = current_database()
  AND backend_start = %(backend_start)s
  AND starts_with(application_name, %(prefix)s)
  AND state IN ('idle in transaction', 'idle in transaction (aborted)')
  AND state_change <= now() - make_interval(secs => %(older_than)s)
"""


@dataclass(frozen=True)
class Action:
    """What was done (or, in a dry run, would be done) about one backend."""

    pid: int
    application_name: str
    worker: str | None  # host:pid of the worker process
    idle_seconds: float
    task: str | None  # "name[id]" of the task its process runs, when known
    dry_run: bool
    terminated: bool = False
    error: str | None = None

    @property
    def description(self) -> str:
        task = f", its process runs {self.task}" if self.task else ""
        return (
            f"backend {self.pid} ({self.application_name}) idle in transaction for "
            f"{self.idle_seconds:.0f}s{task}"
        )


def stale_worker_backends(snapshot: Snapshot, older_than: float) -> list[Backend]:
    """The backends an action may touch: the prefix's, idle in transaction too long."""
    return [
        backend
        for backend in snapshot.worker_backends
        if backend.idle_in_transaction
        and backend.backend_start is not None
        and (backend.state_seconds or 0.0) > older_than
    ]


def terminate_stale(
    conn: Any,
    snapshot: Snapshot,
    older_than: float,
    *,
    dry_run: bool = True,
    tasks: WorkerTasks | None = None,
    timeout: float = 5.0,
) -> list[Action]:
    """Terminate (or, dry run, list) the prefix's backends idle in transaction too long."""
    actions: list[Action] = []
    missing_grant: str | None = None
    for backend in stale_worker_backends(snapshot, older_than):
        action = Action(
            pid=backend.pid,
            application_name=backend.application_name,
            worker=backend.worker_label,
            idle_seconds=backend.state_seconds or 0.0,
            task=_task_label(tasks, backend),
            dry_run=dry_run,
        )
        if dry_run:
            logger.info("lifeguard monitor: dry run: would terminate %s", action.description)
        elif missing_grant is not None:
            action = _failed(action, missing_grant)
        else:
            action = _terminate(conn, snapshot, backend, older_than, action, timeout=timeout)
            if action.error is not None and "GRANT" in action.error:
                missing_grant = action.error
        actions.append(action)
    return actions


def _terminate(
    conn: Any,
    snapshot: Snapshot,
    backend: Backend,
    older_than: float,
    action: Action,
    *,
    timeout: float,
) -> Action:
    params = {
        "pid": backend.pid,
        "backend_start": backend.backend_start,
        "prefix": f"{snapshot.prefix}:",
        "older_than": float(older_than),
    }
    try:
        with time_limited(conn, timeout), conn.cursor() as cur:
            cur.execute(_TERMINATE, params)
            row = cur.fetchone()
    except Exception as exc:
        if sqlstate(exc) != _INSUFFICIENT_PRIVILEGE:
            raise
        return _failed(action, _privilege_message(exc, snapshot))
    if row is None:
        logger.info(
            "lifeguard monitor: left backend %d alone: no longer idle in transaction",
            backend.pid,
        )
        return replace(action, error="no longer idle in transaction")
    if not row[0]:
        return _failed(action, "the server could not signal it (already gone?)")
    logger.warning("lifeguard monitor: terminated %s", action.description)
    return replace(action, terminated=True)


def _failed(action: Action, error: str) -> Action:
    logger.error("lifeguard monitor: could not terminate %s: %s", action.description, error)
    return replace(action, error=error)


def _privilege_message(exc: BaseException, snapshot: Snapshot) -> str:
    text = " ".join(str(exc).split())
    detail = getattr(getattr(exc, "diag", None), "message_detail", None) or ""
    if "superuser" in f"{text} {detail}".lower():
        return "it belongs to a superuser role: only a superuser may terminate it"
    return f"permission denied: GRANT pg_signal_backend TO {snapshot.role}"


def _task_label(tasks: WorkerTasks | None, backend: Backend) -> str | None:
    running = tasks.for_backend(backend) if tasks is not None else None
    if not running:
        return None
    return ", ".join(f"{task.name}[{task.id}]" for task in running)
