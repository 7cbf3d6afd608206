"""The driver-level checks, against a real server, for psycopg 3 and psycopg2.

Each case puts a connection in the state a task can leave it in, then asks
`reuse_problem`, which must answer without a round trip.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Iterator
from typing import Any

import pytest

from lifeguard.postgres import driver as pgdriver
from lifeguard.postgres.driver import Problem, TransactionStatus
from tests.support import Database


@pytest.fixture(params=["psycopg", "psycopg2"])
def connect(request: pytest.FixtureRequest, test_db: Database) -> Iterator[Any]:
    opened: list[Any] = []
    kwargs = test_db.server.connect_kwargs(test_db.name)

    def make() -> Any:
        if request.param == "psycopg":
            import psycopg

            conn = psycopg.connect(**kwargs, autocommit=True, application_name="lgdriver:x:1")
        else:
            import psycopg2

            conn = psycopg2.connect(**kwargs, application_name="lgdriver:x:1")
            conn.autocommit = True
        opened.append(conn)
        return conn

    yield make
    for conn in opened:
        pgdriver.close_quietly(conn)


def _pid(conn: Any) -> int:
    pid = pgdriver.backend_pid(conn)
    assert pid
    return pid


def test_clean_idle_connection_is_reusable(connect):
    conn = connect()
    assert pgdriver.reuse_problem(conn) is None
    assert pgdriver.transaction_status(conn) is TransactionStatus.IDLE


def test_open_transaction_is_seen(connect):
    conn = connect()
    cur = conn.cursor()
    cur.execute("BEGIN")
    cur.execute("SELECT 1")
    assert pgdriver.reuse_problem(conn) is Problem.IN_TRANSACTION
    assert pgdriver.rollback_quietly(conn)
    assert pgdriver.reuse_problem(conn) is None


def test_failed_transaction_is_seen(connect):
    conn = connect()
    cur = conn.cursor()
    cur.execute("BEGIN")
    with pytest.raises(Exception, match="division by zero"):
        cur.execute("SELECT 1/0")
    assert pgdriver.reuse_problem(conn) is Problem.FAILED_TRANSACTION


def test_terminated_backend_makes_the_idle_socket_readable(connect, test_db: Database):
    conn = connect()
    test_db.admin("SELECT pg_terminate_backend(%s)", [_pid(conn)])
    deadline = time.monotonic() + 2
    while pgdriver.reuse_problem(conn) is None and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pgdriver.reuse_problem(conn) is Problem.SERVER_CLOSED


def test_closed_connection_is_seen(connect):
    conn = connect()
    conn.close()
    assert pgdriver.reuse_problem(conn) is Problem.CLOSED


def test_interrupted_query_is_busy_and_cancel_stops_it_on_the_server(test_db: Database):
    """psycopg 3 left mid-query by a non-database exception (what a soft time limit does)."""
    import psycopg

    conn = psycopg.connect(**test_db.server.connect_kwargs(test_db.name), autocommit=True)
    pid = _pid(conn)

    class Interrupt(Exception):
        pass

    def raise_interrupt(signum: int, frame: Any) -> None:
        raise Interrupt()

    previous = signal.signal(signal.SIGALRM, raise_interrupt)
    signal.setitimer(signal.ITIMER_REAL, 0.3)
    try:
        with pytest.raises(Interrupt):
            conn.execute("SELECT pg_sleep(5)")
    finally:
        signal.signal(signal.SIGALRM, previous)
    assert pgdriver.is_busy(conn)
    assert pgdriver.reuse_problem(conn) is Problem.INTERRUPTED
    assert pgdriver.cancel_query(conn, timeout=5)
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline:
        state = test_db.admin("SELECT state FROM pg_stat_activity WHERE pid = %s", [pid])
        if state and state[0][0] != "active":
            break
        time.sleep(0.02)
    assert state[0][0] != "active"
    pgdriver.close_quietly(conn)


def test_unknown_driver_is_never_reused():
    assert pgdriver.reuse_problem(object()) is Problem.UNKNOWN_DRIVER
