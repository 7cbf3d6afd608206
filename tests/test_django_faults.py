"""Scenarios: each fault a task can leave on its connection, then what the database shows.

After every fault the next tasks must succeed, no worker backend may be left idle in
transaction or still running the interrupted statement, and the worker never holds more
connections than its concurrency.
"""

from __future__ import annotations

import time

import celery
import pytest

from tests.support import Database, SandboxTasks, assert_clean

CELERY_56_PLUS = tuple(int(x) for x in celery.__version__.split(".")[:2]) >= (5, 6)


@pytest.mark.compat
@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_soft_time_limit_mid_query(
    sandbox_worker, tasks: SandboxTasks, test_db: Database, prefix, driver
):
    sandbox_worker(pool="prefork", concurrency=1, driver=driver)
    assert tasks.run("driver") == driver
    tasks.run_many("touch", 3)

    state, result = tasks.outcome("sleep_query", 4, soft_time_limit=1)

    assert state == "FAILURE"
    assert type(result).__name__ == "SoftTimeLimitExceeded", repr(result)
    assert tasks.run_many("touch", 5)  # the same child, right after the fault
    # Nothing left running on the server for the client that gave up.
    assert test_db.running("SELECT pg_sleep", timeout=1.5) == []
    assert_clean(test_db, prefix, 1)
    if driver == "psycopg":
        stats = tasks.run("guard_stats")
        assert stats["process"]["queries_cancelled"] == 1
        assert stats["process"]["connections_discarded"] == {"interrupted": 1}


@pytest.mark.compat
def test_soft_time_limit_inside_atomic(
    sandbox_worker, tasks: SandboxTasks, test_db: Database, prefix
):
    sandbox_worker(pool="prefork", concurrency=1)
    _state, result = tasks.outcome("sleep_query_in_atomic", 4, soft_time_limit=1)

    assert type(result).__name__ == "SoftTimeLimitExceeded", repr(result)
    assert tasks.run_many("touch", 3)
    assert tasks.run("count_items", "atomic-interrupted") == 0
    assert test_db.running("SELECT pg_sleep", timeout=1.5) == []
    assert_clean(test_db, prefix, 1)


@pytest.mark.compat
@pytest.mark.parametrize("mode", ["reuse_max", "stock"])
def test_stock_reuse_fails_after_a_soft_time_limit(sandbox_worker, tasks: SandboxTasks, mode):
    """The failure lifeguard prevents: Celery's CELERY_DB_REUSE_MAX, and the stock fixup of
    Celery 5.5 and older (close_if_unusable_or_obsolete, Django ticket #30646)."""
    if mode == "stock" and CELERY_56_PLUS:
        pytest.skip("Celery 5.6+ closes every connection after every task instead")
    sandbox_worker(pool="prefork", concurrency=1, mode=mode)
    tasks.run("touch")
    tasks.outcome("sleep_query", 3, soft_time_limit=1)
    states = [tasks.outcome("touch")[0] for _ in range(3)]
    # The next task on that process fails; blind reuse never recovers, Celery 5.5's
    # close_if_unusable_or_obsolete() drops the connection only after that failure.
    expected = ["FAILURE"] * 3 if mode == "reuse_max" else ["FAILURE", "SUCCESS", "SUCCESS"]
    assert states == expected


@pytest.mark.compat
def test_exception_inside_atomic(sandbox_worker, tasks: SandboxTasks, test_db: Database, prefix):
    sandbox_worker(pool="prefork", concurrency=1)
    first = tasks.run("touch")
    state, result = tasks.outcome("fail_in_atomic", "atomic-failed")

    assert state == "FAILURE" and isinstance(result, ValueError)
    assert tasks.run("count_items", "atomic-failed") == 0
    after = tasks.run("touch")
    # Django rolled back cleanly: the same session goes on serving tasks.
    assert after["backend"] == first["backend"]
    assert_clean(test_db, prefix, 1)


@pytest.mark.compat
@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_raw_begin_left_open(
    sandbox_worker, tasks: SandboxTasks, test_db: Database, prefix, driver
):
    sandbox_worker(pool="prefork", concurrency=1, driver=driver)
    leaked = tasks.run("leave_transaction_open", "never-committed")

    assert_clean(test_db, prefix, 1)
    assert tasks.run("count_items", "never-committed") == 0
    after = tasks.run("touch")
    assert after["backend"] != leaked["backend"]
    stats = tasks.run("guard_stats")
    assert stats["process"]["transactions_rolled_back"] == 1
    assert stats["process"]["connections_discarded"] == {"in_transaction": 1}


@pytest.mark.compat
def test_terminated_idle_connections(
    sandbox_worker, tasks: SandboxTasks, test_db: Database, prefix
):
    sandbox_worker(pool="prefork", concurrency=2)
    before = {r["backend"] for r in tasks.run_many("touch", 10)}

    assert test_db.terminate(prefix) >= 1
    time.sleep(0.2)

    after = tasks.run_many("touch", 10)
    assert {r["backend"] for r in after}.isdisjoint(before)
    assert_clean(test_db, prefix, 2)


def test_idle_session_timeout(sandbox_worker, tasks: SandboxTasks, test_db: Database, prefix):
    role = f"{prefix}_idle"
    test_db.server.ensure_role(role, "idle-pw")
    test_db.admin(f'GRANT ALL ON ALL TABLES IN SCHEMA public TO "{role}"')
    test_db.admin(f"ALTER ROLE \"{role}\" SET idle_session_timeout = '500ms'")
    url = test_db.server.url(test_db.name, user=role, password="idle-pw")
    try:
        sandbox_worker(pool="prefork", concurrency=1, db_url=url)
        first = tasks.run("touch")
        time.sleep(1.2)  # the server closes the idle session
        second = tasks.run("touch")
        assert second["backend"] != first["backend"]
        stats = tasks.run("guard_stats")
        assert stats["process"]["connections_discarded"]["server_closed"] >= 1
    finally:
        test_db.admin(f'ALTER ROLE "{role}" RESET idle_session_timeout')


def test_task_that_changes_nothing_keeps_its_session_for_max_age(
    sandbox_worker, tasks: SandboxTasks
):
    sandbox_worker(pool="prefork", concurrency=1, conn_max_age="1")
    first = tasks.run("touch")
    same = tasks.run("touch")
    time.sleep(1.1)
    later = tasks.run("touch")
    assert same["backend"] == first["backend"]
    assert later["backend"] != first["backend"]


def test_conn_max_age_zero_closes_after_each_task(
    sandbox_worker, tasks: SandboxTasks, test_db: Database, prefix
):
    sandbox_worker(pool="prefork", concurrency=1, conn_max_age="0")
    results = tasks.run_many("touch", 5)
    assert len({r["backend"] for r in results}) == 5
    assert test_db.wait_for_no_backends(prefix, timeout=2) == []
