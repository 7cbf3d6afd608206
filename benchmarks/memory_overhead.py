"""Per-task cost of lifeguard's memory watchdog on a no-op task.

Two measures, each comparing variants in the same run, interleaved, median of rounds:

1. **in-process tracer** (research memory_monitoring.md A.2, but through the worker's
   own code path): Celery's ``build_tracer`` runs a no-op task exactly as a pool child
   does (task_prerun/task_postrun, not eager), minus the broker and the pool's IPC.
   Variants: stock Celery (no lifeguard), lifeguard with ``memory=False``, lifeguard
   with the default policy (measuring, no limit), and with all three limits set (never
   reached). The watchdog's cost is "default" minus "memory off"; its two phases are
   also timed alone (called directly), which leaves out the cache effects of a task.
2. **real worker** (``--real-tasks 0`` skips it): a prefork worker with one child per
   variant, N no-op tasks through Redis; indicative only, as the broker round trips
   dominate.

Run: ``.venv/bin/python benchmarks/memory_overhead.py`` (a short run: ``--rounds 3
--tasks 2000 --real-tasks 300 --real-rounds 2``). Target: at most 15 µs per task.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from celery import Celery, signals
from celery.app.trace import build_tracer

import _harness  # noqa: F401  (the checkout on the path, for the harness apps)
from lifeguard import TaskOutcome, TaskRun
from lifeguard.concerns.memory import MemoryWatchdog
from lifeguard.guard import Lifeguard

TARGET_US = 15.0

VARIANTS: dict[str, dict[str, Any] | None] = {
    "stock": None,
    "memory off": {"memory": False, "django": False},
    "memory on (default)": {"django": False},
    "memory + 3 limits": {
        "django": False,
        "memory_limit": "64GiB",
        "memory_growth_limit": "64GiB",
        "memory_slope_limit": "64GiB",
    },
}


@dataclass(eq=False)
class StandInWorker:
    """What lifeguard reads from Celery's WorkController at ``worker_init``."""

    app: Celery
    hostname: str = "bench@localhost"
    pool_cls: str = "prefork"
    concurrency: int = 1


class Variant:
    """One Celery app with a no-op task, and lifeguard on it or not."""

    def __init__(self, name: str, options: dict[str, Any] | None) -> None:
        self.name = name
        self.app = Celery(f"bench-{name}", broker="memory://", set_as_current=False)
        self.app.conf.task_ignore_result = True

        @self.app.task(name="bench.noop", ignore_result=True)
        def noop() -> None:
            """Nothing at all."""

        self.tracer = build_tracer(noop.name, noop, app=self.app, eager=False)
        self.guard = Lifeguard(self.app, options) if options is not None else None
        if self.guard is not None:
            # The phases a prefork child goes through: worker start, then process start.
            self.guard.lifecycle.connect()
            signals.worker_init.send(sender=StandInWorker(self.app))
            signals.worker_process_init.send(sender=None)
            self.guard.lifecycle.disconnect()

    def run(self, n: int) -> float:
        """Seconds per task over n tasks."""
        tracer = self.tracer
        ids = [str(uuid.uuid4()) for _ in range(n)]
        request = {"delivery_info": {"routing_key": "celery"}}
        if self.guard is not None:
            self.guard.lifecycle.connect()
        try:
            start = time.perf_counter()
            for task_id in ids:
                tracer(task_id, (), {}, dict(request, id=task_id))
            return (time.perf_counter() - start) / n
        finally:
            if self.guard is not None:
                self.guard.lifecycle.disconnect()


def interleaved(runs: dict[str, Callable[[], float]], rounds: int) -> dict[str, float]:
    """Median of each variant over rounds, the variants taking turns within a round."""
    samples: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(rounds):
        for name, run in runs.items():
            samples[name].append(run())
    return {name: statistics.median(values) for name, values in samples.items()}


