"""The once-guard's cost: tasks/s and round trips per task, with and without it.

A real ``celery worker -P prefork -c 2`` (Django sandbox, lifeguard installed) runs a
task that writes one row in ``transaction.atomic()``; the same with ``lifeguard.once()``
(returning None, then returning a result to store); and with a celery-once-style Redis
lock (SET NX EX before, DEL after). Configurations take turns in batches of ``--batch``
tasks, so that load elsewhere on the machine falls on each alike; the table shows the
medians of ``--runs`` runs. Round trips to PostgreSQL are counted by the task from libpq's
protocol trace (BEGIN and COMMIT included) in a separate pass, so that tracing costs
nothing in the timed runs; the Redis lock adds its two Redis round trips.

    python benchmarks/once.py --tasks 1000 --runs 3
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import subprocess
import sys
import time
import uuid
from typing import Any

from celery import Celery
from tests.harness.django_worker import TASKS, sandbox_worker

from _harness import ROOT  # noqa: F401  (puts the checkout on the workers' path)
from lifeguard.demo.postgres import find_postgres
from lifeguard.demo.redis import find_redis

# (label, task, extra arguments, round trips to a server other than PostgreSQL)
CONFIGS = [
    ("unguarded write", "bench_write", (), 0),
    ("once-guarded write (no result)", "bench_once_write", (False,), 0),
    ("once-guarded write + stored result", "bench_once_write", (True,), 0),
    ("Redis SETNX lock + write (celery-once style)", "bench_redis_lock", (), 2),
]
COUNTED = 50  # tasks per configuration in the round-trip pass


def _send(client: Celery, task: str, extra: tuple[object, ...], queue: str) -> Any:
    return client.send_task(f"{TASKS}.{task}", args=(uuid.uuid4().hex, *extra), queue=queue)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tasks", type=int, default=1000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--batch", type=int, default=100, help="tasks per turn of a configuration")
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
        rates: dict[str, list[float]] = {label: [] for label, _, _, _ in CONFIGS}
        trips: dict[str, float] = {}
        load_before = os.getloadavg()[0]
        with worker:
            for label, task, extra, _ in CONFIGS:
                send = functools.partial(_send, client, task, (*extra, True), queue)
                trips[label] = statistics.median(
                    [r.get(timeout=60) for r in [send() for _ in range(COUNTED)]]
                )
            for _label, task, extra, _ in CONFIGS:  # warm up
                send = functools.partial(_send, client, task, extra, queue)
                [r.get(timeout=60) for r in [send() for _ in range(20)]]
            for _ in range(args.runs):
                # Batches of every configuration in turn: a burst of load elsewhere on the
                # machine falls on all of them alike.
                spent = dict.fromkeys(rates, 0.0)
                batches = max(args.tasks // args.batch, 1)
                for _ in range(batches):
                    for label, task, extra, _ in CONFIGS:
                        send = functools.partial(_send, client, task, extra, queue)
                        start = time.perf_counter()
                        [r.get(timeout=300) for r in [send() for _ in range(args.batch)]]
                        spent[label] += time.perf_counter() - start
                for label, seconds in spent.items():
                    rates[label].append(batches * args.batch / seconds)
        base = statistics.median(rates[CONFIGS[0][0]])
        base_trips = trips[CONFIGS[0][0]]
        print(
            f"{batches * args.batch} tasks x {args.runs} runs, prefork -c 2, medians; "
            f"load average {load_before:.1f} before, {os.getloadavg()[0]:.1f} after"
        )
        print("| configuration | tasks/s | vs unguarded | round trips/task | extra |")
        print("|---|---|---|---|---|")
        for label, _, _, other in CONFIGS:
            rate = statistics.median(rates[label])
            total = trips[label] + other
            where = f"{trips[label]:.0f} PostgreSQL" + (f" + {other} Redis" if other else "")
            print(
                f"| {label} | {rate:.0f} | {rate / base:.2f}x | {total:.0f} ({where}) "
                f"| +{total - base_trips:.0f} |"
            )
    finally:
        server.drop_database(name)


if __name__ == "__main__":
    main()
