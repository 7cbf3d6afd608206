"""Fixtures for the SQLAlchemy and async-task scenarios: the sqla sandbox app's workers.

conftest.py imports the fixtures, so every test module can use them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from celery import Celery

from lifeguard.sandbox.worker import CeleryWorker

from .support import Database, SandboxTasks, stop_workers

SQLA_APP = "lifeguard.sandbox.sqla_app"


@pytest.fixture
def sqla_tasks(celery_client: Celery, prefix: str) -> SandboxTasks:
    return SandboxTasks(celery_client, queue=f"q-{prefix}", module=SQLA_APP)


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
    stop_workers(started, request, test_db, prefix)
