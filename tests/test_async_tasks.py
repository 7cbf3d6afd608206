"""Scenarios: ``async def`` tasks on one event loop per worker process.

A pooled AsyncEngine serves every task of a process (asyncio.run() per task would break
asyncpg on the second task); a soft time limit cancels the coroutine, and the next tasks
run on the same loop and pool.
"""

from __future__ import annotations

import pytest

from tests.sqla_support import SqlaWorkerFactory
from tests.support import Database, SandboxTasks, assert_clean


@pytest.mark.compat
@pytest.mark.parametrize("async_driver", ["asyncpg", "psycopg"])
@pytest.mark.parametrize(
    "pool",
    [("prefork", 2, "MainThread"), ("solo", 1, "MainThread"), ("threads", 2, "lifeguard-loop")],
    ids=["prefork", "solo", "threads"],
)
def test_async_tasks_reuse_pooled_connections(
    sqla_worker: SqlaWorkerFactory,
    sqla_tasks: SandboxTasks,
    *,
    test_db: Database,
    prefix: str,
    async_driver: str,
    pool: tuple[str, int, str],
) -> None:
    """(pool kind, concurrency, the thread the coroutines run in)."""
    kind, concurrency, thread = pool
    sqla_worker(pool=kind, concurrency=concurrency, async_driver=async_driver, pool_size=2)

    results = sqla_tasks.run_many("async_touch", 16)

    assert {r["thread"] for r in results} == {thread}
    backends_per_process: dict[int, set[int]] = {}
    for result in results:
        backends_per_process.setdefault(result["worker_pid"], set()).add(result["backend"])
    # Pool size 2: never more than two sessions per process, whatever the task count.
    assert all(len(b) <= 2 for b in backends_per_process.values()), backends_per_process
    assert sqla_tasks.run_many("async_one_query", 4) == [1] * 4
    if kind != "prefork":  # one process: its counters saw every task, by task name
        counted = sqla_tasks.run("guard_stats")["tasks"]["tests.harness.sqla_app.async_touch"]
        assert counted["connections_opened"] <= 2
        assert counted["connections_opened"] + counted["connections_reused"] == 16
    assert_clean(test_db, prefix, 2 * concurrency * 2)


@pytest.mark.compat
@pytest.mark.parametrize("async_driver", ["asyncpg", "psycopg"])
def test_soft_time_limit_cancels_the_coroutine(
    sqla_worker: SqlaWorkerFactory,
    sqla_tasks: SandboxTasks,
    test_db: Database,
    prefix: str,
    async_driver: str,
) -> None:
    sqla_worker(concurrency=1, async_driver=async_driver)
    sqla_tasks.run("async_touch")

    state, result = sqla_tasks.outcome("async_sleep_query", 6, soft_time_limit=1)

    assert state == "FAILURE"
    assert type(result).__name__ == "SoftTimeLimitExceeded", repr(result)
    # Same process, same loop, pool of one: the connection came back.
    assert len(sqla_tasks.run_many("async_touch", 3)) == 3
    assert test_db.running("SELECT pg_sleep", timeout=1.5) == []
    assert_clean(test_db, prefix, 2)
    stats = sqla_tasks.run("guard_stats")["tasks"]["tests.harness.sqla_app.async_sleep_query"]
    assert stats["connections_discarded"] == {"interrupted": 1}


@pytest.mark.parametrize("pool", ["gevent"])
def test_green_pools_are_refused_at_worker_start(sqla_worker: SqlaWorkerFactory, pool: str) -> None:
    worker = sqla_worker(pool=pool, concurrency=4, start=False)
    assert worker.pool == "gevent"

    assert worker.run_to_exit() == 78
    assert "async def tasks can't run under the gevent pool" in worker.log
    assert "tests.harness.sqla_app.async_touch" in worker.log
