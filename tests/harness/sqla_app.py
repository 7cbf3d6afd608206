"""A Celery app with SQLAlchemy engines, for the tests and the benchmark.

``celery -A tests.harness.sqla_app worker``. Both engines are created at import,
before the worker forks, as most applications do. Configured by environment variables:

LIFEGUARD_SANDBOX_DB_URL        postgresql://user:password@host:port/name?sslmode=...
LIFEGUARD_SANDBOX_BROKER_URL    broker and result backend (redis://...)
LIFEGUARD_SANDBOX_QUEUE         default queue
LIFEGUARD_SANDBOX_MODE          lifeguard (default) | stock
LIFEGUARD_SANDBOX_PREFIX        application_name prefix (lifeguard), or "<prefix>:stock"
LIFEGUARD_SANDBOX_DRIVER        sync driver: psycopg (default) | psycopg2
LIFEGUARD_SANDBOX_ASYNC_DRIVER  async driver: asyncpg (default) | psycopg
LIFEGUARD_SANDBOX_POOL_SIZE     pool_size of both engines (default 1, no overflow)
LIFEGUARD_SANDBOX_ENGINE_ARGS   JSON of create_engine() pool arguments over those
                                (max_overflow, pool_timeout)
LIFEGUARD_SANDBOX_USE_BEFORE_FORK  1: both engines run a query at import (MainProcess)
LIFEGUARD_SANDBOX_ASYNC_TASKS   0: define no async def task (for gevent workers)
LIFEGUARD_SANDBOX_OPTIONS       JSON of lifeguard.install() options
LIFEGUARD_SANDBOX_QUIET         set: no log line per task (benchmarks)

Build workers with :func:`tests.harness.sqla_worker.sandbox_worker`.

Modes. ``lifeguard``: ``guard.session(engine)`` in sync tasks, ``lifeguard.AsyncTask`` with
a pooled AsyncEngine for async ones. ``stock``: what guides recommend today, a
``scoped_session`` removed in ``task_postrun`` after ``engine.dispose(close=False)`` in
``worker_process_init``, and for async work the seed pattern: ``asyncio.run()`` per task
with a ``NullPool`` engine created in ``worker_process_init``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import threading
from typing import Any

from celery import Celery
from celery.signals import task_postrun, worker_process_init
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from sqlalchemy.ext.asyncio import AsyncEngine, create_async_engine
from sqlalchemy.orm import scoped_session, sessionmaker
from sqlalchemy.pool import NullPool

import lifeguard

TABLE = "lifeguard_sandbox_items"

MODE = os.environ.get("LIFEGUARD_SANDBOX_MODE", "lifeguard")
PREFIX = os.environ.get("LIFEGUARD_SANDBOX_PREFIX", "lifeguard")
DB_URL = os.environ.get("LIFEGUARD_SANDBOX_DB_URL", "postgresql://postgres@127.0.0.1:5432/test")
DRIVER = os.environ.get("LIFEGUARD_SANDBOX_DRIVER", "psycopg")
ASYNC_DRIVER = os.environ.get("LIFEGUARD_SANDBOX_ASYNC_DRIVER", "asyncpg")
POOL_SIZE = int(os.environ.get("LIFEGUARD_SANDBOX_POOL_SIZE", "1"))
POOL = {
    "pool_size": POOL_SIZE,
    "max_overflow": 0,
    "pool_timeout": 5,
    **json.loads(os.environ.get("LIFEGUARD_SANDBOX_ENGINE_ARGS", "{}")),
}


def driver_url(driver: str) -> Any:
    url = make_url(DB_URL).set(drivername=f"postgresql+{driver}")
    if driver == "asyncpg" and "sslmode" in url.query:  # asyncpg spells it "ssl"
        query = dict(url.query)
        query["ssl"] = query.pop("sslmode")
        url = url.set(query=query)
    return url


def stock_connect_args(driver: str) -> dict[str, Any]:
    """Stock mode names its sessions itself, so tests and the benchmark can find them."""
    name = f"{PREFIX}:stock"
    if driver == "asyncpg":
        return {"server_settings": {"application_name": name}}
    return {"application_name": name}


def connect_args(driver: str) -> dict[str, Any]:
    return stock_connect_args(driver) if MODE == "stock" else {}


broker = os.environ.get("LIFEGUARD_SANDBOX_BROKER_URL", "redis://127.0.0.1:6379/0")
app = Celery("lifeguard_sqla_sandbox", broker=broker, backend=broker)
app.conf.update(
    task_default_queue=os.environ.get("LIFEGUARD_SANDBOX_QUEUE", "lifeguard-sqla-sandbox"),
    broker_connection_retry_on_startup=True,
    result_expires=600,
    worker_prefetch_multiplier=4,
    worker_hijack_root_logger=False,
)

if os.environ.get("LIFEGUARD_SANDBOX_QUIET"):
    # Benchmarks: no log line per task (the same saving for every configuration).
    for _logger in ("celery.app.trace", "celery.worker.strategy"):
        logging.getLogger(_logger).setLevel(logging.WARNING)

engine = create_engine(driver_url(DRIVER), connect_args=connect_args(DRIVER), **POOL)
async_engine: AsyncEngine = create_async_engine(
    driver_url(ASYNC_DRIVER), connect_args=connect_args(ASYNC_DRIVER), **POOL
)

guard: lifeguard.Lifeguard | None = None
if MODE == "lifeguard":
    options = json.loads(os.environ.get("LIFEGUARD_SANDBOX_OPTIONS", "{}"))
    guard = lifeguard.install(app, application_name_prefix=PREFIX, **options)
    guard.add_engine(engine)
    guard.add_engine(async_engine)


def _session() -> Any:
    return guard.session(engine) if guard is not None else StockSession()


# --- stock mode: the patterns guides recommend ------------------------------------------

StockSession = scoped_session(sessionmaker(bind=engine))
_seed: dict[str, AsyncEngine] = {}  # the seed pattern's engine, made after fork

if MODE == "stock":

    @worker_process_init.connect
    def _after_fork(**_: Any) -> None:
        engine.dispose(close=False)
        _seed["engine"] = create_async_engine(
            driver_url(ASYNC_DRIVER), poolclass=NullPool, connect_args=connect_args(ASYNC_DRIVER)
        )

    @task_postrun.connect
    def _remove_session(**_: Any) -> None:
        StockSession.remove()


# --- the MainProcess using the engines before the worker forks ----------------------------


async def _use_async_engine() -> None:
    async with async_engine.connect() as conn:
        await conn.execute(text("SELECT 1"))


if os.environ.get("LIFEGUARD_SANDBOX_USE_BEFORE_FORK") == "1":
    with engine.connect() as _conn:
        _conn.execute(text("SELECT 1"))
    asyncio.run(_use_async_engine())


# --- sync tasks ------------------------------------------------------------------------------

BACKEND_SQL = text("SELECT pg_backend_pid(), current_setting('application_name')")


@app.task
def touch() -> dict[str, Any]:
    """One query; says which server session and which worker process served it."""
    pid, name = _session().execute(BACKEND_SQL).one()
    return {"backend": pid, "application_name": name, "worker_pid": os.getpid()}


@app.task
def one_query() -> int:
    """The benchmark's sync task."""
    return int(_session().execute(text("SELECT 1")).scalar_one())


