"""gevent and eventlet workers sharing warm Django connections under a budget.

Real green workers, real PostgreSQL: sessions are counted from pg_stat_database and
pg_stat_activity, not from lifeguard's own counters.
"""

from __future__ import annotations

import json
import threading
import time

import pytest

from lifeguard.demo.postgres import free_port
from tests.monitor_support import samples, scrape, wait_for
from tests.support import Database, SandboxTasks
from tests.test_django_pools import peak_backends


def _green_worker(sandbox_worker, pool: str = "gevent", concurrency: int = 20, **options):
    """A green worker with CONN_MAX_AGE=600 and these lifeguard options."""
    return sandbox_worker(
        pool=pool, concurrency=concurrency, conn_max_age="600", options=json.dumps(options)
    )


def _idle_in_transaction(db: Database, prefix: str) -> list[int]:
    return [b.pid for b in db.backends(prefix) if b.state.startswith("idle in transaction")]


def _discarded(tasks: SandboxTasks, reason: str) -> int:
    """Connections the worker's process discarded for ``reason`` so far."""
    return int(tasks.run("guard_stats")["process"]["connections_discarded"].get(reason, 0))


def _open_transaction_then_terminated_backends(
    tasks: SandboxTasks, db: Database, prefix: str
) -> None:
    """A transaction left open is rolled back, never handed to another greenlet; backends
    terminated while idle in the set are replaced before a task trips on them."""
    tasks.run("leave_transaction_open", "green-never-committed")
    assert tasks.run("count_items", "green-never-committed") == 0
    assert _idle_in_transaction(db, prefix) == []
    assert db.terminate(prefix) >= 1
    time.sleep(0.2)
    assert len(tasks.run_many("touch", 30)) == 30


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_gevent_100_greenlets_reuse_a_budget_of_connections(
    sandbox_worker, tasks: SandboxTasks, test_db: Database, prefix, driver
):
    """With only CONN_MAX_AGE set, 1,000 tasks open no more sessions than the budget."""
    worker = sandbox_worker(pool="gevent", concurrency=100, conn_max_age="600", driver=driver)
    before = test_db.sessions()
    results = tasks.run_many("touch", 1000)
    sessions = {(r["backend"], r["backend_start"]) for r in results}
    assert len(sessions) <= 10, len(sessions)  # the default budget: min(100, 10)
    assert _idle_in_transaction(test_db, prefix) == []
    stats = tasks.run("guard_stats")["django"]["aliases"]["default"]["green"]
    # 10, or half the free slots if the shared server has fewer than 20 free.
    assert 1 <= stats["peak_in_use"] <= stats["budget"] <= 10
    worker.stop()
    assert test_db.wait_for_no_backends(prefix, timeout=5) == []
    assert test_db.sessions() - before <= 10


def test_gevent_1000_greenlets_holding_connections_stay_under_a_budget_of_20(
    sandbox_worker, tasks: SandboxTasks, test_db: Database, prefix
):
    """-c 1000, green_budget=20, 400 tasks that each keep their connection busy 50 ms on
    the server (pg_sleep): they queue for the 20, every one succeeds, and the worker's
    backends sampled from pg_stat_activity never pass 20."""
    _green_worker(sandbox_worker, concurrency=1000, green_budget=20)
    stop, peak = threading.Event(), [0]
    sampler = threading.Thread(target=peak_backends, args=(test_db, prefix, stop, peak))
    sampler.start()
    try:
        pending = [tasks.send("sleep_query", 0.05) for _ in range(400)]
        for result in pending:
            result.get(timeout=60)
        states = {result.state for result in pending}
    finally:
        stop.set()
        sampler.join()
    assert states == {"SUCCESS"}
    assert 1 <= peak[0] <= 20, peak[0]
    stats = tasks.run("guard_stats")["django"]["aliases"]["default"]["green"]
    assert stats["waits"] > 0 and stats["wait_timeouts"] == 0
    assert stats["budget"] == 20 and stats["peak_in_use"] <= 20


