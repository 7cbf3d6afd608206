"""Fixtures for the SQLAlchemy and async-task scenarios: the sqla sandbox app's workers.

conftest.py imports the fixtures, so every test module can use them.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from celery import Celery

from lifeguard.demo.worker import CeleryWorker
from tests.harness.sqla_worker import APP as SQLA_APP
from tests.harness.sqla_worker import sandbox_worker
from tests.support import Database, SandboxTasks, worker_fixture


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
    yield from worker_fixture(
        sandbox_worker,
        {
            "db_url": test_db.url,
            "broker_url": f"{redis_url}/14",
            "queue": f"q-{prefix}",
            "prefix": prefix,
            "concurrency": 1,
        },
        request,
        test_db,
        prefix,
    )
