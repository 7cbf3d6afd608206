"""What the benchmarks share: a production-like server and one timed run of a worker.

The server is started from the system's binaries with TLS and scram-sha-256 password
authentication, as production servers are configured. A run starts a real worker, warms
it up, times ``n`` tasks from first send to last result, stops the worker and reads the
new server sessions from ``pg_stat_database.sessions`` (flushed once sessions ended).
"""

from __future__ import annotations

import statistics
import sys
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass

from .postgres import EmbeddedPostgres, PostgresServer
from .worker import CeleryWorker

WARM_UP_TASKS = 20


@dataclass
class Measure:
    tasks_per_s: float
    sessions: int


def production_like_server(
    database: str = "bench", *, plain: bool = False
) -> tuple[EmbeddedPostgres, PostgresServer, str]:
    """An embedded server (TLS unless ``plain`` or unsupported) with a database owned by a
    password role; returns the server and that role's URL."""
    password = uuid.uuid4().hex
    embedded = EmbeddedPostgres(tls=False, password=password)
    tls = not plain and embedded.supports_tls()
    if not tls and not plain:
        print("note: these PostgreSQL binaries have no TLS; measuring without it", file=sys.stderr)
    embedded = EmbeddedPostgres(tls=tls, password=password)
    server = embedded.start()
    server.create_database(database)
    server.ensure_role("bench", "bench-password")
    with server.admin(database) as conn:
        conn.execute("GRANT ALL ON SCHEMA public TO bench")
    return embedded, server, server.url(database, user="bench", password="bench-password")


def timed_run(
    worker: CeleryWorker,
    client: object,
    task: str,
    *,
    n: int,
    server: PostgresServer,
    database: str = "bench",
) -> Measure:
    """Start ``worker``, run ``n`` tasks named ``task`` through ``client``, stop it."""
    from celery.result import ResultSet

    send = client.send_task  # type: ignore[attr-defined]
    before = server.session_count(database)
    worker.start()
    try:
        # Warm up: children imported everything, first connections made.
        warm = [send(task, queue=worker.queue) for _ in range(WARM_UP_TASKS)]
        ResultSet(warm).join_native(timeout=120)
        started = time.perf_counter()
        ResultSet([send(task, queue=worker.queue) for _ in range(n)]).join_native(timeout=600)
        elapsed = time.perf_counter() - started
    finally:
        worker.stop()
    time.sleep(0.5)
    return Measure(tasks_per_s=n / elapsed, sessions=server.session_count(database) - before)


def medians(measures: Iterable[Measure]) -> tuple[float, float]:
    """Median tasks/s and median new sessions of several runs."""
    listed = list(measures)
    return (
        statistics.median(m.tasks_per_s for m in listed),
        statistics.median(m.sessions for m in listed),
    )
