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


# --- exactly-once effects and singleton locks (docs/once.md; tests/test_once.py) ---------
# Tables made by the tests: lifeguard_once (lifeguard migrate), lifeguard_once_effects
# (key, value, pid), lifeguard_singleton_runs (key, during tstzrange, no overlap).


def _once_effect_row(key: str, value: str) -> None:
    with connection.cursor() as cur:
        cur.execute(
            "INSERT INTO lifeguard_once_effects (key, value, pid) VALUES (%s, %s, %s)",
            [key, value, os.getpid()],
        )


@shared_task(acks_late=True, reject_on_worker_lost=True)
def once_effect(
    key: str | None, value: str, before_commit: float = 0.0, after_commit: float = 0.0
) -> dict[str, Any]:
    """One effect row per key; sleeps inside the transaction, or after its commit (before
    the ack), for a test to SIGKILL the process there."""
    with lifeguard.once(key) as block:
        if block.done:
            return {**block.result, "skipped": True}
        _once_effect_row(block.key, value)
        time.sleep(before_commit)
        block.result = {"value": value, "pid": os.getpid(), "skipped": False}
    time.sleep(after_commit)
    return dict(block.result)


def _once_key(key: str, value: str) -> str:
    return key


@shared_task(acks_late=True, reject_on_worker_lost=True)
@lifeguard.once_task(key=_once_key)
def once_decorated(key: str, value: str) -> dict[str, Any]:
    """The decorator form: every run of a key returns the first committed run's result."""
    _once_effect_row(key, value)
    return {"value": value, "pid": os.getpid()}


@shared_task
def once_on_commit(key: str, refused: bool = False) -> dict[str, Any]:
    """A once block with an ``on_commit()`` callback and a stored result; ``refused``: a
    deferred constraint makes the server refuse the COMMIT that carries the result."""
    from django.db import IntegrityError

    ran: list[bool] = []
    error = None
    try:
        with lifeguard.once(key) as block:
            transaction.on_commit(lambda: ran.append(True))
            _once_effect_row(key, "v")
            if refused:
                with connection.cursor() as cur:
                    cur.execute(
                        "CREATE TEMP TABLE lifeguard_refused (n int UNIQUE DEFERRABLE "
                        "INITIALLY DEFERRED) ON COMMIT DROP"
                    )
                    cur.execute("INSERT INTO lifeguard_refused VALUES (1), (1)")
            block.result = {"stored": True}
    except IntegrityError as exc:
        error = type(exc).__name__
    return {"on_commit_ran": bool(ran), "error": error}


@shared_task
def singleton_run(key: str, seconds: float, on_busy: str = "wait") -> dict[str, Any]:
    """Holds the singleton ``key`` for ``seconds``; records its interval (server clock)."""
    with lifeguard.singleton(key, on_busy=on_busy) as lock:  # type: ignore[arg-type]
        if not lock.acquired:
            return {"acquired": False}
        with connection.cursor() as cur:
            cur.execute("SELECT extract(epoch FROM clock_timestamp())::float")
            started = float(cur.fetchone()[0])
            time.sleep(seconds)
            cur.execute(
                "INSERT INTO lifeguard_singleton_runs (key, during) VALUES "
                "(%s, tstzrange(to_timestamp(%s), clock_timestamp()))",
                [key, started],
            )
        return {"acquired": True, "started": started, "pid": os.getpid()}


# --- benchmarks/once.py: one write per task, unguarded, once-guarded, Redis-locked ----------


def _counted(body: Any, count: bool) -> int:
    """Runs ``body``; with ``count``, returns the round trips it made to PostgreSQL (BEGIN
    and COMMIT included), read from libpq's protocol trace: each change from messages
    sent to messages received is one wait for the server."""
    if not count:
        body()
        return 0
    from .round_trips import count_round_trips

    connection.ensure_connection()
    return count_round_trips(connection.connection.pgconn, body)


@shared_task
def bench_write(value: str, count: bool = False) -> int:
    def body() -> None:
        with transaction.atomic():
            _once_effect_row(value, value)

    return _counted(body, count)


