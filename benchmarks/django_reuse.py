"""Django connections in prefork and gevent workers: stock Celery against lifeguard.

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

and the same one-query tasks under `-P gevent -c 100` (stock, lifeguard with nothing but
CONN_MAX_AGE=600, and the no-DB ceiling), where lifeguard shares a budget of warm
connections between greenlets.

New server sessions come from pg_stat_database.sessions, read after the worker stopped
(every session's statistics are flushed by then).

    python benchmarks/django_reuse.py --tasks 2000 --runs 3
    python benchmarks/django_reuse.py --tasks 2000 --runs 3 --gevent-only
"""

from __future__ import annotations

import os
import sys
import uuid
from dataclasses import dataclass
from typing import Any

from _harness import Results, run_benchmark
from lifeguard.demo.project import TASKS, sandbox_worker
from lifeguard.demo.worker import CeleryWorker

POOL = '{"min_size": 1, "max_size": 2}'


@dataclass(frozen=True)
class Config:
    label: str
    mode: str
    task: str = "one_query"
    conn_max_age: str = "600"
    pool: str = ""
    worker_pool: str = "prefork"


GREEN_CONCURRENCY = 100
GEVENT_CONFIGS = [
    Config("gevent: stock, CONN_MAX_AGE=600", "stock", worker_pool="gevent"),
    Config("gevent: no-DB task (ceiling)", "stock", task="noop", worker_pool="gevent"),
    Config("gevent: lifeguard", "lifeguard", worker_pool="gevent"),
]


CONFIGS = [
    Config("stock, CONN_MAX_AGE=600", "stock"),
    Config("stock, native pool", "stock", conn_max_age="0", pool=POOL),
    Config("blind reuse (CELERY_DB_REUSE_MAX)", "reuse_max"),
    Config("no-DB task (ceiling)", "stock", task="noop"),
    Config("lifeguard", "lifeguard"),
    Config("lifeguard, native pool", "lifeguard", conn_max_age="0", pool=POOL),
    *GEVENT_CONFIGS,
]


def build(config: Config, db_url: str, redis: str, concurrency: int) -> tuple[CeleryWorker, str]:
    worker = sandbox_worker(
        db_url=db_url,
        broker_url=redis,
        queue=f"bench-{uuid.uuid4().hex[:8]}",
        mode=config.mode,
        prefix="bench",
        conn_max_age=config.conn_max_age,
        native_pool=config.pool,
        quiet=True,
        pool=config.worker_pool,
        concurrency=GREEN_CONCURRENCY if config.worker_pool == "gevent" else concurrency,
    )
    return worker, f"{TASKS}.{config.task}"


def main() -> None:
    gevent_only = "--gevent-only" in sys.argv  # only the gevent rows
    if gevent_only:
        sys.argv.remove("--gevent-only")
    configs = GEVENT_CONFIGS if gevent_only else CONFIGS
    results = run_benchmark(__doc__.split("\n")[0], configs, build)
    args, med, tls = results.args, results.medians, results.tls
    if not gevent_only:
        prefork_table(args, med, tls)
    gevent_table(results)


def prefork_table(args: Any, med: dict[str, tuple[float, float]], tls: str) -> None:
    print(
        f"\nprefork, concurrency {args.concurrency}, {args.tasks} one-query tasks, "
        f"PostgreSQL over {tls}, median of {args.runs} runs\n"
    )
    print("| configuration | tasks/s | new sessions | sessions per 1,000 tasks |")
    print("| --- | ---: | ---: | ---: |")
    for config in CONFIGS:
        if config in GEVENT_CONFIGS:
            continue
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


def gevent_table(results: Results) -> None:
    args, med, tls = results.args, results.medians, results.tls

    def ratio(a: str, b: str) -> float:
        return med[a][0] / med[b][0]

    print(
        f"\ngevent, concurrency {GREEN_CONCURRENCY}, {args.tasks} one-query tasks, "
        f"PostgreSQL over {tls}, median of {args.runs} runs\n"
    )
    print("| configuration | tasks/s | new sessions | sessions per 1,000 tasks |")
    print("| --- | ---: | ---: | ---: |")
    for config in GEVENT_CONFIGS:
        rate, new = med[config.label]
        per_k = new * 1000 / (args.tasks + 20)
        print(f"| {config.label} | {rate:.0f} | {new:.0f} | {per_k:.1f} |")
    glg, gceil = GEVENT_CONFIGS[2].label, GEVENT_CONFIGS[1].label
    print()
    print(f"gevent lifeguard / no-DB ceiling: {ratio(glg, gceil):.2f}x  (target >= 0.85x)")
    print(f"  the same, round by round:       {results.paired_ratio(glg, gceil):.2f}x  (median)")
    print(f"gevent lifeguard / stock:         {ratio(glg, GEVENT_CONFIGS[0].label):.2f}x")
    print(f"gevent lifeguard new sessions:    {med[glg][1]:.0f}  (target <= the budget, 10)")


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