def report(title: str, per_task: dict[str, float], *, against_target: bool) -> None:
    stock = per_task["stock"]
    off = per_task.get("memory off")
    print(f"\n{title}")
    print(f"  {'variant':<22} {'µs/task':>10} {'vs stock':>10} {'ratio':>7}")
    for name, seconds in per_task.items():
        us = seconds * 1e6
        print(f"  {name:<22} {us:>10.1f} {(seconds - stock) * 1e6:>+10.1f} {seconds / stock:>7.2f}")
    if off is not None and against_target:
        for name in ("memory on (default)", "memory + 3 limits"):
            if name in per_task:
                cost = (per_task[name] - off) * 1e6
                verdict = "within" if cost <= TARGET_US else "OVER"
                print(
                    f"  watchdog cost, {name}: {cost:+.1f} µs/task "
                    f"({verdict} the {TARGET_US:.0f} µs target)"
                )


def hook_phases(variant: Variant, n: int) -> float:
    """Seconds per task of the watchdog's before_task + after_task, called directly."""
    assert variant.guard is not None
    watchdog = variant.guard.hook(MemoryWatchdog)
    runs = [TaskRun(id=str(i), name="bench.noop", unit=None) for i in range(n)]
    done = TaskOutcome(state="SUCCESS")
    start = time.perf_counter()
    for run in runs:
        watchdog.before_task(run)
        watchdog.after_task(run, done)
    return (time.perf_counter() - start) / n


def in_process(tasks: int, rounds: int) -> None:
    variants = [Variant(name, options) for name, options in VARIANTS.items()]
    for variant in variants:
        variant.run(200)  # warm up imports and caches
    per_task = interleaved({v.name: (lambda v=v: v.run(tasks)) for v in variants}, rounds)
    report(
        f"in-process tracer, {tasks} no-op tasks x {rounds} rounds (median)",
        per_task,
        against_target=True,
    )
    for variant in variants[2:]:
        alone = statistics.median(hook_phases(variant, tasks) for _ in range(rounds))
        print(f"  the watchdog's two phases alone, {variant.name}: {alone * 1e6:.1f} µs/task")


def real_worker(tasks: int, rounds: int) -> None:
    from lifeguard.demo.redis import find_redis
    from lifeguard.demo.worker import CeleryWorker

    redis_url = f"{find_redis()}/14"
    client = Celery("bench-client", broker=redis_url, backend=redis_url)
    workers: dict[str, tuple[CeleryWorker, str]] = {}
    try:
        for name, options in VARIANTS.items():
            queue = f"q-bench-{uuid.uuid4().hex[:8]}"
            env = {
                "LIFEGUARD_SANDBOX_BROKER_URL": redis_url,
                "LIFEGUARD_SANDBOX_QUEUE": queue,
                "LIFEGUARD_SANDBOX_MODE": "stock" if options is None else "lifeguard",
                "LIFEGUARD_SANDBOX_OPTIONS": json.dumps(options or {}),
            }
            worker = CeleryWorker("tests.harness.memory_app", concurrency=1, queue=queue, env=env)
            workers[name] = (worker.start(), queue)

        def batch(queue: str) -> float:
            start = time.perf_counter()
            sent = [
                client.send_task("tests.harness.memory_app.noop", queue=queue) for _ in range(tasks)
            ]
            for result in sent:
                result.get(timeout=120)
            return (time.perf_counter() - start) / tasks

        for _, queue in workers.values():
            batch(queue)  # warm up
        per_task = interleaved(
            {name: (lambda q=queue: batch(q)) for name, (_, queue) in workers.items()}, rounds
        )
        report(
            f"real prefork worker (1 child, Redis), {tasks} no-op tasks x {rounds} rounds "
            "(median; broker round trips dominate, indicative only)",
            per_task,
            against_target=False,
        )
    finally:
        for worker, _ in workers.values():
            worker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", type=int, default=5000, help="tasks per in-process round")
    parser.add_argument("--rounds", type=int, default=9, help="in-process rounds")
    parser.add_argument("--real-tasks", type=int, default=1000, help="0 skips the real worker")
    parser.add_argument("--real-rounds", type=int, default=3)
    args = parser.parse_args()
    print(f"pid {os.getpid()}; lower is better; target: watchdog <= {TARGET_US:.0f} µs/task")
    in_process(args.tasks, args.rounds)
    if args.real_tasks:
        real_worker(args.real_tasks, args.real_rounds)


if __name__ == "__main__":
    main()
