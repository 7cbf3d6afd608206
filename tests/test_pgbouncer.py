"""Scenario: the PgBouncer transaction-mode profile, through a real PgBouncer.

Skipped when the ``pgbouncer`` binary is absent (Debian package ``pgbouncer``). Three
worker children share two server connections, so consecutive transactions of one
client run on different server sessions: prepared statements made by asyncpg (always)
or psycopg (after 5 executions) would be missing there (research E10).
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.pgbouncer_support import running_pgbouncer
from tests.sqla_support import SqlaWorkerFactory
from tests.support import Database, SandboxTasks


@pytest.fixture
def pgbouncer(test_db: Database) -> Iterator[str]:
    """A PgBouncer in transaction mode in front of the test database; yields its URL."""
    with running_pgbouncer(test_db.server, test_db.name) as url:
        yield url


@pytest.mark.parametrize("async_driver", ["asyncpg", "psycopg"])
def test_transaction_mode_profile(
    sqla_worker: SqlaWorkerFactory, pgbouncer: str, sqla_tasks: SandboxTasks, async_driver: str
) -> None:
    sqla_worker(
        concurrency=3,
        async_driver=async_driver,
        db_url=pgbouncer,
        options='{"pgbouncer_transaction_mode": true}',
    )

    sync = [sqla_tasks.send("statements", 10) for _ in range(9)]
    async_ = [sqla_tasks.send("async_statements", 10) for _ in range(9)]

    outcomes = [r.get(timeout=120, propagate=False) for r in sync + async_]
    failures = [repr(outcome) for outcome in outcomes if outcome != 10]
    assert failures == []
