"""Which Celery task each worker process is running now, to name a backend's task.

``app.control.inspect().active()`` lists, per worker node, the requests being executed
with the ``worker_pid`` of the process running each one. A worker backend's
``application_name`` carries the host and pid of the process that opened it, so
``(host, pid)`` joins the two. The host part of a node name (``celery@web-1``) must be
the machine's hostname, as it is by default (``%h``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from ..postgres.appname import application_name
from ..postgres.conninfo import broker_error
from .snapshot import Backend

logger = logging.getLogger("lifeguard.monitor")


@dataclass(frozen=True)
class RunningTask:
    id: str
    name: str
    node: str  # the worker's node name, celery@host
    worker_pid: int
    started: float | None  # time.time() when the task started

    def running_seconds(self, now: float | None = None) -> float | None:
        if self.started is None:
            return None
        return max((now or time.time()) - self.started, 0.0)


@dataclass(frozen=True)
class WorkerTasks:
    """The answer of the workers: running tasks by ``(host, pid)``."""

    by_process: Mapping[tuple[str, int], tuple[RunningTask, ...]] = field(default_factory=dict)
    hosts: frozenset[str] = frozenset()  # hosts of the nodes that answered
    error: str | None = None  # why nobody could be asked

    def for_backend(self, backend: Backend) -> tuple[RunningTask, ...] | None:
        """Tasks of the process behind ``backend``: () when its worker answered with
        none running, None when its worker did not answer (or it isn't a worker's)."""
        if backend.worker is None:
            return None
        found: list[RunningTask] = []
        for (host, pid), tasks in self.by_process.items():
            if pid == backend.worker.pid and _opened_by(backend, host):
                found.extend(tasks)
        if found:
            return tuple(found)
        if any(_opened_by(backend, host) for host in self.hosts):
            return ()
        return None


def _opened_by(backend: Backend, host: str) -> bool:
    """Whether a process of ``host`` with the backend's pid would have named it so."""
    assert backend.worker is not None
    expected = application_name(backend.worker.prefix, host, backend.worker.pid)
    return expected == backend.application_name


def node_host(node: str) -> str:
    """``web-1`` from ``celery@web-1``."""
    return node.rpartition("@")[2]


def running_tasks(app: Any, timeout: float = 1.0) -> WorkerTasks:
    """Ask every worker of ``app`` which task each of its processes runs now."""
    try:
        replies = app.control.inspect(timeout=timeout).active() or {}
    except Exception as exc:  # broker down, wrong URL: attribution is a bonus
        logger.debug("inspect().active() failed", exc_info=True)
        return WorkerTasks(error=f"cannot ask the workers: {broker_error(exc, app)}")
    return tasks_from_replies(replies)


def tasks_from_replies(replies: Mapping[str, Any]) -> WorkerTasks:
    """Index the answer of ``inspect().active()``: ``{node: [request, ...]}``."""
    by_process: dict[tuple[str, int], list[RunningTask]] = {}
    for node, requests in replies.items():
        for request in requests or ():
            pid = request.get("worker_pid")
            if pid is None:
                continue  # received but not started by a process yet
            task = RunningTask(
                id=str(request.get("id", "")),
                name=str(request.get("name", "")),
                node=str(request.get("hostname") or node),
                worker_pid=int(pid),
                started=request.get("time_start"),
            )
            by_process.setdefault((node_host(task.node), task.worker_pid), []).append(task)
    return WorkerTasks(
        by_process={key: tuple(tasks) for key, tasks in by_process.items()},
        hosts=frozenset(node_host(node) for node in replies),
    )
