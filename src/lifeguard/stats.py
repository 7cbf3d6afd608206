"""Per-process counters, in total and per task name, behind ``guard.stats()``.

Each worker process (each prefork child) counts for itself; the metrics exporter
aggregates processes. Increments take a lock because the threads pool counts from
many threads at once.
"""

from __future__ import annotations

import os
import threading
from collections import defaultdict
from collections.abc import Callable
from typing import Any

# Counter names, shared by every integration (Django, SQLAlchemy, ...).
CONNECTIONS_OPENED = "connections_opened"
CONNECTIONS_REUSED = "connections_reused"
CONNECTIONS_DISCARDED = "connections_discarded"  # counted per reason
TRANSACTIONS_ROLLED_BACK = "transactions_rolled_back"
QUERIES_CANCELLED = "queries_cancelled"
LEAKS_FOUND = "leaks_found"
TASKS = "tasks"
RECYCLES = "recycles"  # counted per reason: the process asked to be replaced
HOOK_ERRORS = "hook_errors"
TASKS_HANDED_BACK = "tasks_handed_back"  # counted per failure class (database trouble)
HAND_BACKS_EXHAUSTED = "hand_backs_exhausted"  # a task failed after hand_back_limit
ONCE_SKIPPED = "once_skipped"  # a once block found its key committed: the body skipped
SINGLETON_WAITED = "singleton_waited"  # the lock was held: the run waited for it
SINGLETON_SKIPPED = "singleton_skipped"  # the lock was held: on_busy="skip"
SINGLETON_BUSY = "singleton_busy"  # the run gave up, per reason: timeout | retry
ORPHANED_CLAIMS = "orphaned_claims"  # a claim whose owner died (external effects)

_Key = tuple[str, str | None]  # (counter, reason)

#: Called after each increment with (counter, task, reason, n): the metrics exporter.
Listener = Callable[[str, str | None, str | None, int], None]


class Stats:
    """Counters of one process."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._total: dict[_Key, int] = defaultdict(int)
        self._by_task: dict[str, dict[_Key, int]] = defaultdict(lambda: defaultdict(int))
        self._listeners: list[Listener] = []

    def add_listener(self, listener: Listener) -> None:
        """Be told of every increment (after it is counted), e.g. to export it."""
        self._listeners.append(listener)

    def reset(self) -> None:
        """Start from zero: a forked child must not report its parent's counts."""
        with self._lock:
            self._pid = os.getpid()
            self._total.clear()
            self._by_task.clear()

    def incr(
        self, counter: str, task: str | None = None, reason: str | None = None, n: int = 1
    ) -> None:
        key = (counter, reason)
        with self._lock:
            self._total[key] += n
            if task is not None:
                self._by_task[task][key] += n
        for listener in self._listeners:
            listener(counter, task, reason, n)

    def get(self, counter: str, reason: str | None = None, task: str | None = None) -> int:
        with self._lock:
            table = self._total if task is None else self._by_task.get(task, {})
            return table.get((counter, reason), 0)

    def snapshot(self) -> dict[str, Any]:
        """``{"pid", "process": {...}, "tasks": {name: {...}}}``; reasons nest as dicts."""
        with self._lock:
            return {
                "pid": self._pid,
                "process": _nest(self._total),
                "tasks": {name: _nest(table) for name, table in sorted(self._by_task.items())},
            }


def _sort_key(item: tuple[_Key, int]) -> tuple[str, str]:
    (counter, reason), _ = item
    return counter, reason or ""


def _nest(table: dict[_Key, int]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for (counter, reason), value in sorted(table.items(), key=_sort_key):
        if reason is None:
            out[counter] = value
        else:
            out.setdefault(counter, {})[reason] = value
    return out
