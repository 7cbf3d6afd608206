"""Real services for every scenario: PostgreSQL, Redis, and celery worker processes.

Servers come from LIFEGUARD_TEST_DATABASE_URL / LIFEGUARD_TEST_BROKER_URL when set,
else the local ones when they answer, else embedded ones started for the session
(see lifeguard.demo). Each session works in a database of its own, dropped at the end.
"""

from __future__ import annotations

import uuid
from collections.abc import Callable, Iterator

import pytest
from celery import Celery

from lifeguard.demo.postgres import PostgresServer, find_postgres
from lifeguard.demo.redis import find_redis
from lifeguard.demo.worker import CeleryWorker
from tests.harness.django_worker import sandbox_worker as django_sandbox_worker
from tests.sqla_support import sqla_tasks, sqla_worker  # noqa: F401  (fixtures)
from tests.support import Database, SandboxTasks, scratch_database, worker_fixture


@pytest.fixture(scope="session")
def pg() -> PostgresServer:
    return find_postgres()


@pytest.fixture(scope="session")
def test_db(pg: PostgresServer) -> Iterator[Database]:
    with scratch_database(pg, "t") as db:
        db.execute(
            "CREATE TABLE lifeguard_sandbox_items (id serial PRIMARY KEY, value text NOT NULL)"
        )
        yield db


@pytest.fixture(scope="session")
def redis_url() -> str:
    return find_redis()


@pytest.fixture
def prefix() -> str:
    """A unique application_name prefix: this test's worker backends and nobody else's."""
    return f"lgt{uuid.uuid4().hex[:8]}"


WorkerFactory = Callable[..., CeleryWorker]


@pytest.fixture
def sandbox_worker(
    test_db: Database, redis_url: str, prefix: str, request: pytest.FixtureRequest
) -> Iterator[WorkerFactory]:
    """Start sandbox workers; every one is stopped at the end of the test.

    After the stop, no backend of the test's prefix may remain: a worker that shuts
    down leaves zero sessions behind, in every scenario.
    """
    yield from worker_fixture(
        django_sandbox_worker,
        {
            "db_url": test_db.url,
            "broker_url": f"{redis_url}/14",
            "queue": f"q-{prefix}",
            "prefix": prefix,
        },
        request,
        test_db,
        prefix,
    )


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report = outcome.get_result()
    setattr(item, f"rep_{report.when}", report)


@pytest.fixture(scope="session")
def celery_client(redis_url: str) -> Celery:
    """A plain Celery client: sends tasks by name, reads results. No Django here."""
    return Celery("lifeguard-tests", broker=f"{redis_url}/14", backend=f"{redis_url}/14")


@pytest.fixture
def tasks(celery_client: Celery, prefix: str) -> SandboxTasks:
    return SandboxTasks(celery_client, queue=f"q-{prefix}")
