"""Celery's own database result backends, against real workers and a real PostgreSQL.

``db+postgresql+psycopg://``: Celery's SQLAlchemy backend builds its engines itself, so
stock workers leave unnamed sessions that every child exit abandons. ``django-db``
(django-celery-results) writes the result through the task's own Django connection,
inside whatever transaction the task left open, and loses it with that transaction.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from lifeguard.demo.worker import CeleryWorker, sandbox_settings
from lifeguard.postgres.appname import parse_application_name
from tests.support import Database, SandboxTasks, worker_fixture

DBRESULT_APP = "tests.harness.dbresult_app"
LEAVE_OPEN = "lifeguard.demo.project.tasks.leave_transaction_open"
AUTOCOMMIT_OFF = "lifeguard.demo.project.tasks.leave_autocommit_off"


def _db_result_url(db: Database) -> str:
    return "postgresql+psycopg://" + db.url.split("://", 1)[1]


def _session_figures(db: Database) -> tuple[int, int]:
    """``pg_stat_database`` (sessions, sessions_abandoned) of the test database."""
    with db.server.admin() as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(
            "SELECT sessions, sessions_abandoned FROM pg_stat_database WHERE datname = %s",
            [db.name],
        ).fetchone()
    assert row is not None
    return int(row[0]), int(row[1])


def _wait_for_rows(
    db: Database, table: str, ids: list[str], timeout: float = 30.0
) -> dict[str, str]:
    """task_id -> status of the rows the result backend wrote, once all ``ids`` have one.

    Polls on one connection, so the test adds exactly one session to the database.
    """
    deadline = time.monotonic() + timeout
    with db.server.admin(db.name) as conn:
        while True:
            rows = conn.execute(
                f"SELECT task_id, status FROM {table} WHERE task_id = ANY(%s)", [ids]
            ).fetchall()
            found = {str(task_id): str(status) for task_id, status in rows}
            if len(found) == len(ids) or time.monotonic() > deadline:
                return found
            time.sleep(0.1)


# --- db+postgresql+psycopg: Celery's SQLAlchemy backend --------------------------------------


@pytest.fixture
def dbresult_worker(
    test_db: Database, redis_url: str, prefix: str, request: pytest.FixtureRequest
) -> Iterator[Callable[..., CeleryWorker]]:
    def build(
        *, mode: str = "lifeguard", pool: str = "prefork", concurrency: int = 2, **base: str
    ) -> CeleryWorker:
        env = sandbox_settings(mode=mode, options="{}", quiet=False, **base)
        return CeleryWorker(
            DBRESULT_APP, pool=pool, concurrency=concurrency, queue=base["queue"], env=env
        )

    yield from worker_fixture(
        build,
        {
            "db_url": test_db.url,
            "broker_url": f"{redis_url}/14",
            "queue": f"q-{prefix}",
            "prefix": prefix,
        },
        request,
        test_db,
        prefix,
    )


@pytest.fixture
def dbresult_tables(test_db: Database) -> None:
    """Celery's result tables, created once up front so two children never race for them."""
    from celery.backends.database import models  # noqa: F401  (defines the tables)
    from celery.backends.database.session import ResultModelBase
    from sqlalchemy import create_engine

    engine = create_engine(_db_result_url(test_db))
    try:
        ResultModelBase.metadata.create_all(engine)
    finally:
        engine.dispose()


def _run_adds(
    celery_client: Any, queue: str, db: Database, n: int
) -> tuple[dict[str, str], list[str]]:
    ids = [str(uuid.uuid4()) for _ in range(n)]
    for i, task_id in enumerate(ids):
        celery_client.send_task(
            "tests.harness.dbresult_app.add", args=(i, 1), queue=queue, task_id=task_id
        )
    return _wait_for_rows(db, "celery_taskmeta", ids), ids


@pytest.mark.compat
@pytest.mark.usefixtures("dbresult_tables")
def test_db_result_backend_named_reused_and_closed(
    dbresult_worker: Callable[..., CeleryWorker],
    celery_client: Any,
    test_db: Database,
    prefix: str,
) -> None:
    """Stock abandons its children's result sessions at shutdown; lifeguard names them
    ``<prefix>:<host>:<pid>``, reuses them across tasks and closes them: 0 abandoned."""
    queue = f"q-{prefix}"
    n = 20

    # Stock Celery: the scenario bites (a child's pooled result connection is never closed).
    _, abandoned_before = _session_figures(test_db)
    stock = dbresult_worker(mode="stock")
    statuses, ids = _run_adds(celery_client, queue, test_db, n)
    assert [statuses.get(i) for i in ids] == ["SUCCESS"] * n
    stock.stop()
    assert test_db.wait_for_no_backends(prefix) == []
    deadline = time.monotonic() + 5
    while _session_figures(test_db)[1] == abandoned_before and time.monotonic() < deadline:
        time.sleep(0.2)
    assert _session_figures(test_db)[1] > abandoned_before, "stock no longer abandons sessions"

    # lifeguard: named, reused, closed.
    sessions_before, abandoned_before = _session_figures(test_db)
    worker = dbresult_worker()
    children = set(worker.children())
    first: set[int] = set()
    for batch in range(2):
        statuses, ids = _run_adds(celery_client, queue, test_db, n)
        assert [statuses.get(i) for i in ids] == ["SUCCESS"] * n
        backends = test_db.backends(prefix)
        assert 1 <= len(backends) <= 2, backends
        for backend in backends:
            parsed = parse_application_name(backend.application_name, prefix)
            assert parsed is not None, backend
            assert parsed.pid in children, (backend, children)
            assert backend.state == "idle", backend
        if batch == 0:
            first = {backend.pid for backend in backends}
        else:  # the same sessions served the second batch
            assert first <= {backend.pid for backend in backends}
    worker.stop()
    assert test_db.wait_for_no_backends(prefix) == []
    time.sleep(0.5)  # the last backends' statistics are flushed as they exit
    sessions_after, abandoned_after = _session_figures(test_db)
    assert abandoned_after == abandoned_before
    # 2 x 20 tasks: the test's 2 poll connections, Celery's table check in the
    # MainProcess at start (a few NullPool sessions on 5.7), one session per child.
    assert sessions_after - sessions_before <= 12, sessions_after - sessions_before