@app.task
def sleep_query(seconds: float) -> None:
    """A long statement; sent with a soft_time_limit shorter than it."""
    _session().execute(text("SELECT pg_sleep(:s)"), {"s": seconds})


@app.task
def raw_sleep_query(seconds: float) -> None:
    """A long statement through the driver connection itself, bypassing SQLAlchemy's
    error handling; the connection goes back to the pool while still running it."""
    with engine.connect() as conn:
        driver: Any = conn.connection.driver_connection
        driver.cursor().execute(f"SELECT pg_sleep({float(seconds)})")


@app.task
def write_then_sleep(value: str, seconds: float) -> None:
    """Interrupted inside a transaction that has written."""
    session = _session()
    session.execute(text(f"INSERT INTO {TABLE} (value) VALUES (:v)"), {"v": value})
    session.execute(text("SELECT pg_sleep(:s)"), {"s": seconds})
    session.commit()


@app.task
def write_then_fail(value: str) -> None:
    """Writes, then raises before committing: nothing may remain."""
    session = _session()
    session.execute(text(f"INSERT INTO {TABLE} (value) VALUES (:v)"), {"v": value})
    raise ValueError("task failed mid-transaction")


@app.task
def write(value: str) -> None:
    session = _session()
    session.execute(text(f"INSERT INTO {TABLE} (value) VALUES (:v)"), {"v": value})
    session.commit()


@app.task
def count_items(value: str) -> int:
    query = text(f"SELECT count(*) FROM {TABLE} WHERE value = :v")
    return int(_session().execute(query, {"v": value}).scalar_one())


STATEMENTS = (
    text("SELECT CAST(:a AS integer) + 1"),
    text("SELECT count(*) FROM pg_class WHERE relpages > :a"),
    text("SELECT now(), CAST(:a AS text)"),
)