@shared_task
def bench_once_write(value: str, with_result: bool = False, count: bool = False) -> int:
    def body() -> None:
        with lifeguard.once() as block:
            if not block.done:
                _once_effect_row(value, value)
                block.result = {"value": value} if with_result else None

    return _counted(body, count)


_redis: list[Any] = []


@shared_task(bind=True)
def bench_redis_lock(self: Any, value: str, count: bool = False) -> int:
    """The celery-once pattern: SET NX EX around the work, DEL after (2 Redis trips)."""
    if not _redis:
        import redis

        _redis.append(redis.Redis.from_url(os.environ["LIFEGUARD_SANDBOX_BROKER_URL"]))
    key = f"qo_{self.request.id}"
    if not _redis[0].set(key, 1, nx=True, ex=3600):
        return 0
    try:
        return int(bench_write(value, count))
    finally:
        _redis[0].delete(key)


# --- external side effects: claim / complete (docs/once.md; tests/test_effects.py) -------
# The "remote API" is the table lifeguard_effect_remote (idempotency_key, key, pid), made by
# the tests and written on a connection of its own in autocommit: a call, once made, stays
# made whatever happens to the task. A real API would apply each idempotency key once.


def _remote_call(idempotency_key: str, key: str) -> int:
    """Records one call of the remote API; returns how many calls of ``key`` it has seen."""
    raw = connection.Database.connect(**connection.get_connection_params())  # not pooled
    try:
        raw.autocommit = True
        cur = raw.cursor()
        cur.execute(
            "INSERT INTO lifeguard_effect_remote (idempotency_key, key, pid) VALUES (%s, %s, %s)",
            [idempotency_key, key, os.getpid()],
        )
        cur.execute("SELECT count(*) FROM lifeguard_effect_remote WHERE key = %s", [key])
        return int(cur.fetchone()[0])
    finally:
        raw.close()


@shared_task(acks_late=True, reject_on_worker_lost=True)
def effect_call(
    key: str, on_orphan: str = "rerun", on_busy: str = "wait", hold: float = 0.0
) -> dict[str, Any]:
    """One remote call per run that must make it; after the key's first call, holds the
    claim ``hold`` s before completing, for a test to SIGKILL the process there."""
    with lifeguard.effect(key, on_orphan=on_orphan, on_busy=on_busy) as effect:  # type: ignore[arg-type]
        if not effect.done:
            calls = _remote_call(effect.idempotency_key, key)
            if calls == 1:
                time.sleep(hold)
            effect.result = {"pid": os.getpid(), "calls": calls}
    return {
        "status": effect.status,
        "result": effect.result,
        "idempotency_key": effect.idempotency_key,
        "waited": effect.waited,
        "orphaned": effect.orphaned,
    }


@shared_task(acks_late=True, reject_on_worker_lost=True)
@lifeguard.effect_task(key=lambda key: key)
def effect_decorated(key: str) -> dict[str, Any]:
    """The decorator form: its return value is stored; a rerun returns it without a call."""
    calls = _remote_call(lifeguard.current_effect().idempotency_key, key)
    return {"pid": os.getpid(), "calls": calls}


@shared_task
def bench_effect(key: str, guard: str, call_ms: float = 0.0) -> bool:
    """benchmarks/effects.py: a simulated remote call of ``call_ms``, claimed by ``guard``:
    "none", "effect" (lifeguard.effect), or "redis" (a celery-once-style claim: SET NX EX
    before, SET done after). Returns whether the call was made."""

    def call() -> None:
        time.sleep(call_ms / 1000)

    if guard == "none":
        call()
        return True
    if guard == "effect":
        with lifeguard.effect(key) as effect:
            if not effect.done:
                call()
        return not effect.done
    if not _redis:
        import redis

        _redis.append(redis.Redis.from_url(os.environ["LIFEGUARD_SANDBOX_BROKER_URL"]))
    claim = f"qo_effect_{key}"
    if not _redis[0].set(claim, "claimed", nx=True, ex=3600):
        return False
    call()
    _redis[0].set(claim, "done", ex=3600)
    return True
