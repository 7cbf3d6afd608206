"""Scenarios: each fault a task can leave on a SQLAlchemy connection, then what the
database shows.

Every engine has a pool of one connection (no overflow): a connection that is not given
back makes the next task fail, so "the next tasks succeed" proves it was given back.
"""

from __future__ import annotations

import pytest

from tests.sqla_support import SqlaWorkerFactory
from tests.support import Database, SandboxTasks, assert_clean


@pytest.mark.compat
@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_soft_time_limit_mid_statement(
    sqla_worker: SqlaWorkerFactory,
    sqla_tasks: SandboxTasks,
    test_db: Database,
    prefix: str,
    driver: str,
) -> None:
    sqla_worker(concurrency=1, driver=driver)
    before = sqla_tasks.run("touch")

    state, result = sqla_tasks.outcome("sleep_query", 6, soft_time_limit=1)

    # The time-limit error itself, not "another command is already in progress".
    assert state == "FAILURE"
    assert type(result).__name__ == "SoftTimeLimitExceeded", repr(result)
    assert len(sqla_tasks.run_many("touch", 3)) == 3
    assert test_db.running("SELECT pg_sleep", timeout=1.5) == []
    assert_clean(test_db, prefix, 1)
    if driver == "psycopg":  # psycopg2 can't be interrupted mid-statement: it finished
        stats = sqla_tasks.run("guard_stats")
        assert stats["process"]["queries_cancelled"] == 1
        assert stats["process"]["connections_discarded"] == {"interrupted": 1}
        assert sqla_tasks.run("touch")["backend"] != before["backend"]


@pytest.mark.compat
def test_soft_time_limit_inside_a_transaction_that_wrote(
    sqla_worker: SqlaWorkerFactory, sqla_tasks: SandboxTasks, test_db: Database, prefix: str
) -> None:
    sqla_worker(concurrency=1)
    _, result = sqla_tasks.outcome("write_then_sleep", "interrupted-write", 6, soft_time_limit=1)

    assert type(result).__name__ == "SoftTimeLimitExceeded", repr(result)
    assert sqla_tasks.run("count_items", "interrupted-write") == 0
    assert test_db.running("SELECT pg_sleep", timeout=1.5) == []
    assert_clean(test_db, prefix, 1)


def test_stock_scoped_session_breaks_after_a_soft_time_limit(
    sqla_worker: SqlaWorkerFactory, sqla_tasks: SandboxTasks, test_db: Database, prefix: str
) -> None:
    """The failure lifeguard prevents: scoped_session + task_postrun remove() (E4)."""
    sqla_worker(concurrency=1, mode="stock")
    sqla_tasks.run("touch")
    sqla_tasks.outcome("sleep_query", 6, soft_time_limit=1)

    state, result = sqla_tasks.outcome("touch")
    assert state == "FAILURE"
    assert "QueuePool limit" in str(result), repr(result)
    test_db.terminate(prefix)  # the stranded session: let the fixture see a clean end


@pytest.mark.compat
def test_exception_mid_transaction(
    sqla_worker: SqlaWorkerFactory, sqla_tasks: SandboxTasks, test_db: Database, prefix: str
) -> None:
    sqla_worker(concurrency=1)
    first = sqla_tasks.run("touch")

    state, result = sqla_tasks.outcome("write_then_fail", "failed-write")

    assert state == "FAILURE" and isinstance(result, ValueError)
    assert sqla_tasks.run("count_items", "failed-write") == 0
    # Rolled back cleanly: the same server session goes on serving tasks.
    assert sqla_tasks.run("touch")["backend"] == first["backend"]
    assert_clean(test_db, prefix, 1)


@pytest.mark.compat
def test_task_that_leaks_a_checked_out_connection(
    sqla_worker: SqlaWorkerFactory, sqla_tasks: SandboxTasks, test_db: Database, prefix: str
) -> None:
    worker = sqla_worker(concurrency=1)

    sqla_tasks.run("leak_connection", "leaked-write")

    # The pool has one connection: the next tasks get it back, its write rolled back.
    assert sqla_tasks.run("count_items", "leaked-write") == 0
    assert len(sqla_tasks.run_many("touch", 3)) == 3
    assert_clean(test_db, prefix, 1)
    stats = sqla_tasks.run("guard_stats")["tasks"]["tests.harness.sqla_app.leak_connection"]
    assert stats["leaks_found"] == 1
    assert stats["transactions_rolled_back"] == 1
    assert "leak_connection ended with 1 connection(s)" in worker.log


def test_gevent_timeout_mid_statement(
    sqla_worker: SqlaWorkerFactory, sqla_tasks: SandboxTasks, test_db: Database, prefix: str
) -> None:
    """gevent's hard limit is a gevent.Timeout (a BaseException) raised in the greenlet."""
    sqla_worker(pool="gevent", concurrency=4, pool_size=2, async_tasks=False)
    assert len(sqla_tasks.run_many("touch", 4)) == 4

    state, result = sqla_tasks.outcome("sleep_query", 6, time_limit=1)

    assert state == "FAILURE"
    assert type(result).__name__ == "TimeLimitExceeded", repr(result)
    assert len(sqla_tasks.run_many("touch", 4)) == 4
    assert test_db.running("SELECT pg_sleep", timeout=1.5) == []
    assert_clean(test_db, prefix, 2)
    assert sqla_tasks.run("guard_stats")["process"]["queries_cancelled"] == 1


def test_soft_time_limit_in_a_raw_driver_call(
    sqla_worker: SqlaWorkerFactory, sqla_tasks: SandboxTasks, test_db: Database, prefix: str
) -> None:
    """The statement escaped handle_error: the pool's reset event catches it at checkin."""
    sqla_worker()

    state, result = sqla_tasks.outcome("raw_sleep_query", 6, soft_time_limit=1)

    assert state == "FAILURE"
    assert type(result).__name__ == "SoftTimeLimitExceeded", repr(result)
    assert len(sqla_tasks.run_many("touch", 3)) == 3
    assert test_db.running("SELECT pg_sleep", timeout=1.5) == []
    assert_clean(test_db, prefix, 1)
    assert sqla_tasks.run("guard_stats")["process"]["queries_cancelled"] == 1


def test_threads_pool_sessions_and_leaks_per_task(
    sqla_worker: SqlaWorkerFactory, sqla_tasks: SandboxTasks, test_db: Database, prefix: str
) -> None:
    """Concurrent tasks in one process: each has its own session, leaks are the leaker's."""
    sqla_worker(pool="threads", concurrency=2, pool_size=2)
    assert len(sqla_tasks.run_many("touch", 8)) == 8

    sqla_tasks.run("leak_connection", "leaked-in-thread")

    assert sqla_tasks.run("count_items", "leaked-in-thread") == 0
    assert len(sqla_tasks.run_many("touch", 8)) == 8
    assert_clean(test_db, prefix, 2)
    tasks = sqla_tasks.run("guard_stats")["tasks"]
    assert tasks["tests.harness.sqla_app.leak_connection"]["leaks_found"] == 1
    assert "leaks_found" not in tasks["tests.harness.sqla_app.touch"]