def test_exhausted_budget_fails_with_an_error_naming_it(
    sandbox_worker, tasks: SandboxTasks, test_db: Database, prefix
):
    """Never a hang, never an extra backend: the waiter gives up with a clear error."""
    port = free_port()
    _green_worker(
        sandbox_worker,
        concurrency=10,
        green_budget=2,
        green_wait_timeout=0.5,
        metrics_port=port,
        metrics_address="127.0.0.1",
    )
    stop, peak = threading.Event(), [0]
    sampler = threading.Thread(target=peak_backends, args=(test_db, prefix, stop, peak))
    sampler.start()
    try:
        holders = [tasks.send("hold", 3) for _ in range(2)]
        time.sleep(1.0)  # both holders have their connection
        asked = time.monotonic()
        state, error = tasks.outcome("touch")
        waited = time.monotonic() - asked
        assert [r.get(timeout=30) for r in holders]
    finally:
        stop.set()
        sampler.join()
    assert state == "FAILURE"
    # It gave up after its 0.5 s, while both holders still had ~2 s to go: no hang.
    assert waited < 1.8, waited
    assert type(error).__name__ == "GreenBudgetExhausted"
    # The message names the budget and the options, as the user writes them.
    message = str(error)
    assert "green_budget=2" in message and "green_wait_timeout" in message
    assert "CELERY_LIFEGUARD_GREEN_BUDGET" in message
    assert peak[0] <= 2, peak[0]  # never a third backend for the waiter
    assert len(tasks.run_many("touch", 20)) == 20
    # The metrics endpoint shows the wait that failed and the peak.
    alias = (("alias", "default"),)
    wait_for(lambda: samples(scrape(port), "lifeguard_django_green_wait_timeouts_total"))
    assert samples(scrape(port), "lifeguard_django_green_wait_timeouts_total")[alias] == 1
    assert list(samples(scrape(port), "lifeguard_django_green_peak_in_use").values()) == [2]


def test_gevent_faults_with_reuse_on(
    sandbox_worker, tasks: SandboxTasks, test_db: Database, prefix
):
    """Interrupted query, open transaction, terminated backends: none reaches a later task."""
    _green_worker(sandbox_worker, green_budget=3)
    tasks.run_many("touch", 10)
    # gevent's time limit raises mid-query (Celery's gevent pool has no soft limit): the
    # query is cancelled, its connection dropped.
    state, _ = tasks.outcome("sleep_query", 4, time_limit=1)
    assert state == "FAILURE"
    assert test_db.running("SELECT pg_sleep", timeout=1.5) == []
    # A soft limit (a gevent.Timeout raising SoftTimeLimitExceeded: Celery's gevent pool
    # applies only the hard one) mid-query: the query is cancelled on the server, the
    # interrupted connection is closed, and the task's clean-up query gets a sound one.
    found = tasks.run("sleep_query_soft_limited", 4, 0.5)
    interrupted, cleanup = found["interrupted"]["backend"], found["cleanup"]["backend"]
    assert cleanup != interrupted
    assert test_db.running("SELECT pg_sleep", timeout=1.5) == []
    assert interrupted not in {b.pid for b in test_db.backends(prefix)}
    assert interrupted not in {r["backend"] for r in tasks.run_many("touch", 10)}
    process = tasks.run("guard_stats")["process"]
    assert process["queries_cancelled"] == 2  # the hard limit's and the soft one's
    assert process["connections_discarded"]["interrupted"] == 2
    # An exception inside atomic(): rolled back by Django; the connection may be shared.
    state, _ = tasks.outcome("fail_in_atomic", "green-atomic")
    assert state == "FAILURE"
    assert tasks.run("count_items", "green-atomic") == 0
    _open_transaction_then_terminated_backends(tasks, test_db, prefix)
    # The server ends the set's idle connections (idle_session_timeout): each is
    # replaced before a task trips on it.
    test_db.admin(f"ALTER DATABASE \"{test_db.name}\" SET idle_session_timeout = '500ms'")
    try:
        test_db.terminate(prefix)  # new sessions take the setting
        assert len(tasks.run_many("touch", 10)) == 10
        closed_before = _discarded(tasks, "server_closed")
        time.sleep(1.2)
        assert len(tasks.run_many("touch", 20)) == 20
    finally:
        test_db.admin(f'ALTER DATABASE "{test_db.name}" RESET idle_session_timeout')
    assert _discarded(tasks, "server_closed") > closed_before
    assert len(test_db.backends(prefix)) <= 3


def test_connection_of_a_spawned_greenlet_is_still_closed(
    sandbox_worker, tasks: SandboxTasks, test_db: Database, prefix
):
    sandbox_worker(pool="gevent", concurrency=10, conn_max_age="600")
    found = tasks.run("query_in_greenlet")
    tasks.run_many("touch", 3)
    assert found["backend"] not in {b.pid for b in test_db.backends(prefix)}


