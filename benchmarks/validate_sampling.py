"""What watching costs: one ``lifeguard validate`` sample, and the workers' throughput
while they are sampled.

Starts its own PostgreSQL (production-like: TLS and scram-sha-256 when the binaries allow)
and a real prefork worker (``-c 2``) of the sandbox Django app with lifeguard, then:

1. times each part of a sample (median ms over ``--rounds``): the database snapshot
   (one query, every backend parsed), ``lifeguard_processes`` (the worker's MainProcess
   reads its children's RSS and answers over the broker), ``inspect().stats()`` (what a
   remote worker without lifeguard is asked), ``/proc`` (a worker on this machine), and
   a whole sample (snapshot, processes, attribution of backends to processes);
2. sends ``--tasks`` one-query tasks with validate's own dispatcher, unobserved and while
   sampled every 0.5 s (the default) and every 0.1 s, in interleaved rounds: the ratios
   say how much validate's sampling slows what it measures.

Short run:  .venv/bin/python benchmarks/validate_sampling.py --tasks 1000 --runs 3
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import sys
import time
import uuid
from collections.abc import Callable
from typing import Any

from celery import Celery

from _harness import median_ms, production_like_server
from lifeguard.demo.project import TASKS, sandbox_worker
from lifeguard.demo.redis import find_redis
from lifeguard.monitor.report import Monitor
from lifeguard.monitor.target import from_url
from lifeguard.monitor.thresholds import Thresholds
from lifeguard.validate.load import Load, TaskCall
from lifeguard.validate.sampler import Sampler
from lifeguard.validate.workers import ProcessSampler, WorkerNode, find_workers

TASK = f"{TASKS}.one_query"
INTERVALS = (None, 0.5, 0.1)  # None: not sampled


def sample_parts(client: Celery, monitor: Monitor, node: WorkerNode, rounds: int) -> None:
    def processes(**change: Any) -> ProcessSampler:
        return ProcessSampler(client, [dataclasses.replace(node, **change)], 2.0)

    start = time.monotonic()
    sampler = Sampler(monitor, processes(), [node], lambda: time.monotonic() - start, 1.0)
    cases: dict[str, Callable[[], Any]] = {
        "database snapshot": monitor.snapshot,
        "lifeguard_processes": processes().sample,
        "inspect().stats()": processes(lifeguard=False, local=False).sample,
        "/proc (this machine)": processes(lifeguard=False).sample,
        "whole sample": sampler.take,
    }
    print(f"one sample, median of {rounds} (ms):")
    for name, action in cases.items():
        median_ms(action, 3)  # warm up
        print(f"  {name:<22} {median_ms(action, rounds):7.2f}")


def throughput(client: Celery, monitor: Monitor, node: WorkerNode, tasks: int, runs: int) -> None:
    measured: dict[float | None, list[float]] = {interval: [] for interval in INTERVALS}
    for round_no in range(runs):
        shift = round_no % len(INTERVALS)
        for interval in [*INTERVALS[shift:], *INTERVALS[:shift]]:
            start = time.monotonic()

            def clock(start: float = start) -> float:
                return time.monotonic() - start

            sampler = None
            if interval is not None:
                processes = ProcessSampler(client, [node], 2.0)
                sampler = Sampler(monitor, processes, [node], clock, interval)
                sampler.start()
            try:
                load = Load(client, TaskCall(TASK, queue=node.name.partition("@")[0]), clock)
                outcomes = load.run(count=tasks)
            finally:
                if sampler is not None:
                    sampler.stop()
            assert outcomes.succeeded == tasks, outcomes.to_json()
            rate = outcomes.to_json()["per_second"]
            measured[interval].append(rate)
            label = "not sampled" if interval is None else f"sampled every {interval}s"
            print(f"round {round_no + 1}: {label:<22} {rate:7.1f} tasks/s", file=sys.stderr)
    baseline = statistics.median(measured[None])
    print(f"{tasks} one-query tasks, prefork -c 2, median of {runs} runs:")
    for interval, rates in measured.items():
        label = "not sampled" if interval is None else f"sampled every {interval}s"
        rate = statistics.median(rates)
        print(f"  {label:<22} {rate:7.1f} tasks/s  {rate / baseline:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tasks", type=int, default=2000)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=50, help="samples timed per part")
    parser.add_argument("--plain", action="store_true", help="no TLS")
    args = parser.parse_args()

    embedded, server, db_url = production_like_server(plain=args.plain)
    redis = f"{find_redis()}/13"
    queue = f"bench-{uuid.uuid4().hex[:8]}"
    worker = sandbox_worker(db_url=db_url, broker_url=redis, queue=queue, quiet=True)
    client = Celery("bench", broker=redis, backend=redis)
    monitor = Monitor(from_url(db_url, "benchmark"), "lifeguard", Thresholds())
    try:
        with server.admin("bench") as conn:
            conn.execute("CREATE TABLE lifeguard_sandbox_items (id serial, value text)")
        worker.start()
        (node,) = find_workers(client, queue, TASK, 2.0, lifeguard=True)
        Load(client, TaskCall(TASK, queue=queue), time.monotonic).run(count=50)  # warm up
        sample_parts(client, monitor, node, args.rounds)
        throughput(client, monitor, node, args.tasks, args.runs)
    finally:
        monitor.close()
        worker.stop()
        client.close()
        embedded.destroy()


if __name__ == "__main__":
    main()
