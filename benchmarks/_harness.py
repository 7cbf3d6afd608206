"""What the benchmarks share: a production-like server and one timed run of a worker.

The server is started from the system's binaries with TLS and scram-sha-256 password
authentication, as production servers are configured. A run starts a real worker, warms
it up, times ``n`` tasks from first send to last result, stops the worker and reads the
new server sessions from ``pg_stat_database.sessions`` (flushed once sessions ended).
"""

from __future__ import annotations

import os
import statistics
import sys
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

from lifeguard.demo.postgres import EmbeddedPostgres, PostgresServer
from lifeguard.demo.worker import CeleryWorker

# The benchmarks run the test harness's sample apps (tests/harness): the checkout's root
# goes on the path, here and in the workers they start.
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (ROOT, os.environ.get("PYTHONPATH", "")) if p)

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
    embedded = EmbeddedPostgres(tls=False if plain else None, password=uuid.uuid4().hex)
    if not embedded.tls and not plain:
        print("note: these PostgreSQL binaries have no TLS; measuring without it", file=sys.stderr)
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


def median_ms(action: Callable[[], Any], rounds: int) -> float:
    """Median milliseconds of ``rounds`` calls of ``action``."""
    timings = []
    for _ in range(rounds):
        started = time.perf_counter()
        action()
        timings.append((time.perf_counter() - started) * 1000)
    return statistics.median(timings)


def medians(measures: Iterable[Measure]) -> tuple[float, float]:
    """Median tasks/s and median new sessions of several runs."""
    listed = list(measures)
    return (
        statistics.median(m.tasks_per_s for m in listed),
        statistics.median(m.sessions for m in listed),
    )


def parse_args(description: str) -> Any:
    """The options every benchmark takes: --tasks, --runs, --concurrency, --plain."""
    import argparse

    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--plain", action="store_true", help="no TLS")
    return parser.parse_args()


def interleaved_rounds(
    configs: Sequence[Any], runs: int, measure: Callable[[Any], Measure]
) -> dict[str, list[Measure]]:
    """Measure every config (anything with a ``label``) once per round, starting each
    round one config further so no config always runs first; progress on stderr."""
    measures: dict[str, list[Measure]] = {c.label: [] for c in configs}
    width = max(len(c.label) for c in configs) + 2
    for round_no in range(runs):
        shift = round_no % len(configs)
        for config in [*configs[shift:], *configs[:shift]]:
            m = measure(config)
            measures[config.label].append(m)
            print(
                f"round {round_no + 1}: {config.label:<{width}} {m.tasks_per_s:7.1f} tasks/s "
                f"{m.sessions:6d} sessions",
                file=sys.stderr,
                flush=True,
            )
    return measures


@dataclass
class Results:
    args: Any  # the parsed command line
    tls: str  # how the server was reached, for the table's caption
    medians: dict[str, tuple[float, float]]  # label -> (tasks/s, new sessions)
    rounds: dict[str, list[Measure]] = field(default_factory=dict)  # label -> per round

    def paired_ratio(self, label: str, against: str) -> float:
        """The median over rounds of ``label``'s tasks/s over ``against``'s in the same
        round: on a shared machine, load drifts between rounds more than within one."""
        pairs = zip(self.rounds[label], self.rounds[against], strict=True)
        return statistics.median(a.tasks_per_s / b.tasks_per_s for a, b in pairs)


WorkerBuilder = Callable[[Any, str, str, int], tuple[CeleryWorker, str]]


def run_benchmark(description: str, configs: Sequence[Any], build: WorkerBuilder) -> Results:
    """The whole measurement: command line, server, interleaved rounds, medians.

    ``build(config, db_url, broker_url, concurrency)`` returns a not yet started worker
    on a queue of its own and the name of the task to time.
    """
    import uuid as _uuid

    from celery import Celery

    from lifeguard.demo.redis import find_redis

    args = parse_args(description)
    embedded, server, db_url = production_like_server(plain=args.plain)
    redis = f"{find_redis()}/13"

    def measure(config: Any) -> Measure:
        client = Celery(f"bench-{_uuid.uuid4().hex[:6]}", broker=redis, backend=redis)
        worker, task = build(config, db_url, redis, args.concurrency)
        try:
            return timed_run(worker, client, task, n=args.tasks, server=server)
        finally:
            client.close()

    try:
        measures = interleaved_rounds(configs, args.runs, measure)
    finally:
        embedded.destroy()
    tls = "TLS + scram-sha-256" if server.tls else "plaintext + scram-sha-256"
    return Results(args, tls, {label: medians(ms) for label, ms in measures.items()}, measures)
