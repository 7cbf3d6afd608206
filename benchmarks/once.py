"""The once-guard's cost: tasks/s and statements per task, with and without it.

A real ``celery worker -P prefork -c 2`` (Django sandbox, lifeguard installed) runs a
task that writes one row in ``transaction.atomic()``; the same with ``lifeguard.once()``
(returning None, then returning a result to store); and with a celery-once-style Redis
lock (SET NX EX before, DEL after). Configurations are interleaved over the rounds; the
table shows medians. Statements per task are counted by the task (Django's
``execute_wrapper``); BEGIN and COMMIT are the same in every configuration.

    python benchmarks/once.py --tasks 1000 --runs 3
"""

from __future__ import annotations

import argparse
import functools
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

from celery import Celery

from _harness import ROOT  # noqa: F401  (puts the checkout on the workers' path)
from lifeguard.demo.postgres import find_postgres
from lifeguard.demo.project import TASKS, sandbox_worker
from lifeguard.demo.redis import find_redis

CONFIGS = [
    ("unguarded write", "bench_write", ()),
    ("once-guarded write (no result)", "bench_once_write", (False,)),
    ("once-guarded write + stored result", "bench_once_write", (True,)),
    ("Redis SETNX lock + write (celery-once style)", "bench_redis_lock", ()),
]


def _send(client: Celery, task: str, extra: tuple[object, ...], queue: str) -> Any:
    return client.send_task(f"{TASKS}.{task}", args=(uuid.uuid4().hex, *extra), queue=queue)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    server = find_postgres()
    name = f"lifeguard_bench_once_{uuid.uuid4().hex[:6]}"
    server.create_database(name)
    redis_url = f"{find_redis()}/13"
    try:
        with server.admin(name) as conn:
            conn.execute("CREATE TABLE lifeguard_once_effects (key text, value text, pid int)")
        migrate = "from lifeguard.cli import main; main()"
        url = server.url(name)
        subprocess.run(
            [sys.executable, "-c", migrate, "migrate", "--database-url", url], check=True
        )
        queue = f"bench-once-{uuid.uuid4().hex[:6]}"
        client = Celery("bench", broker=redis_url, backend=redis_url)
        worker = sandbox_worker(db_url=url, broker_url=redis_url, queue=queue, quiet=True)
        rates: dict[str, list[float]] = {label: [] for label, _, _ in CONFIGS}
        statements: dict[str, float] = {}
        with worker:
            for _ in range(args.runs):
                for label, task, extra in CONFIGS:
                    send = functools.partial(_send, client, task, extra, queue)
                    [r.get(timeout=60) for r in [send() for _ in range(20)]]  # warm up
                    start = time.perf_counter()
                    results = [send() for _ in range(args.tasks)]
                    counts = [r.get(timeout=300) for r in results]
                    rates[label].append(args.tasks / (time.perf_counter() - start))
                    statements[label] = statistics.mean(counts)
        base = statistics.median(rates[CONFIGS[0][0]])
        print("| configuration | tasks/s | vs unguarded | statements/task |")
        print("|---|---|---|---|")
        for label, _, _ in CONFIGS:
            rate = statistics.median(rates[label])
            print(f"| {label} | {rate:.0f} | {rate / base:.2f}x | {statements[label]:.1f} |")
    finally:
        server.drop_database(name)


if __name__ == "__main__":
    main()
