"""Cost of one ``lifeguard monitor`` snapshot at 150 worker backends (target: < 20 ms).

Starts its own PostgreSQL (max_connections=300, so the shared local server's 100 slots
are left alone), opens N sessions named like lifeguard workers' (two thirds idle, one
third idle in transaction), then times, over the same connection, alternately:

* ``guide``: the query operators run by hand today (the seed guide's
  ``SELECT count(*), state FROM pg_stat_activity WHERE datname = ... GROUP BY state``);
* ``snapshot``: :func:`lifeguard.monitor.snapshot.take_snapshot` (one round trip, every
  backend parsed and attributed, session counters, slots, privileges);
* ``report``: a whole :meth:`Monitor.report` (snapshot + thresholds), as each refresh of
  ``lifeguard monitor`` and each ``lifeguard check`` does.

Prints the median milliseconds of each per run, the median over runs, and the ratios
to the guide's query. Short run:  .venv/bin/python benchmarks/snapshot.py --runs 3
"""

from __future__ import annotations

import argparse
import statistics
from collections.abc import Callable
from typing import Any

import psycopg

from _harness import median_ms
from lifeguard.demo.postgres import EmbeddedPostgres
from lifeguard.monitor.report import Monitor
from lifeguard.monitor.snapshot import take_snapshot
from lifeguard.monitor.target import connect, from_url
from lifeguard.monitor.thresholds import Thresholds

PREFIX = "bench"
GUIDE = "SELECT count(*), state FROM pg_stat_activity WHERE datname = %s GROUP BY state"


def open_sessions(kwargs: dict[str, Any], n: int) -> list[psycopg.Connection[Any]]:
    sessions = []
    for i in range(n):
        in_transaction = i % 3 == 2
        conn = psycopg.connect(
            **kwargs,
            application_name=f"{PREFIX}:worker-host-{i % 5}:{10000 + i}",
            autocommit=not in_transaction,
        )
        conn.execute("SELECT 1")
        sessions.append(conn)
    return sessions


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backends", type=int, default=150)
    parser.add_argument("--rounds", type=int, default=200, help="snapshots per run")
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()

    embedded = EmbeddedPostgres(max_connections=args.backends + 50)
    server = embedded.start()
    try:
        server.create_database("bench")
        sessions = open_sessions(server.connect_kwargs("bench"), args.backends)
        target = from_url(server.url("bench"), "benchmark")
        conn = connect(target)
        monitor = Monitor(target, PREFIX, Thresholds())
        snapshot = take_snapshot(conn, PREFIX)
        assert len(snapshot.worker_backends) == args.backends, len(snapshot.worker_backends)

        def guide() -> None:
            with conn.cursor() as cur:
                cur.execute(GUIDE, ["bench"])
                cur.fetchall()

        cases: dict[str, Callable[[], Any]] = {
            "guide": guide,
            "snapshot": lambda: take_snapshot(conn, PREFIX),
            "report": monitor.report,
        }
        for action in cases.values():  # warm up: prepared statements, caches
            median_ms(action, 10)
        results: dict[str, list[float]] = {name: [] for name in cases}
        print(f"{args.backends} worker backends, {args.rounds} rounds per run (median ms)")
        for run in range(args.runs):
            for name, action in cases.items():
                results[name].append(median_ms(action, args.rounds))
            print(f"run {run + 1}: " + "  ".join(f"{n} {v[-1]:.2f}" for n, v in results.items()))
        overall = {name: statistics.median(values) for name, values in results.items()}
        print("median: " + "  ".join(f"{n} {v:.2f} ms" for n, v in overall.items()))
        print(
            f"ratio to the guide's query: snapshot {overall['snapshot'] / overall['guide']:.1f}x"
            f"  report {overall['report'] / overall['guide']:.1f}x"
        )
        verdict = "under" if overall["report"] < 20 else "OVER"
        print(f"report {overall['report']:.2f} ms: {verdict} the 20 ms target")
        monitor.close()
        conn.close()
        for session in sessions:
            session.close()
    finally:
        embedded.destroy()


if __name__ == "__main__":
    main()
