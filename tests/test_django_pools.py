"""Scenarios for every Celery pool, Django's native pool, and the stock fixup it replaces."""

from __future__ import annotations

import threading
import time

import celery
import pytest

from tests.support import Database, SandboxTasks

CELERY_VERSION = tuple(int(x) for x in celery.__version__.split(".")[:2])


def peak_backends(db: Database, prefix: str, stop: threading.Event, peak: list[int]) -> None:
    while not stop.is_set():
        peak[0] = max(peak[0], len(db.backends(prefix)))
        time.sleep(0.01)


@pytest.mark.compat
@pytest.mark.skipif(CELERY_VERSION < (5, 6), reason="Celery < 5.6 reuses by CONN_MAX_AGE")
def test_stock_celery_opens_a_session_per_task(sandbox_worker, tasks: SandboxTasks):
    """What lifeguard takes over: Celery 5.6+ closes the connection around every task."""
    sandbox_worker(pool="prefork", concurrency=2, mode="stock")
    results = tasks.run_many("touch", 20)
    assert len({(r["backend"], r["backend_start"]) for r in results}) == 20


@pytest.mark.parametrize("pool", ["threads", "solo"])
def test_threads_and_solo_reuse(
    sandbox_worker, tasks: SandboxTasks, test_db: Database, prefix, pool
):
    concurrency = 4 if pool == "threads" else 1
    sandbox_worker(pool=pool, concurrency=concurrency)
    results = tasks.run_many("touch", 40)
    sessions = {(r["backend"], r["backend_start"]) for r in results}
    assert len(sessions) <= concurrency
    assert len(test_db.backends(prefix)) <= concurrency
    # Each thread's connection is its own: a session is never shared by two threads.
    by_session: dict[tuple, set[int]] = {}
    for r in results:
        by_session.setdefault((r["backend"], r["backend_start"]), set()).add(r["thread"])
    assert all(len(threads) == 1 for threads in by_session.values())


def test_gevent_50_greenlets_never_exceed_concurrency(
    sandbox_worker, tasks: SandboxTasks, test_db: Database, prefix
):
    sandbox_worker(pool="gevent", concurrency=50, conn_max_age="600")
    stop, peak = threading.Event(), [0]
    sampler = threading.Thread(target=peak_backends, args=(test_db, prefix, stop, peak))
    sampler.start()
    try:
        results = [tasks.send("hold", 0.2) for _ in range(200)]
        values = [r.get(timeout=120) for r in results]
    finally:
        stop.set()
        sampler.join()
    assert len(values) == 200
    # Greenlets share a budget of warm connections (default min(concurrency, 10)).
    assert 1 <= peak[0] <= 10, peak[0]
    assert 1 <= len(test_db.backends(prefix)) <= 10


def test_gevent_soft_cleanup_after_hard_time_limit(
    sandbox_worker, tasks: SandboxTasks, test_db: Database, prefix
):
    """gevent's time limit is a gevent.Timeout raised mid-query: cancel, discard, go on."""
    sandbox_worker(pool="gevent", concurrency=5)
    state, _result = tasks.outcome("sleep_query", 4, time_limit=1)
    assert state == "FAILURE"
    assert tasks.run_many("touch", 5)
    assert test_db.running("SELECT pg_sleep", timeout=1.5) == []


NATIVE_POOL = '{"min_size": 1, "max_size": 2}'


def test_native_pool_under_prefork_is_kept_across_tasks(
    sandbox_worker, tasks: SandboxTasks, test_db: Database, prefix
):
    worker = sandbox_worker(
        pool="prefork", concurrency=2, conn_max_age="0", native_pool=NATIVE_POOL
    )
    before = test_db.sessions()
    results = tasks.run_many("touch", 60)
    sessions = {(r["backend"], r["backend_start"]) for r in results}
    assert len(sessions) <= 4
    assert len(test_db.backends(prefix)) <= 4
    worker.stop()
    assert test_db.sessions() - before <= 4


@pytest.mark.skipif(CELERY_VERSION < (5, 6), reason="the per-task pool rebuild is Celery 5.6+")
def test_stock_celery_rebuilds_the_native_pool_per_task(sandbox_worker, tasks: SandboxTasks):
    sandbox_worker(
        pool="prefork", concurrency=2, conn_max_age="0", native_pool=NATIVE_POOL, mode="stock"
    )
    results = tasks.run_many("touch", 20)
    assert len({(r["backend"], r["backend_start"]) for r in results}) >= 15


def test_native_pool_discards_an_interrupted_connection(
    sandbox_worker, tasks: SandboxTasks, test_db: Database, prefix
):
    sandbox_worker(pool="prefork", concurrency=1, conn_max_age="0", native_pool=NATIVE_POOL)
    tasks.run("touch")
    _state, result = tasks.outcome("sleep_query", 4, soft_time_limit=1)
    assert type(result).__name__ == "SoftTimeLimitExceeded"
    assert tasks.run_many("touch", 5)
    assert test_db.running("SELECT pg_sleep", timeout=1.5) == []


def test_native_pool_replaces_terminated_connections(
    sandbox_worker, tasks: SandboxTasks, test_db: Database, prefix
):
    sandbox_worker(pool="prefork", concurrency=1, conn_max_age="0", native_pool=NATIVE_POOL)
    tasks.run_many("touch", 3)
    assert test_db.terminate(prefix) >= 1
    time.sleep(0.2)
    assert len(tasks.run_many("touch", 5)) == 5


def test_native_pool_with_threads(sandbox_worker, tasks: SandboxTasks, test_db: Database, prefix):
    sandbox_worker(
        pool="threads",
        concurrency=4,
        conn_max_age="0",
        native_pool='{"min_size": 1, "max_size": 4}',
    )
    results = tasks.run_many("touch", 40)
    assert len({(r["backend"], r["backend_start"]) for r in results}) <= 4
