"""What the database itself reports, for the scenarios' assertions."""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from lifeguard.demo.postgres import EmbeddedPostgres, PostgresServer
from lifeguard.demo.project import TASKS


@dataclass
class Backend:
    pid: int
    application_name: str
    state: str | None
    query: str | None
    xact_age: float | None


class Database:
    """One test database on a real server, seen through pg_stat_activity/pg_stat_database."""

    def __init__(self, server: PostgresServer, name: str) -> None:
        self.server = server
        self.name = name

    @property
    def url(self) -> str:
        return self.server.url(self.name)

    def execute(self, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        import psycopg

        with psycopg.connect(**self.server.connect_kwargs(self.name), autocommit=True) as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def admin(self, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
        with self.server.admin() as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else []

    def backends(self, prefix: str) -> list[Backend]:
        rows = self.admin(
            "SELECT pid, application_name, state, query, "
            "extract(epoch FROM now() - xact_start)::float "
            "FROM pg_stat_activity WHERE datname = %s AND application_name LIKE %s",
            [self.name, prefix + ":%"],
        )
        return [Backend(*row) for row in rows]

    def wait_for_no_backends(self, prefix: str, timeout: float = 10.0) -> list[Backend]:
        deadline = time.monotonic() + timeout
        while True:
            left = self.backends(prefix)
            if not left or time.monotonic() > deadline:
                return left
            time.sleep(0.1)

    def sessions(self) -> int:
        """pg_stat_database.sessions of this database (flushed when sessions end)."""
        return self.server.session_count(self.name)

    def running(self, statement_start: str, timeout: float = 0.0) -> list[int]:
        """Backends still executing a statement that starts so, after up to ``timeout`` s."""
        deadline = time.monotonic() + timeout
        while True:
            rows = self.admin(
                "SELECT pid FROM pg_stat_activity WHERE datname = %s AND state = 'active' "
                "AND query LIKE %s",
                [self.name, statement_start + "%"],
            )
            if not rows or time.monotonic() >= deadline:
                return [row[0] for row in rows]
            time.sleep(0.05)

    def terminate(self, prefix: str) -> int:
        rows = self.admin(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE datname = %s AND application_name LIKE %s",
            [self.name, prefix + ":%"],
        )
        return int(rows[0][0])


@contextlib.contextmanager
def scratch_database(server: PostgresServer, tag: str) -> Iterator[Database]:
    """A new database of the scenario's own, dropped afterwards: only its sessions are in it."""
    name = f"lifeguard_{tag}_{uuid.uuid4().hex[:8]}"
    server.create_database(name)
    try:
        yield Database(server, name)
    finally:
        server.drop_database(name)


@contextlib.contextmanager
def few_slots_server(max_connections: int, superuser_reserved: int) -> Iterator[PostgresServer]:
    """A private server with few connection slots (``max_connections`` minus
    ``superuser_reserved`` for ordinary roles), destroyed afterwards."""
    embedded = EmbeddedPostgres(
        max_connections=max_connections,
        settings={"superuser_reserved_connections": str(superuser_reserved)},
    )
    try:
        yield embedded.start()
    finally:
        embedded.destroy()


class SandboxTasks:
    """Sends the sandbox's tasks to one test's queue and collects what they return."""

    def __init__(self, app: Any, queue: str, module: str = TASKS) -> None:
        self.app = app
        self.queue = queue
        self.module = module  # where the tasks are defined: their names start so

    def send(self, name: str, *args: Any, **options: Any) -> Any:
        return self.app.send_task(f"{self.module}.{name}", args=args, queue=self.queue, **options)

    def run(self, name: str, *args: Any, timeout: float = 60, **options: Any) -> Any:
        return self.send(name, *args, **options).get(timeout=timeout)

    def run_many(self, name: str, n: int, *args: Any, timeout: float = 180) -> list[Any]:
        results = [self.send(name, *args) for _ in range(n)]
        return [result.get(timeout=timeout) for result in results]

    def outcome(self, name: str, *args: Any, timeout: float = 60, **options: Any) -> Any:
        """The task's state and result (or exception), without raising."""
        result = self.send(name, *args, **options)
        result.get(timeout=timeout, propagate=False)
        return result.state, result.result


def worker_fixture(
    build: Callable[..., Any],
    defaults: dict[str, Any],
    request: pytest.FixtureRequest,
    db: Database,
    prefix: str,
) -> Iterator[Callable[..., Any]]:
    """The body of a worker-factory fixture: ``start(**knobs)`` builds a worker with
    ``build(**defaults, **knobs)`` and starts it (unless ``start=False``); at the end
    every worker is stopped and the test's sessions must all be gone."""
    started: list[Any] = []

    def start(*, start: bool = True, **knobs: Any) -> Any:
        worker = build(**{**defaults, **{k: v for k, v in knobs.items() if v is not None}})
        started.append(worker)
        if start:
            worker.start()
        return worker

    yield start
    stop_workers(started, request, db, prefix)


def stop_workers(
    started: list[Any], request: pytest.FixtureRequest, db: Database, prefix: str
) -> None:
    """Stop a test's workers, show their logs if it failed, and check that no session of
    the test's prefix is left: a worker that shuts down leaves zero sessions behind."""
    for worker in started:
        worker.stop()
    failed = getattr(request.node, "rep_call", None)
    for worker in started:
        if failed is not None and failed.failed:
            print(f"--- log of {worker.hostname} ---\n{worker.log[-6000:]}")
    if started:
        left = db.wait_for_no_backends(prefix)
        assert left == [], f"sessions left behind after worker shutdown: {left}"


def assert_clean(db: Database, prefix: str, most: int) -> None:
    """At most ``most`` worker sessions; none idle in transaction; none still running."""
    backends = db.backends(prefix)
    assert len(backends) <= most, backends
    assert not [b for b in backends if b.state and b.state.startswith("idle in transaction")]
    assert not [b for b in backends if b.state == "active"], backends