def test_eventlet_reuses_a_budget_and_survives_an_open_transaction(
    sandbox_worker, tasks: SandboxTasks, test_db: Database, prefix
):
    pytest.importorskip("eventlet")
    worker = _green_worker(sandbox_worker, "eventlet", 50, green_budget=4)
    before = test_db.sessions()
    results = tasks.run_many("touch", 300)
    assert len({(r["backend"], r["backend_start"]) for r in results}) <= 4
    _open_transaction_then_terminated_backends(tasks, test_db, prefix)
    worker.stop()
    assert test_db.wait_for_no_backends(prefix, timeout=5) == []
    # The open transaction's session and the terminated ones were replaced, within budget.
    assert test_db.sessions() - before <= 4 + 1 + 4


def test_native_pool_under_gevent_gets_the_budget_and_the_bounded_wait(
    sandbox_worker, tasks: SandboxTasks, test_db: Database, prefix
):
    """OPTIONS['pool'] without max_size: sized to green_budget; a wait ends in the error."""
    sandbox_worker(
        pool="gevent",
        concurrency=20,
        conn_max_age="0",
        native_pool='{"min_size": 1}',
        options=json.dumps({"green_budget": 3, "green_wait_timeout": 0.5}),
    )
    holders = [tasks.send("hold", 3) for _ in range(3)]
    time.sleep(1.0)
    state, error = tasks.outcome("touch")
    assert state == "FAILURE"
    assert type(error).__name__ == "GreenBudgetExhausted"
    assert "max_size']=3" in str(error) and "green_wait_timeout" in str(error)
    assert len(test_db.backends(prefix)) <= 3
    assert [r.get(timeout=30) for r in holders]
    results = tasks.run_many("touch", 30)
    assert len({(r["backend"], r["backend_start"]) for r in results}) <= 3


def test_sqlalchemy_queuepool_smaller_than_the_green_concurrency_is_reported(
    sqla_worker, sqla_tasks: SandboxTasks, test_db: Database, prefix
):
    """pool_size 2, no overflow, 8 greenlets: said at start, and the pool bounds sessions."""
    worker = sqla_worker(pool="gevent", concurrency=8, pool_size=2, async_tasks=False)
    assert len(sqla_tasks.run_many("touch", 40)) == 40
    assert "holds at most 2 connections (pool_size + max_overflow) for the 8 greenlets" in (
        worker.log
    )
    assert "pool_timeout=5s" in worker.log
    assert len(test_db.backends(prefix)) <= 2 * 2  # two engines in the harness app


def test_sqlalchemy_engine_too_big_for_the_server_and_a_greenlet_that_leaks(
    sqla_worker, sqla_tasks: SandboxTasks, test_db: Database, prefix
):
    """gevent -c 1000, pool_size 2 + max_overflow 198, pool_timeout=None: the unbounded
    wait and the 200 connections the server has no slots for are said with what to
    change; a connection a spawned greenlet never returned is a leak of the task that
    spawned it, rolled back and given back like a task's own."""
    engine_args = json.dumps({"max_overflow": 198, "pool_timeout": None})
    worker = sqla_worker(
        pool="gevent",
        concurrency=1000,
        pool_size=2,
        async_tasks=False,
        env={"LIFEGUARD_SANDBOX_ENGINE_ARGS": engine_args},
    )
    assert len(sqla_tasks.run_many("touch", 20)) == 20
    log = " ".join(worker.log.split())
    assert "and pool_timeout=None: a greenlet past 200 waits forever" in log
    assert "Set pool_timeout" in log
    # max_connections is 100 here: 200 connections can never fit.
    assert "may open 200 connections in this gevent -c 1000 process" in log
    assert "set pool_size + max_overflow to at most" in log and "max_connections=" in log

    backend = sqla_tasks.run("leak_in_greenlet", "green-leaked-write")
    assert sqla_tasks.run("count_items", "green-leaked-write") == 0  # rolled back
    assert backend in {b.pid for b in test_db.backends(prefix)}  # given back, kept warm
    assert _idle_in_transaction(test_db, prefix) == []
    log = " ".join(worker.log.split())
    assert "task tests.harness.sqla_app.leak_in_greenlet leaked a connection of" in log
    assert "checked out by greenlet" in log
    # A task's own leak under gevent is reported the same way as under prefork.
    sqla_tasks.run("leak_connection", "green-task-leak")
    assert sqla_tasks.run("count_items", "green-task-leak") == 0
    stats = sqla_tasks.run("guard_stats")["tasks"]
    assert stats["tests.harness.sqla_app.leak_in_greenlet"]["leaks_found"] == 1
    assert stats["tests.harness.sqla_app.leak_connection"]["leaks_found"] == 1
    assert _idle_in_transaction(test_db, prefix) == []