@pytest.mark.usefixtures("dbresult_tables")
def test_db_result_backend_pooled_under_solo(
    dbresult_worker: Callable[..., CeleryWorker],
    celery_client: Any,
    test_db: Database,
    prefix: str,
) -> None:
    """Celery opens a NullPool session for every result store outside prefork children;
    a solo worker under lifeguard keeps one, named, and closes it at shutdown."""
    queue = f"q-{prefix}"
    _, abandoned_before = _session_figures(test_db)
    worker = dbresult_worker(pool="solo", concurrency=1)
    # The first batch pays Celery's backend setup (its table check).
    statuses, ids = _run_adds(celery_client, queue, test_db, 10)
    assert [statuses.get(i) for i in ids] == ["SUCCESS"] * 10
    time.sleep(0.5)
    sessions_before, _ = _session_figures(test_db)
    statuses, ids = _run_adds(celery_client, queue, test_db, 30)
    assert [statuses.get(i) for i in ids] == ["SUCCESS"] * 30
    sessions_after, _ = _session_figures(test_db)
    # Stock opens one session per store (30); here: the poll connection, and at most
    # the worker's own session if its statistics were flushed only now.
    assert sessions_after - sessions_before <= 2, sessions_after - sessions_before
    backends = test_db.backends(prefix)
    assert len(backends) == 1, backends
    for backend in backends:
        parsed = parse_application_name(backend.application_name, prefix)
        assert parsed is not None and parsed.pid == worker.pid, backend
    worker.stop()
    assert test_db.wait_for_no_backends(prefix) == []
    time.sleep(0.5)
    assert _session_figures(test_db)[1] == abandoned_before


# --- django-db: django-celery-results -------------------------------------------------------


@pytest.fixture
def django_results(test_db: Database) -> dict[str, str]:
    """django-celery-results' tables in the test database; the knob that selects it."""
    env = sandbox_settings(
        db_url=test_db.url,
        broker_url="redis://127.0.0.1:6379/14",  # not used by migrate
        queue="unused",
        mode="stock",
        prefix="lgmigrate",
        options="{}",
        quiet=True,
        results="django-db",
    )
    subprocess.run(
        [sys.executable, "-m", "django", "migrate", "django_celery_results", "--noinput", "-v0"],
        env={**os.environ, **env, "DJANGO_SETTINGS_MODULE": "lifeguard.demo.project.settings"},
        check=True,
        timeout=60,
    )
    return {"LIFEGUARD_SANDBOX_RESULTS": "django-db"}


def _send_leavers(tasks: SandboxTasks, tag: str) -> tuple[list[str], str]:
    """Both ways of leaving a transaction open, then a clean task that marks the end."""
    ids = [
        tasks.send("leave_transaction_open", f"{tag}-begin").id,
        tasks.send("leave_autocommit_off", f"{tag}-autocommit").id,
    ]
    return ids, tasks.send("touch").id


@pytest.mark.compat
def test_django_db_result_survives_a_transaction_left_open(
    sandbox_worker: Callable[..., CeleryWorker],
    django_results: dict[str, str],
    tasks: SandboxTasks,
    test_db: Database,
) -> None:
    """Stock loses the result with the transaction the task left open; lifeguard rolls the
    transaction back before the result is stored, stores it, and says so in the log."""
    table = "django_celery_results_taskresult"

    stock = sandbox_worker(mode="stock", concurrency=1, env=django_results)
    ids, marker = _send_leavers(tasks, "stock")
    # One child runs them in order: once the marker's result is there, theirs would be.
    # (On Celery 5.5 the marker itself may fail: the fixup reuses the dirty connection.)
    assert marker in _wait_for_rows(test_db, table, [marker])
    stored = _wait_for_rows(test_db, table, ids, timeout=1.0)
    # Celery 5.7: after a raw BEGIN the store fails (psycopg can't switch autocommit in
    # a transaction) and a FAILURE is recorded for a task that succeeded; with autocommit
    # off the row is written in the task's transaction and rolled back with it. Celery
    # 5.5 keeps the dirty connection, so the next tasks' results fail as well.
    assert stored.get(ids[0]) != "SUCCESS", "stock now keeps a raw BEGIN's result"
    assert stored.get(ids[1]) != "SUCCESS", "stock now keeps an autocommit-off task's result"
    stock.stop()

    worker = sandbox_worker(concurrency=1, env=django_results)
    ids, marker = _send_leavers(tasks, "lifeguard")
    stored = _wait_for_rows(test_db, table, [*ids, marker])
    assert stored == dict.fromkeys([*ids, marker], "SUCCESS")
    # The task's own writes were rolled back, as they are at the end of any task.
    written = test_db.execute(
        "SELECT count(*) FROM lifeguard_sandbox_items WHERE value LIKE 'lifeguard-%%'"
    )
    assert written == [(0,)]
    worker.stop()
    for name in (LEAVE_OPEN, AUTOCOMMIT_OFF):
        assert f"lifeguard: task {name} left a transaction open" in worker.log, name
