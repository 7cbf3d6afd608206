"""Django connections in a prefork worker: stock Celery against lifeguard, side by side.

A real `celery worker -P prefork -c 2` runs one-query tasks against a PostgreSQL configured
the way production servers are (TLS and scram-sha-256 password authentication, started
here from the system's binaries). Each configuration runs in the same session, rounds
interleaved; the table shows medians over the rounds:

  stock, CONN_MAX_AGE=600      Celery's Django fixup as shipped
  stock, native pool           the same with Django's pool (OPTIONS["pool"])
  blind reuse                  the fixup with CELERY_DB_REUSE_MAX (no checks at all)
  no-DB task (ceiling)         stock Celery running a task that touches no database
  lifeguard                    lifeguard.install(app), CONN_MAX_AGE=600
  lifeguard, native pool       lifeguard.install(app) with Django's pool

New server sessions come from pg_stat_database.sessions, read after the worker stopped
(every session's statistics are flushed by then).

    python benchmarks/django_reuse.py --tasks 2000 --runs 3
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from dataclasses import dataclass

from celery import Celery

from lifeguard.sandbox.bench import Measure, medians, production_like_server, timed_run
from lifeguard.sandbox.django_project import TASKS, sandbox_worker
from lifeguard.sandbox.postgres import PostgresServer
from lifeguard.sandbox.redis import find_redis

POOL = '{"min_size": 1, "max_size": 2}'


@dataclass(frozen=True)
class Config:
    label: str
    mode: str
    task: str = "one_query"
    conn_max_age: str = "600"
    pool: str = ""


CONFIGS = [
    Config("stock, CONN_MAX_AGE=600", "stock"),
    Config("stock, native pool", "stock", conn_max_age="0", pool=POOL),
    Config("blind reuse (CELERY_DB_REUSE_MAX)", "reuse_max"),
    Config("no-DB task (ceiling)", "stock", task="noop"),
    Config("lifeguard", "lifeguard"),
    Config("lifeguard, native pool", "lifeguard", conn_max_age="0", pool=POOL),
]


def run_once(
    config: Config, server: PostgresServer, db_url: str, redis: str, *, n: int, concurrency: int
) -> Measure:
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    client = Celery("bench", broker=redis, backend=redis)
    worker = sandbox_worker(
        db_url=db_url,
        broker_url=redis,
        queue=queue,
        mode=config.mode,
        prefix="bench",
        conn_max_age=config.conn_max_age,
        native_pool=config.pool,
        quiet=True,
        concurrency=concurrency,
    )
    try:
        return timed_run(worker, client, f"{TASKS}.{config.task}", n=n, server=server)
    finally:
        client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=2)
    parser.add_argument("--plain", action="store_true", help="no TLS")
    args = parser.parse_args()

    embedded, server, db_url = production_like_server(plain=args.plain)
    redis = f"{find_redis()}/13"
    measures: dict[str, list[Measure]] = {c.label: [] for c in CONFIGS}
    try:
        for round_no in range(args.runs):
            order = CONFIGS[round_no % len(CONFIGS) :] + CONFIGS[: round_no % len(CONFIGS)]
            for config in order:
                m = run_once(
                    config, server, db_url, redis, n=args.tasks, concurrency=args.concurrency
                )
                measures[config.label].append(m)
                print(
                    f"round {round_no + 1}: {config.label:<36} {m.tasks_per_s:7.1f} tasks/s "
                    f"{m.sessions:6d} sessions",
                    file=sys.stderr,
                    flush=True,
                )
    finally:
        embedded.destroy()

    med = {label: medians(ms) for label, ms in measures.items()}
    tls = "TLS + scram-sha-256" if server.tls else "plaintext + scram-sha-256"
    print(
        f"\nprefork, concurrency {args.concurrency}, {args.tasks} one-query tasks, "
        f"PostgreSQL over {tls}, median of {args.runs} runs\n"
    )
    print("| configuration | tasks/s | new sessions | sessions per 1,000 tasks |")
    print("| --- | ---: | ---: | ---: |")
    for config in CONFIGS:
        rate, new = med[config.label]
        per_k = new * 1000 / (args.tasks + 20)
        print(f"| {config.label} | {rate:.0f} | {new:.0f} | {per_k:.1f} |")

    def ratio(a: str, b: str) -> float:
        return med[a][0] / med[b][0]

    lg, lgp = "lifeguard", "lifeguard, native pool"
    print()
    print(f"lifeguard / stock:                {ratio(lg, CONFIGS[0].label):.2f}x  (target >= 3.5x)")
    print(f"lifeguard / blind reuse:          {ratio(lg, CONFIGS[2].label):.2f}x  (target >= 0.9x)")
    print(
        f"lifeguard / no-DB ceiling:        {ratio(lg, CONFIGS[3].label):.2f}x  (target >= 0.85x)"
    )
    print(f"lifeguard pool / stock pool:      {ratio(lgp, CONFIGS[1].label):.2f}x  (target >= 5x)")
    per_k = med[lg][1] * 1000 / (args.tasks + 20)
    print(f"lifeguard sessions / 1,000 tasks: {per_k:.1f}  (target <= {args.concurrency})")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
