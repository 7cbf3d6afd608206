"""Tasks only the tests and benchmarks run in the demo's Django project: exactly-once
effects, singleton locks, external side effects and their benchmarks. Workers started by
``tests/harness/django_worker.py`` import this module beside the project's own tasks.
"""

from __future__ import annotations

import os
import time
from typing import Any

from celery import shared_task
from django.db import connection, transaction

import lifeguard

TABLE = "lifeguard_sandbox_items"


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
    from tests.harness.round_trips import count_round_trips

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
    key: str,
    on_orphan: str = "rerun",
    on_busy: str = "wait",
    hold: float = 0.0,
    fail_first: bool = False,
) -> dict[str, Any]:
    """One remote call per run that must make it; after the key's first call, holds the
    claim ``hold`` s before completing, for a test to SIGKILL the process there, or with
    ``fail_first`` raises after it (the claim stays: the remote may have acted)."""
    with lifeguard.effect(key, on_orphan=on_orphan, on_busy=on_busy) as effect:  # type: ignore[arg-type]
        if not effect.done:
            calls = _remote_call(effect.idempotency_key, key)
            if calls == 1:
                time.sleep(hold)
                if fail_first:
                    raise RuntimeError(f"the call for {key} failed after it was made")
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
