"""SQLAlchemy in a prefork worker: the seed pattern and stock sessions against lifeguard.

A real `celery worker -P prefork -c 2` runs one-query tasks against a PostgreSQL
configured the way production servers are (TLS and scram-sha-256 password
authentication, started here from the system's binaries). Every configuration runs in
the same session, rounds interleaved; the table shows medians over the rounds:

  seed pattern (asyncpg|psycopg)   asyncio.run() per task, NullPool AsyncEngine created in
                                   worker_process_init (shared/seeds/004)
  lifeguard AsyncTask (...)        async def task on lifeguard's per-process loop, pooled
                                   AsyncEngine registered with guard.add_engine()
  stock scoped_session             sync task, scoped_session + task_postrun remove(),
                                   engine.dispose(close=False) in worker_process_init
  lifeguard guard.session()        sync task, the task's session from lifeguard

Each engine has pool_size=1 (a prefork child runs one task at a time). New server
sessions come from pg_stat_database.sessions, read after the worker stopped.

    python benchmarks/sqlalchemy_async.py --tasks 2000 --runs 3
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid
from dataclasses import dataclass

from celery import Celery

from lifeguard.sandbox.bench import Measure, medians, production_like_server, timed_run
from lifeguard.sandbox.postgres import PostgresServer
from lifeguard.sandbox.redis import find_redis
from lifeguard.sandbox.sqla_worker import APP, sandbox_worker

POOL_SIZE = 1


@dataclass(frozen=True)
class Config:
    label: str
    mode: str
    task: str
    async_driver: str = "asyncpg"


SEED_ASYNCPG = Config("seed pattern (asyncpg)", "stock", "async_one_query")
LG_ASYNCPG = Config("lifeguard AsyncTask (asyncpg)", "lifeguard", "async_one_query")
SEED_PSYCOPG = Config("seed pattern (psycopg)", "stock", "async_one_query", "psycopg")
LG_PSYCOPG = Config("lifeguard AsyncTask (psycopg)", "lifeguard", "async_one_query", "psycopg")
STOCK_SYNC = Config("stock scoped_session (psycopg)", "stock", "one_query")
LG_SYNC = Config("lifeguard guard.session() (psycopg)", "lifeguard", "one_query")
CONFIGS = [SEED_ASYNCPG, LG_ASYNCPG, SEED_PSYCOPG, LG_PSYCOPG, STOCK_SYNC, LG_SYNC]


def run_once(
    config: Config, server: PostgresServer, db_url: str, redis: str, *, n: int, concurrency: int
) -> Measure:
    client = Celery("bench", broker=redis, backend=redis)
    worker = sandbox_worker(
        db_url=db_url,
        broker_url=redis,
        queue=f"bench-{uuid.uuid4().hex[:8]}",
        mode=config.mode,
        prefix="bench",
        async_driver=config.async_driver,
        pool_size=POOL_SIZE,
        quiet=True,
        concurrency=concurrency,
    )
    try:
        return timed_run(worker, client, f"{APP}.{config.task}", n=n, server=server)
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
                    f"round {round_no + 1}: {config.label:<38} {m.tasks_per_s:7.1f} tasks/s "
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
        f"pool_size={POOL_SIZE}, PostgreSQL over {tls}, median of {args.runs} runs\n"
    )
    print("| configuration | tasks/s | new sessions |")
    print("| --- | ---: | ---: |")
    for config in CONFIGS:
        rate, new = med[config.label]
        print(f"| {config.label} | {rate:.0f} | {new:.0f} |")

    def ratio(a: Config, b: Config) -> float:
        return med[a.label][0] / med[b.label][0]

    most = args.concurrency * POOL_SIZE
    print()
    for name, lg, seed in (
        ("asyncpg", LG_ASYNCPG, SEED_ASYNCPG),
        ("psycopg", LG_PSYCOPG, SEED_PSYCOPG),
    ):
        print(f"lifeguard / seed pattern, {name}:  {ratio(lg, seed):.2f}x  (target >= 3x)")
    print(f"lifeguard / stock scoped_session:   {ratio(LG_SYNC, STOCK_SYNC):.2f}x")
    for config in (LG_ASYNCPG, LG_PSYCOPG, LG_SYNC):
        print(
            f"sessions, {config.label}: {med[config.label][1]:.0f}  "
            f"(target <= concurrency x pool size = {most})"
        )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
