"""Tasks of the sandbox: one-query tasks, and each fault lifeguard must survive."""

from __future__ import annotations

import os
import threading
import time
from typing import Any

from celery import shared_task
from django.db import connection, transaction

import lifeguard

TABLE = "lifeguard_sandbox_items"


def _backend() -> dict[str, Any]:
    with connection.cursor() as cur:
        cur.execute(
            "SELECT pg_backend_pid(), backend_start::text FROM pg_stat_activity "
            "WHERE pid = pg_backend_pid()"
        )
        pid, started = cur.fetchone()
    return {
        "backend": pid,
        "backend_start": started,
        "worker_pid": os.getpid(),
        "thread": threading.get_ident(),
    }


@shared_task
def touch() -> dict[str, Any]:
    """One query; says which server session and which worker process served it."""
    return _backend()


@shared_task
def one_query() -> int:
    """The benchmark's task: a single cheap query."""
    with connection.cursor() as cur:
        cur.execute("SELECT 1")
        return int(cur.fetchone()[0])


@shared_task
def noop() -> None:
    """No database at all: the throughput ceiling."""


@shared_task
def sleep_query(seconds: float) -> None:
    """A long query; called with a soft_time_limit shorter than it to interrupt it."""
    with connection.cursor() as cur:
        cur.execute("SELECT pg_sleep(%s)", [seconds])


@shared_task
def sleep_query_in_atomic(seconds: float) -> None:
    with transaction.atomic(), connection.cursor() as cur:
        cur.execute(f"INSERT INTO {TABLE} (value) VALUES ('atomic-interrupted')")
        cur.execute("SELECT pg_sleep(%s)", [seconds])


@shared_task
def fail_in_atomic(value: str) -> None:
    """Writes inside atomic(), then fails: Django rolls back, nothing may remain."""
    with transaction.atomic():
        with connection.cursor() as cur:
            cur.execute(f"INSERT INTO {TABLE} (value) VALUES (%s)", [value])
        raise ValueError("task failed inside atomic()")


@shared_task
def leave_transaction_open(value: str) -> dict[str, Any]:
    """A raw BEGIN never committed: the connection ends the task idle in transaction."""
    info = _backend()
    with connection.cursor() as cur:
        cur.execute("BEGIN")
        cur.execute(f"INSERT INTO {TABLE} (value) VALUES (%s)", [value])
    return info


@shared_task
def leave_autocommit_off(value: str) -> dict[str, Any]:
    """Autocommit switched off, a write, no commit: Django's own way to leave one open."""
    transaction.set_autocommit(False)
    info = _backend()
    with connection.cursor() as cur:
        cur.execute(f"INSERT INTO {TABLE} (value) VALUES (%s)", [value])
    return info


@shared_task
def count_items(value: str) -> int:
    with connection.cursor() as cur:
        cur.execute(f"SELECT count(*) FROM {TABLE} WHERE value = %s", [value])
        return int(cur.fetchone()[0])


@shared_task
def hold_transaction(seconds: float) -> dict[str, Any]:
    """A transaction kept open while the task waits: idle in transaction as it runs."""
    with transaction.atomic():
        info = _backend()
        time.sleep(seconds)
    return info


@shared_task
def hold(seconds: float) -> dict[str, Any]:
    """One query, then keep the connection while doing slow I/O."""
    info = _backend()
    time.sleep(seconds)
    return info


@shared_task
def query_in_thread() -> dict[str, Any]:
    """Starts a thread that queries and ends without closing its connection."""
    found: dict[str, Any] = {}

    def work() -> None:
        found.update(_backend())

    thread = threading.Thread(target=work, name="sandbox-helper")
    thread.start()
    thread.join()
    return found


@shared_task
def query_in_greenlet() -> dict[str, Any]:
    """Under gevent: a spawned greenlet queries and ends without closing."""
    import gevent

    found: dict[str, Any] = {}
    gevent.spawn(lambda: found.update(_backend())).join()
    return found


@shared_task
def sleep_query_soft_limited(seconds: float, limit: float) -> dict[str, Any]:
    """A soft time limit under gevent, which Celery's gevent pool does not apply (it only
    enforces the hard one): the task bounds its query with a ``gevent.Timeout`` raising
    ``SoftTimeLimitExceeded``, then cleans up with another query, as a soft limit's
    handler does."""
    import gevent
    from celery.exceptions import SoftTimeLimitExceeded

    interrupted = _backend()
    try:
        with gevent.Timeout(limit, SoftTimeLimitExceeded), connection.cursor() as cur:
            cur.execute("SELECT pg_sleep(%s)", [seconds])
    except SoftTimeLimitExceeded:
        return {"interrupted": interrupted, "cleanup": _backend()}
    raise AssertionError("the query outlived its soft limit")


@shared_task
def guard_stats() -> dict[str, Any] | None:
    """lifeguard's counters of the process that runs this task."""
    guard = lifeguard.current_guard()
    return guard.stats() if guard is not None else None


@shared_task
def application_name() -> str:
    with connection.cursor() as cur:
        cur.execute("SHOW application_name")
        return str(cur.fetchone()[0])


@shared_task
def driver() -> str:
    """The DB-API module behind Django's connection (psycopg or psycopg2)."""
    connection.ensure_connection()
    return type(connection.connection).__module__.split(".")[0]


@shared_task(bind=True)
def task_class(self: Any) -> list[str]:
    """The task's class hierarchy: Celery's fixup makes it a DjangoTask."""
    return [cls.__name__ for cls in type(self).__mro__]


# Raw connections opened by leak_connection and never closed, like a module-level cache.
LEAKED_CONNECTIONS: list[Any] = []


@shared_task
def leak_connection() -> int:
    """Opens a raw psycopg connection beside Django's, queries, and never closes it.

    The leak ``lifeguard validate`` must catch: one more idle backend per task, held by
    the worker process until it exits. Named ``<prefix>:leak``, so the test fixtures see
    it go away when the worker stops.
    """
    import psycopg
    from django.conf import settings

    leaked = psycopg.connect(
        settings.DB_URL,
        application_name=f"{settings.PREFIX}:leak",
        autocommit=True,
    )
    leaked.execute("SELECT 1")
    LEAKED_CONNECTIONS.append(leaked)
    return int(leaked.info.backend_pid)


# What the leaking task keeps forever, like a cache that never forgets.
LEAKED: list[bytes] = []


@shared_task
def leak(mib: float) -> dict[str, Any]:
    """Keeps ``mib`` MiB (every page written) for the life of the process."""
    LEAKED.append(b"\x01" * int(mib * 1024 * 1024))
    return {"worker_pid": os.getpid(), "leaked_mib": len(LEAKED) * mib}


@shared_task
def query_and_leak(mib: float) -> dict[str, Any]:
    """One query, then keeps ``mib`` MiB: the demo report's load (connections and memory)."""
    info = _backend()
    LEAKED.append(b"\x01" * int(mib * 1024 * 1024))
    return info


@shared_task(bind=True)
def insert_row(self: Any, value: str) -> dict[str, Any]:
    """One INSERT of a unique value: a task run twice shows as a duplicate row. Returns
    the task's own ``retries`` (lifeguard's hand-backs must leave it at 0)."""
    with connection.cursor() as cur:
        cur.execute(f"INSERT INTO {TABLE} (value) VALUES (%s)", [value])
    return {"value": value, "retries": self.request.retries}
