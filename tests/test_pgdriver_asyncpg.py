"""The driver-level checks for asyncpg connections, against a real server.

asyncpg keeps its protocol state in Cython; the adapter reads what it exposes: closed,
in a transaction, the socket, the backend pid, and sends cancel requests itself.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from lifeguard.postgres import driver as pgdriver
from lifeguard.postgres.driver import Problem, TransactionStatus
from tests.support import Database


async def _connect(db: Database) -> Any:
    import asyncpg

    kwargs = db.server.connect_kwargs(db.name)
    return await asyncpg.connect(
        host=kwargs["host"],
        port=kwargs["port"],
        user=kwargs["user"],
        password=kwargs.get("password"),
        database=kwargs["dbname"],
        ssl="require" if db.server.tls else False,
        server_settings={"application_name": "lgdriver:asyncpg:1"},
    )


def test_states_seen_without_a_round_trip(test_db: Database) -> None:
    async def scenario() -> list[Any]:
        conn = await _connect(test_db)
        seen: list[Any] = [pgdriver.reuse_problem(conn), pgdriver.backend_pid(conn)]
        transaction = conn.transaction()
        await transaction.start()
        seen.append(pgdriver.reuse_problem(conn))
        seen.append(pgdriver.transaction_status(conn))
        await transaction.rollback()
        test_db.admin("SELECT pg_terminate_backend(%s)", [conn.get_server_pid()])
        time.sleep(0.2)  # the server's goodbye reaches the idle socket
        seen.append(pgdriver.reuse_problem(conn))
        conn.terminate()
        seen.append(pgdriver.reuse_problem(conn))
        return seen

    idle, pid, in_transaction, status, terminated, closed = asyncio.run(scenario())
    assert idle is None and pid
    assert in_transaction is Problem.IN_TRANSACTION and status is TransactionStatus.INTRANS
    assert terminated is Problem.SERVER_CLOSED
    assert closed is Problem.CLOSED


def test_cancel_stops_the_running_statement(test_db: Database) -> None:
    async def scenario() -> tuple[bool, str]:
        conn = await _connect(test_db)
        query = asyncio.ensure_future(conn.execute("SELECT pg_sleep(5)"))
        while not test_db.running("SELECT pg_sleep"):
            await asyncio.sleep(0.02)
        sent = pgdriver.cancel_query(conn, timeout=2)
        try:
            await asyncio.wait_for(query, 3)
            ended = "completed"
        except Exception as exc:
            ended = type(exc).__name__
        await conn.close()
        return sent, ended

    sent, ended = asyncio.run(scenario())
    assert sent
    assert ended == "QueryCanceledError"
