"""Scenarios: SQLAlchemy engines created at import, before the worker forks.

Every child must get sessions of its own (named after its pid), the MainProcess must be
left holding none, and a connection inherited across fork must never be used.
"""

from __future__ import annotations

import os

import pytest
from celery import Celery
from sqlalchemy import create_engine, text

import lifeguard
from lifeguard.postgres.appname import application_name
from tests.sqla_support import SqlaWorkerFactory
from tests.support import Database, SandboxTasks, assert_clean


@pytest.mark.compat
@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_engines_used_by_the_main_process_before_fork(
    sqla_worker: SqlaWorkerFactory,
    sqla_tasks: SandboxTasks,
    test_db: Database,
    prefix: str,
    driver: str,
) -> None:
    worker = sqla_worker(concurrency=2, driver=driver, use_before_fork=True)

    results = sqla_tasks.run_many("touch", 12) + sqla_tasks.run_many("async_touch", 12)

    # Each child has its own sessions, named after it; none is shared between children.
    owners: dict[int, set[int]] = {}
    for result in results:
        assert result["application_name"] == application_name(prefix, pid=result["worker_pid"])
        owners.setdefault(result["backend"], set()).add(result["worker_pid"])
    assert all(len(pids) == 1 for pids in owners.values()), owners
    assert set().union(*owners.values()) <= set(worker.children())
    # The MainProcess used both engines at import, was told so, and kept nothing open.
    assert worker.log.count("was used in the worker's MainProcess before it forked") == 2
    main_process_name = application_name(prefix, pid=worker.pid)
    assert [b for b in test_db.backends(prefix) if b.application_name == main_process_name] == []
    # At most one session per engine per child (pool_size=1): connections were reused.
    assert len(test_db.backends(prefix)) <= 2 * 2
    assert_clean(test_db, prefix, 4)


@pytest.mark.compat
def test_a_connection_inherited_across_fork_is_never_used(test_db: Database, prefix: str) -> None:
    """No worker here: the process-id check alone, as for an engine nobody disposed."""
    app = Celery(f"fork-{prefix}")
    guard = lifeguard.install(app, application_name_prefix=prefix)
    engine = guard.add_engine(
        create_engine(test_db.server.url(test_db.name, scheme="postgresql+psycopg"), pool_size=1)
    )
    with engine.connect() as conn:
        parent_backend = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()

    read, write = os.pipe()
    child = os.fork()
    if child == 0:  # pragma: no cover - the child reports through the pipe
        code = 1
        try:
            with engine.connect() as conn:
                backend = conn.execute(text("SELECT pg_backend_pid()")).scalar_one()
            os.write(write, str(backend).encode())
            code = 0
        finally:
            os._exit(code)
    os.close(write)
    _, status = os.waitpid(child, 0)
    child_backend = int(os.read(read, 64).decode() or 0)
    os.close(read)

    assert os.waitstatus_to_exitcode(status) == 0
    assert child_backend not in (0, parent_backend)
    # The parent's session survived: the child sent nothing on it.
    with engine.connect() as conn:
        assert conn.execute(text("SELECT pg_backend_pid()")).scalar_one() == parent_backend
    engine.dispose()
    guard.lifecycle.disconnect()


def test_application_name_set_by_the_user_is_kept(
    sqla_worker: SqlaWorkerFactory, sqla_tasks: SandboxTasks, test_db: Database, prefix: str
) -> None:
    url = test_db.server.url(test_db.name, application_name=f"{prefix}:mine")
    sqla_worker(concurrency=1, db_url=url)

    assert sqla_tasks.run("touch")["application_name"] == f"{prefix}:mine"