@app.task
def statements(rounds: int) -> int:
    """Parameterised statements in transactions: psycopg prepares them after 5 uses."""
    session = _session()
    for i in range(rounds):
        for statement in STATEMENTS:
            session.execute(statement, {"a": i if statement is not STATEMENTS[2] else str(i)})
        session.commit()
    return rounds


_leaked: list[Any] = []


@app.task
def leak_connection(value: str) -> int:
    """Checks out a connection, writes without committing, and keeps it in a global."""
    return _leak(value)


def _leak(value: str) -> int:
    conn = engine.connect()
    conn.execute(text(f"INSERT INTO {TABLE} (value) VALUES (:v)"), {"v": value})
    _leaked.append(conn)
    return int(conn.execute(text("SELECT pg_backend_pid()")).scalar_one())


@app.task
def leak_in_greenlet(value: str) -> int:
    """Under gevent: a greenlet the task spawns checks out a connection, writes without
    committing, keeps it in a global and ends; the task waits for it."""
    import gevent

    found: list[int] = []

    def work() -> None:
        found.append(_leak(value))

    gevent.spawn(work).join()
    return found[0]


@app.task
def guard_stats() -> dict[str, Any] | None:
    """lifeguard's counters of the process that runs this task."""
    return guard.stats() if guard is not None else None


# --- exactly-once effects and singleton locks (tests/test_once.py) -------------------------

ONCE_EFFECT = text("INSERT INTO lifeguard_once_effects (key, value, pid) VALUES (:k, :v, :p)")


@app.task(acks_late=True, reject_on_worker_lost=True)
def once_effect(
    key: str | None, value: str, before_commit: float = 0.0, after_commit: float = 0.0
) -> dict[str, Any]:
    """The SQLAlchemy twin of the Django sandbox's once_effect."""
    import time

    with lifeguard.once(key, session=_session()) as block:
        if block.done:
            return {**block.result, "skipped": True}
        _session().execute(ONCE_EFFECT, {"k": block.key, "v": value, "p": os.getpid()})
        time.sleep(before_commit)
        block.result = {"value": value, "pid": os.getpid(), "skipped": False}
    time.sleep(after_commit)
    return dict(block.result)


# --- async tasks ---------------------------------------------------------------------------


async def _async_backend() -> dict[str, Any]:
    assert guard is not None
    session = guard.session(async_engine)
    pid, name = (await session.execute(BACKEND_SQL)).one()
    return {
        "backend": pid,
        "application_name": name,
        "worker_pid": os.getpid(),
        "thread": threading.current_thread().name,
    }


if MODE == "lifeguard" and os.environ.get("LIFEGUARD_SANDBOX_ASYNC_TASKS") != "0":

    @lifeguard.async_task(app)
    async def async_touch() -> dict[str, Any]:
        return await _async_backend()

    @app.task(base=lifeguard.AsyncTask)
    async def async_one_query() -> int:
        """The benchmark's async task: a pooled AsyncEngine on the process's loop."""
        assert guard is not None
        async with async_engine.connect() as conn:
            return int((await conn.execute(text("SELECT 1"))).scalar_one())

    @lifeguard.async_task(app)
    async def async_sleep_query(seconds: float) -> None:
        assert guard is not None
        session = guard.session(async_engine)
        await session.execute(text("SELECT pg_sleep(:s)"), {"s": seconds})

    @lifeguard.async_task(app)
    async def async_statements(rounds: int) -> int:
        """Parameterised statements in transactions: asyncpg prepares every one."""
        for i in range(rounds):
            async with async_engine.begin() as conn:
                for statement in STATEMENTS:
                    value = i if statement is not STATEMENTS[2] else str(i)
                    await conn.execute(statement, {"a": value})
        return rounds

    @app.task(base=lifeguard.AsyncTask, acks_late=True, reject_on_worker_lost=True)
    @lifeguard.once_task(key=lambda key, value: key, session=lambda: guard.session(async_engine))
    async def async_once_effect(key: str, value: str) -> dict[str, Any]:
        """The async decorator form: an AsyncSession carries the key."""
        assert guard is not None
        session = guard.session(async_engine)
        await session.execute(ONCE_EFFECT, {"k": key, "v": value, "p": os.getpid()})
        return {"value": value, "pid": os.getpid()}

elif MODE == "stock":

    @app.task
    def async_one_query() -> int:
        """The seed pattern: a new loop and, through NullPool, a new connection per task."""

        async def body() -> int:
            async with _seed["engine"].connect() as conn:
                return int((await conn.execute(text("SELECT 1"))).scalar_one())

        return asyncio.run(body())
