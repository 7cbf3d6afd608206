"""A soft time limit mid-query leaves the server nothing to complain about.

lifeguard cancels an interrupted statement on the server and discards its connection.
If it closed the socket before the cancel's answer arrived, the server would fail to
send the "canceling statement" error ("could not send data to client: Broken pipe",
"FATAL: connection to client lost") and count the session in
``pg_stat_database.sessions_fatal`` or ``sessions_abandoned``: the very figures
``lifeguard check`` and ``validate`` alert on. Here twenty interruptions in a row, on
every driver, must leave both figures unchanged, fail each interrupted task with
SoftTimeLimitExceeded and let the next task succeed.
"""

from __future__ import annotations

import time

import pytest

from lifeguard.postgres import driver as pgdriver
from tests.support import Database, SandboxTasks

INTERRUPTIONS = 20
SOFT_LIMIT = 0.3


def session_ends(db: Database) -> dict[str, int]:
    """How the database's sessions ended so far (flushed by each backend as it exits)."""
    with db.server.admin() as conn:
        conn.execute("SELECT pg_stat_clear_snapshot()")
        row = conn.execute(
            "SELECT sessions, sessions_fatal, sessions_abandoned, sessions_killed"
            " FROM pg_stat_database WHERE datname = %s",
            [db.name],
        ).fetchone()
    assert row is not None
    return dict(zip(("sessions", "fatal", "abandoned", "killed"), map(int, row), strict=True))


def interrupt_repeatedly(
    tasks: SandboxTasks, sleep_task: str, next_task: str, seconds: float = 5.0
) -> None:
    for _ in range(INTERRUPTIONS):
        state, result = tasks.outcome(sleep_task, seconds, soft_time_limit=SOFT_LIMIT)
        assert state == "FAILURE", (state, result)
        assert type(result).__name__ == "SoftTimeLimitExceeded", repr(result)
        tasks.run(next_task)


def assert_clean_ends(db: Database, prefix: str, before: dict[str, int]) -> None:
    assert db.wait_for_no_backends(prefix) == []
    after = session_ends(db)
    assert after["sessions"] > before["sessions"]  # the worker's sessions were counted
    for figure in ("fatal", "abandoned", "killed"):
        assert after[figure] == before[figure], (figure, before, after)


@pytest.mark.parametrize("driver", ["psycopg", "psycopg2"])
def test_django_interrupted_queries_end_cleanly(
    sandbox_worker, tasks: SandboxTasks, test_db: Database, prefix: str, driver: str
):
    before = session_ends(test_db)
    worker = sandbox_worker(pool="prefork", concurrency=1, driver=driver)
    # psycopg2 waits in libpq without returning to Python: the signal that raises the
    # soft time limit is handled once the statement ends. Keep its statement short.
    interrupt_repeatedly(tasks, "sleep_query", "touch", 5.0 if driver == "psycopg" else 0.6)
    worker.stop()
    assert_clean_ends(test_db, prefix, before)


def test_sqlalchemy_interrupted_queries_end_cleanly(
    sqla_worker, sqla_tasks: SandboxTasks, test_db: Database, prefix: str
):
    before = session_ends(test_db)
    worker = sqla_worker(pool="prefork", concurrency=1)
    interrupt_repeatedly(sqla_tasks, "sleep_query", "touch")
    worker.stop()
    assert_clean_ends(test_db, prefix, before)


def test_asyncpg_interrupted_queries_end_cleanly(
    sqla_worker, sqla_tasks: SandboxTasks, test_db: Database, prefix: str
):
    before = session_ends(test_db)
    worker = sqla_worker(pool="prefork", concurrency=1)
    interrupt_repeatedly(sqla_tasks, "async_sleep_query", "async_touch")
    worker.stop()
    assert_clean_ends(test_db, prefix, before)


def _wait_running(db: Database, pid: int) -> None:
    deadline = time.monotonic() + 10
    while not db.admin(
        "SELECT 1 FROM pg_stat_activity WHERE pid = %s AND state = 'active'"
        " AND query LIKE 'SELECT pg_sleep%%'",
        [pid],
    ):
        assert time.monotonic() < deadline, "the statement never started"
        time.sleep(0.02)


def test_cancel_and_drain_reads_the_answer_psycopg(test_db: Database):
    """Driver level, psycopg 3: a statement left in flight (sent, never read) is
    cancelled and its answer read; the session ends with a Terminate, not a FATAL."""
    import psycopg

    before = session_ends(test_db)
    for _ in range(5):
        conn = psycopg.connect(**test_db.server.connect_kwargs(test_db.name), autocommit=True)
        conn.pgconn.send_query(b"SELECT pg_sleep(5)")
        _wait_running(test_db, conn.info.backend_pid)
        assert pgdriver.transaction_status(conn) is pgdriver.TransactionStatus.ACTIVE
        started = time.monotonic()
        assert pgdriver.cancel_and_drain(conn, 5.0) is True
        assert time.monotonic() - started < 2.0  # the cancel's answer, not pg_sleep's end
        assert pgdriver.transaction_status(conn) is pgdriver.TransactionStatus.IDLE
        conn.close()
    after = session_ends(test_db)
    assert (after["fatal"], after["abandoned"]) == (before["fatal"], before["abandoned"])


def test_cancel_and_drain_reads_the_answer_psycopg2_async(test_db: Database):
    """psycopg2 is left ACTIVE only on an asynchronous connection: poll() drains it."""
    import psycopg2
    import psycopg2.extras

    before = session_ends(test_db)
    kwargs = test_db.server.connect_kwargs(test_db.name)
    for _ in range(5):
        conn = psycopg2.connect(**kwargs, async_=True)
        psycopg2.extras.wait_select(conn)
        cursor = conn.cursor()
        cursor.execute("SELECT pg_sleep(5)")
        _wait_running(test_db, conn.info.backend_pid)
        assert pgdriver.transaction_status(conn) is pgdriver.TransactionStatus.ACTIVE
        assert pgdriver.cancel_and_drain(conn, 5.0) is True
        assert pgdriver.transaction_status(conn) is pgdriver.TransactionStatus.IDLE
        conn.close()
    after = session_ends(test_db)
    assert (after["fatal"], after["abandoned"]) == (before["fatal"], before["abandoned"])
