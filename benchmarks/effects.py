"""The cost of claiming an external effect: tasks/s and server sessions per task.

A real ``celery worker -P prefork -c 2`` (Django sandbox, lifeguard installed) runs a task
that makes a simulated remote call (``--call-ms``, a sleep): unguarded (the ceiling: no
database at all), inside ``lifeguard.effect()`` (a new session per run, lock + claim +
completion), inside ``lifeguard.effect()`` of a key already completed (the rerun path: no
call), and with a celery-once-style Redis claim (SET NX EX before, SET done after; no
dead-owner detection). Configurations are interleaved over the rounds; the table shows
medians. Sessions per task: the database's ``pg_stat_database.sessions`` over the round.

    python benchmarks/effects.py --tasks 500 --runs 3 --call-ms 0
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from typing import Any

from celery import Celery
from tests.harness.django_worker import TASKS, sandbox_worker

from _harness import ROOT  # noqa: F401  (puts the checkout on the workers' path)
from lifeguard.demo.postgres import find_postgres
from lifeguard.demo.redis import find_redis

CONFIGS = [
    ("remote call alone (no claim)", "none", False),
    ("lifeguard.effect: claim + call + completion", "effect", False),
    ("lifeguard.effect: key already completed (no call)", "effect", True),
    ("Redis SET NX claim + call (celery-once style)", "redis", False),
]


def sessions(server: Any, name: str) -> int:
    with server.admin(name) as conn:
        row = conn.execute(
            "SELECT sessions FROM pg_stat_database WHERE datname = current_database()"
        ).fetchone()
    return int(row[0])


@contextlib.contextmanager
def migrated_database(server: Any) -> Iterator[str]:
    """A scratch database with the key table (`lifeguard migrate`), dropped at the end."""
    name = f"lifeguard_bench_effects_{uuid.uuid4().hex[:6]}"
    server.create_database(name)
    try:
        url = server.url(name)
        command = [sys.executable, "-c", "from lifeguard.cli import main; main()", "migrate"]
        subprocess.run([*command, "--database-url", url], check=True)
        yield name
    finally:
        server.drop_database(name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    for option, kind, default in [
        ("--tasks", int, 500),
        ("--runs", int, 3),
        ("--call-ms", float, 0.0),
    ]:
        parser.add_argument(option, type=kind, default=default)
    args = parser.parse_args()
    server = find_postgres()
    redis_url = f"{find_redis()}/13"
    with migrated_database(server) as name:
        queue = f"bench-effects-{uuid.uuid4().hex[:6]}"
        client = Celery("bench", broker=redis_url, backend=redis_url)
        worker = sandbox_worker(
            db_url=server.url(name), broker_url=redis_url, queue=queue, quiet=True
        )
        rates: dict[str, list[float]] = {label: [] for label, _, _ in CONFIGS}
        per_task: dict[str, list[float]] = {label: [] for label, _, _ in CONFIGS}
        done_key = f"done-{uuid.uuid4().hex[:6]}"

        def send(guard: str, repeat: bool) -> Any:
            key = done_key if repeat else uuid.uuid4().hex
            return client.send_task(
                f"{TASKS}.bench_effect", args=(key, guard, args.call_ms), queue=queue
            )

        with worker:
            for _ in range(args.runs):
                for label, guard, repeat in CONFIGS:
                    [r.get(timeout=60) for r in [send(guard, repeat) for _ in range(20)]]
                    before = sessions(server, name)
                    start = time.perf_counter()
                    results = [send(guard, repeat) for _ in range(args.tasks)]
                    [r.get(timeout=300) for r in results]
                    rates[label].append(args.tasks / (time.perf_counter() - start))
                    time.sleep(0.5)  # the last sessions' ends reach the statistics
                    per_task[label].append((sessions(server, name) - before - 1) / args.tasks)
    base = statistics.median(rates[CONFIGS[0][0]])
    print(f"remote call: {args.call_ms:g} ms; {args.tasks} tasks x {args.runs} rounds")
    print("| configuration | tasks/s | vs call alone | server sessions/task |")
    print("|---|---|---|---|")
    for label, _, _ in CONFIGS:
        rate = statistics.median(rates[label])
        opened = statistics.median(per_task[label])
        print(f"| {label} | {rate:.0f} | {rate / base:.2f}x | {opened:.2f} |")


if __name__ == "__main__":
    main()
