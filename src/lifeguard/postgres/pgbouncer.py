"""The PgBouncer transaction-mode profile: connect arguments per driver.

In transaction pooling, consecutive transactions of one client may run on different
server sessions, so a prepared statement made in one is missing (or already present) in
the next. Measured through PgBouncer 1.18 (research note sqlalchemy_async.md, §5.2 E10):
SQLAlchemy + asyncpg defaults fail 51-87 % of transactions, psycopg's default
``prepare_threshold=5`` 9-42 %; the settings below fail none. psycopg2 never prepares
statements on the server and needs nothing.

SQLAlchemy's documented alternative for asyncpg (``prepared_statement_name_func`` with
UUID names) is deliberately not used: it fails 81 % of autocommit transactions (E10).
"""

from __future__ import annotations

from typing import Any

# SQLAlchemy dialect driver name -> connect arguments that avoid server-side prepares.
TRANSACTION_MODE_CONNECT_ARGS: dict[str, dict[str, Any]] = {
    # asyncpg's statement cache and SQLAlchemy's prepared-statement cache, both off.
    "asyncpg": {"statement_cache_size": 0, "prepared_statement_cache_size": 0},
    # psycopg 3 prepares a query after 5 executions unless told never to.
    "psycopg": {"prepare_threshold": None},
    "psycopg_async": {"prepare_threshold": None},
}


def transaction_mode_connect_args(driver: str) -> dict[str, Any]:
    """Connect arguments that make this driver safe behind PgBouncer in transaction mode."""
    return dict(TRANSACTION_MODE_CONNECT_ARGS.get(driver, {}))
