"""Scenarios around the worker's life: fork, names, leaks, restarts, bad configuration."""

from __future__ import annotations

import socket
import time

import pytest

from lifeguard.demo.postgres import EmbeddedPostgres
from tests.support import Database, SandboxTasks


@pytest.mark.compat
def test_backends_are_named_after_their_worker_process(
    sandbox_worker, tasks: SandboxTasks, test_db: Database, prefix
):
    worker = sandbox_worker(pool="prefork", concurrency=2)
    results = tasks.run_many("touch", 20)
    host = socket.gethostname()
    names = {b.application_name for b in test_db.backends(prefix)}
    expected = {f"{prefix}:{host}:{r['worker_pid']}"[:63] for r in results}
    assert names and names <= expected
    # The MainProcess holds no connection: every backend belongs to a child.
    assert f"{prefix}:{host}:{worker.pid}" not in names


def test_connection_leaked_by_a_thread_is_closed(
    sandbox_worker, tasks: SandboxTasks, test_db: Database, prefix
):
    worker = sandbox_worker(pool="prefork", concurrency=1)
    own = tasks.run("touch")
    leaked = tasks.run("query_in_thread")
    assert leaked["backend"] != own["backend"]
    time.sleep(0.2)
    pids = {b.pid for b in test_db.backends(prefix)}
    assert leaked["backend"] not in pids
    assert own["backend"] in pids
    stats = tasks.run("guard_stats")
    assert stats["tasks"]["lifeguard.demo.project.tasks.query_in_thread"]["leaks_found"] == 1
    assert (
        "query_in_thread leaked a default connection opened by thread 'sandbox-helper'"
        in worker.log
    )


def test_connection_leaked_by_a_greenlet_is_closed(
    sandbox_worker, tasks: SandboxTasks, test_db: Database, prefix
):
    worker = sandbox_worker(pool="gevent", concurrency=5)
    leaked = tasks.run("query_in_greenlet")
    time.sleep(0.2)
    assert leaked["backend"] not in {b.pid for b in test_db.backends(prefix)}
    assert "query_in_greenlet leaked a default connection" in worker.log


def test_postgres_restart_during_a_run(sandbox_worker, tasks: SandboxTasks, prefix):
    """On a server this test starts itself: restart it between tasks."""
    embedded = EmbeddedPostgres()
    server = embedded.start()
    try:
        server.create_database("restart_test")
        sandbox_worker(pool="prefork", concurrency=2, db_url=server.url("restart_test"))
        before = tasks.run_many("touch", 10)
        embedded.restart()
        after = tasks.run_many("touch", 10)
        assert {r["backend"] for r in after}.isdisjoint({r["backend"] for r in before})
        stats = [tasks.run("guard_stats") for _ in range(3)]
        assert any(
            s["process"].get("connections_discarded", {}).get("server_closed") for s in stats
        )
    finally:
        embedded.destroy()


def test_password_never_reaches_the_log(
    sandbox_worker, tasks: SandboxTasks, test_db: Database, prefix
):
    role = f"{prefix}_pw"
    secret = "s3cret-Pa55word-xyz"
    test_db.server.ensure_role(role, secret)
    url = test_db.server.url(test_db.name, user=role, password=secret)
    worker = sandbox_worker(pool="prefork", concurrency=1, db_url=url)
    tasks.run("touch")
    tasks.outcome("sleep_query", 3, soft_time_limit=1)
    assert "lifeguard: managing Django connections" in worker.log
    assert secret not in worker.log


def test_pool_with_persistent_connections_refuses_to_start(sandbox_worker):
    worker = sandbox_worker(conn_max_age="600", native_pool='{"min_size": 1}', start=False)
    status = worker.run_to_exit()
    assert status != 0
    assert "Set CONN_MAX_AGE to 0" in worker.log


def test_unknown_option_in_configuration_refuses_to_start(sandbox_worker):
    worker = sandbox_worker(options='{"ping_afterr_idle": 3}', start=False)
    status = worker.run_to_exit()
    assert status == 78
    # Named as written in the Django settings (namespace="CELERY"), suggestion included.
    assert "Unknown lifeguard option 'CELERY_LIFEGUARD_PING_AFTERR_IDLE'" in worker.log
    assert "Did you mean 'CELERY_LIFEGUARD_PING_AFTER_IDLE'?" in worker.log


def test_long_idle_connection_gets_a_round_trip(sandbox_worker, tasks: SandboxTasks):
    sandbox_worker(pool="solo", concurrency=1, options='{"ping_after_idle": 0.3}')
    first = tasks.run("touch")
    time.sleep(0.5)
    second = tasks.run("touch")
    assert second["backend"] == first["backend"]  # the ping passed: same session


@pytest.mark.parametrize("native_pool", ["", '{"min_size": 2, "max_size": 2}'])
def test_children_forked_from_a_main_process_holding_connections(
    sandbox_worker, tasks: SandboxTasks, test_db: Database, prefix, native_pool
):
    """The MainProcess queries once ready; children recycled afterwards inherit its
    connection (and pool). They must drop them without a byte on the parent's sockets."""
    worker = sandbox_worker(
        pool="prefork",
        concurrency=2,
        conn_max_age="0" if native_pool else "600",
        native_pool=native_pool,
        args=("--max-tasks-per-child=2",),
        env={"LIFEGUARD_SANDBOX_MAIN_USES_DB": "1"},
    )
    host = socket.gethostname()
    main_name = f"{prefix}:{host}:{worker.pid}"
    deadline = time.monotonic() + 5
    while not [b for b in test_db.backends(prefix) if b.application_name == main_name]:
        assert time.monotonic() < deadline, "the MainProcess never connected"
        time.sleep(0.05)
    main_backends = {b.pid for b in test_db.backends(prefix) if b.application_name == main_name}

    results = tasks.run_many("touch", 12)  # about six children forked from that parent

    assert {r["backend"] for r in results}.isdisjoint(main_backends)
    still = {b.pid for b in test_db.backends(prefix) if b.application_name == main_name}
    assert still == main_backends, "a child closed the parent's session"
    assert len({r["worker_pid"] for r in results}) >= 4


@pytest.mark.compat
def test_threads_worker_stops_promptly_and_leaves_no_session(
    sandbox_worker, tasks: SandboxTasks, test_db: Database, prefix
):
    """A warm shutdown of a threads worker is as quick as stock Celery's: nothing of
    lifeguard's may block a pool thread's exit (it once imported a green library there,
    and the worker hung until it was killed, abandoning its sessions)."""
    worker = sandbox_worker(pool="threads", concurrency=2)
    for _ in range(4):
        tasks.run("one_query")
    started = time.monotonic()
    assert worker.stop(timeout=20) == 0
    assert time.monotonic() - started < 10
    assert test_db.wait_for_no_backends(prefix) == []
