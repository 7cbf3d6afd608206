"""Fixtures for the SQLAlchemy and async-task scenarios: the sqla sandbox app's workers.

Import the fixtures into a test module with ``from .sqla_support import *``-style names.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery

from lifeguard.sandbox.worker import CeleryWorker

from .support import Database

SQLA_APP = "lifeguard.sandbox.sqla_app"


class SqlaTasks:
    """Sends the sqla sandbox's tasks to one test's queue."""

    def __init__(self, app: Celery, queue: str) -> None:
        self.app = app
        self.queue = queue

    def send(self, name: str, *args: Any, **options: Any) -> Any:
        return self.app.send_task(f"{SQLA_APP}.{name}", args=args, queue=self.queue, **options)

    def run(self, name: str, *args: Any, timeout: float = 60, **options: Any) -> Any:
        return self.send(name, *args, **options).get(timeout=timeout)

    def run_many(self, name: str, n: int, *args: Any, timeout: float = 120) -> list[Any]:
        results = [self.send(name, *args) for _ in range(n)]
        return [result.get(timeout=timeout) for result in results]

    def outcome(self, name: str, *args: Any, timeout: float = 60, **options: Any) -> Any:
        """The task's state and result (or exception), without raising."""
        result = self.send(name, *args, **options)
        result.get(timeout=timeout, propagate=False)
        return result.state, result.result


@pytest.fixture
def sqla_tasks(celery_client: Celery, prefix: str) -> SqlaTasks:
    return SqlaTasks(celery_client, queue=f"q-{prefix}")


SqlaWorkerFactory = Callable[..., CeleryWorker]


@pytest.fixture
def sqla_worker(
    test_db: Database, redis_url: str, prefix: str, request: pytest.FixtureRequest
) -> Iterator[SqlaWorkerFactory]:
    """Start sqla sandbox workers; each is stopped at the end of the test, after which no
    backend of the test's prefix may remain."""
    started: list[CeleryWorker] = []

    def start(
        *,
        pool: str = "prefork",
        concurrency: int = 1,
        mode: str = "lifeguard",
        driver: str = "psycopg",
        async_driver: str = "asyncpg",
        pool_size: int = 1,
        use_before_fork: bool = False,
        db_url: str | None = None,
        options: str = "{}",
        start: bool = True,
    ) -> CeleryWorker:
        worker = CeleryWorker(
            SQLA_APP,
            pool=pool,
            concurrency=concurrency,
            queue=f"q-{prefix}",
            env={
                "LIFEGUARD_SANDBOX_DB_URL": db_url or test_db.url,
                "LIFEGUARD_SANDBOX_BROKER_URL": f"{redis_url}/14",
                "LIFEGUARD_SANDBOX_QUEUE": f"q-{prefix}",
                "LIFEGUARD_SANDBOX_MODE": mode,
                "LIFEGUARD_SANDBOX_PREFIX": prefix,
                "LIFEGUARD_SANDBOX_DRIVER": driver,
                "LIFEGUARD_SANDBOX_ASYNC_DRIVER": async_driver,
                "LIFEGUARD_SANDBOX_POOL_SIZE": str(pool_size),
                "LIFEGUARD_SANDBOX_USE_BEFORE_FORK": "1" if use_before_fork else "0",
                "LIFEGUARD_SANDBOX_OPTIONS": options,
            },
        )
        started.append(worker)
        if start:
            worker.start()
        return worker

    yield start
    for worker in started:
        worker.stop()
    failed = getattr(request.node, "rep_call", None)
    for worker in started:
        if failed is not None and failed.failed:
            print(f"--- log of {worker.hostname} ---\n{worker.log[-8000:]}")
    if started:
        left = test_db.wait_for_no_backends(prefix)
        assert left == [], f"sessions left behind after worker shutdown: {left}"


def assert_clean(db: Database, prefix: str, most: int) -> None:
    """At most ``most`` worker sessions; none idle in transaction; none running."""
    backends = db.backends(prefix)
    assert len(backends) <= most, backends
    assert not [b for b in backends if b.state and b.state.startswith("idle in transaction")]
    assert not [b for b in backends if b.state == "active"], backends


def running_sleeps(db: Database, timeout: float = 5.0) -> list[tuple[Any, ...]]:
    """``pg_sleep`` statements still running in the test database (waits for them to go)."""
    deadline = time.monotonic() + timeout
    while True:
        rows = db.admin(
            "SELECT pid, state, query FROM pg_stat_activity "
            "WHERE datname = %s AND query ILIKE 'SELECT pg_sleep%%' AND state = 'active'",
            [db.name],
        )
        if not rows or time.monotonic() > deadline:
            return rows
        time.sleep(0.05)
