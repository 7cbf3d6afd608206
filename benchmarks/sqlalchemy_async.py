"""SQLAlchemy in a prefork worker: the usual asyncio.run() + NullPool recipe, stock sessions
and lifeguard, side by side.

A real `celery worker -P prefork -c 2` runs one-query tasks against a PostgreSQL
configured the way production servers are (TLS and scram-sha-256 password
authentication, started here from the system's binaries). Every configuration runs in
the same session, rounds interleaved; the table shows medians over the rounds:

  usual recipe (asyncpg|psycopg)   asyncio.run() per task, NullPool AsyncEngine created in
                                   worker_process_init, as the common guides recommend
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

import os
import uuid
from dataclasses import dataclass

from tests.harness.sqla_worker import APP, sandbox_worker

from _harness import run_benchmark
from lifeguard.demo.worker import CeleryWorker

POOL_SIZE = 1


@dataclass(frozen=True)
class Config:
    label: str
    mode: str
    task: str
    async_driver: str = "asyncpg"


RECIPE_ASYNCPG = Config(
    "usual recipe: asyncio.run + NullPool (asyncpg)", "stock", "async_one_query"
)
LG_ASYNCPG = Config("lifeguard AsyncTask (asyncpg)", "lifeguard", "async_one_query")
RECIPE_PSYCOPG = Config("usual recipe (psycopg)", "stock", "async_one_query", "psycopg")
LG_PSYCOPG = Config("lifeguard AsyncTask (psycopg)", "lifeguard", "async_one_query", "psycopg")
STOCK_SYNC = Config("stock scoped_session (psycopg)", "stock", "one_query")
LG_SYNC = Config("lifeguard guard.session() (psycopg)", "lifeguard", "one_query")
CONFIGS = [RECIPE_ASYNCPG, LG_ASYNCPG, RECIPE_PSYCOPG, LG_PSYCOPG, STOCK_SYNC, LG_SYNC]


def build(config: Config, db_url: str, redis: str, concurrency: int) -> tuple[CeleryWorker, str]:
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
    return worker, f"{APP}.{config.task}"


def main() -> None:
    results = run_benchmark(__doc__.split("\n")[0], CONFIGS, build)
    args, med, tls = results.args, results.medians, results.tls
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
    for name, lg, recipe in (
        ("asyncpg", LG_ASYNCPG, RECIPE_ASYNCPG),
        ("psycopg", LG_PSYCOPG, RECIPE_PSYCOPG),
    ):
        print(f"lifeguard / usual recipe, {name}:  {ratio(lg, recipe):.2f}x  (target >= 3x)")
    print(f"lifeguard / stock scoped_session:   {ratio(LG_SYNC, STOCK_SYNC):.2f}x")
    for config in (LG_ASYNCPG, LG_PSYCOPG, LG_SYNC):
        print(
            f"sessions, {config.label}: {med[config.label][1]:.0f}  "
            f"(target <= concurrency x pool size = {most})"
        )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
