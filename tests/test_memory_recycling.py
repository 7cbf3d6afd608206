"""Worker memory scenarios on real ``celery worker`` processes (Redis broker and backend).

The sandbox app (:mod:`tests.harness.memory_app`) has a task that leaks (keeps
2 MiB in a module-level list), one that spikes (allocates and frees 50 MiB), and one
that keeps nothing. Every task counts its executions in a Redis hash, so a task lost or
run twice by a recycle shows.
"""

from __future__ import annotations

import json
import re
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from celery import Celery

from lifeguard.demo.worker import CeleryWorker
from tests.harness.memory_app import executions_key

APP = "tests.harness.memory_app"
LEAK = f"{APP}.leak"
MIB = 1024 * 1024


class MemoryTasks:
    """Sends the memory app's tasks to one test's queue; reads the execution counts."""

    def __init__(self, client: Celery, queue: str) -> None:
        self.client = client
        self.queue = queue
        self.redis = client.backend.client

    def send(self, name: str, *args: Any) -> Any:
        return self.client.send_task(f"{APP}.{name}", args=args, queue=self.queue)

    def run(self, name: str, *args: Any) -> Any:
        return self.send(name, *args).get(timeout=60)

    def leaks_and_steadies(self, n: int, mib: float = 2) -> list[Any]:
        """n leaking tasks, each followed by one that keeps nothing."""
        sent = []
        for _ in range(n):
            sent += [self.send("leak", mib), self.send("steady")]
        return sent

    def executions(self) -> dict[str, int]:
        counts = self.redis.hgetall(executions_key(self.queue))
        return {key.decode(): int(value) for key, value in counts.items()}

    def waiting(self) -> int:
        """Messages still in the broker's queue (unacknowledged ones are put back there)."""
        return int(self.redis.llen(self.queue))


WorkerFactory = Callable[..., CeleryWorker]


@pytest.fixture
def queue(prefix: str) -> str:
    return f"q-{prefix}"


@pytest.fixture
def memory_tasks(celery_client: Celery, queue: str) -> Iterator[MemoryTasks]:
    tasks = MemoryTasks(celery_client, queue)
    yield tasks
    tasks.redis.delete(executions_key(queue), queue)


def _worker(redis_url: str, queue: str, **kw: Any) -> CeleryWorker:
    options = kw.pop("options", {})
    return CeleryWorker(
        APP,
        pool=kw.pop("pool", "prefork"),
        concurrency=kw.pop("concurrency", 1),
        queue=queue,
        env={
            "LIFEGUARD_SANDBOX_BROKER_URL": f"{redis_url}/14",
            "LIFEGUARD_SANDBOX_QUEUE": queue,
            "LIFEGUARD_SANDBOX_MODE": kw.pop("mode", "lifeguard"),
            "LIFEGUARD_SANDBOX_OPTIONS": json.dumps(options),
            "LIFEGUARD_SANDBOX_ACKS_LATE": "1" if kw.pop("acks_late", False) else "",
        },
        **kw,
    )


@pytest.fixture
def memory_worker(
    redis_url: str, queue: str, request: pytest.FixtureRequest
) -> Iterator[WorkerFactory]:
    """Start memory-app workers on this test's queue; all are stopped at the end."""
    started: list[CeleryWorker] = []

    def start(*, start: bool = True, **kw: Any) -> CeleryWorker:
        worker = _worker(redis_url, queue, **kw)
        started.append(worker)
        return worker.start() if start else worker

    yield start
    for worker in started:
        worker.stop()
    report = getattr(request.node, "rep_call", None)
    if report is not None and report.failed:
        for worker in started:
            print(f"--- log of {worker.hostname} ---\n{worker.log[-8000:]}")


@pytest.fixture(scope="module")
def child_rss(redis_url: str) -> int:
    """The RSS of an idle prefork child of the memory app, measured once per module."""
    queue = f"q-lgt-rss-{uuid.uuid4().hex[:8]}"
    worker = _worker(redis_url, queue).start()
    try:
        client = Celery("rss-probe", broker=f"{redis_url}/14", backend=f"{redis_url}/14")
        stats = client.send_task(f"{APP}.guard_stats", queue=queue).get(timeout=60)
        return int(stats["memory"]["rss_kib"]) * 1024
    finally:
        worker.stop()


def recycle_lines(worker: CeleryWorker) -> list[str]:
    return [line for line in worker.log.splitlines() if "lifeguard: recycling process" in line]


def pids(results: list[Any]) -> set[int]:
    return {result.get(timeout=60)["pid"] for result in results}


def mib(size: float) -> str:
    return f"{size / MIB:.0f}MiB"


# --- each policy recycles the leaking child and names the task that grew ---------------


@pytest.mark.compat
@pytest.mark.parametrize(
    ("policy", "options"),
    [
        ("memory_limit", None),  # child RSS + 9 MiB, filled in below
        ("memory_growth_limit", {"memory_growth_limit": "9MiB"}),
        (
            "memory_slope_limit",
            {"memory_slope_limit": "512KiB", "memory_slope_window": 4, "memory_slope_warmup": 2},
        ),
    ],
)
def test_each_policy_recycles_the_leaking_child_and_names_it(
    memory_worker, memory_tasks: MemoryTasks, child_rss: int, policy: str, options: Any
):
    options = options or {"memory_limit": mib(child_rss + 9 * MIB)}
    worker = memory_worker(options=options)
    results = memory_tasks.leaks_and_steadies(8)

    assert len(pids(results)) >= 2, "the leaking child was never replaced"
    lines = recycle_lines(worker)
    assert lines, worker.log[-3000:]
    assert all(f", {policy}: " in line for line in lines)
    # The leaking task is named first among those that grew.
    assert all(re.search(rf"Grew most: {re.escape(LEAK)} \+\d", line) for line in lines)
    assert "the pool forks a new one" in lines[0]
    assert set(memory_tasks.executions().values()) == {1}


# --- a spike that is freed is not a leak -------------------------------------------------


def test_spiky_task_does_not_recycle_under_the_current_rss_limit(
    memory_worker, memory_tasks: MemoryTasks, child_rss: int
):
    """50 MiB allocated and freed: the current RSS is back under the limit at task end."""
    worker = memory_worker(options={"memory_limit": mib(child_rss + 30 * MIB)})
    results = []
    for _ in range(3):
        results += [memory_tasks.send("spike", 50), memory_tasks.send("steady")]

    assert len(pids(results)) == 1
    assert recycle_lines(worker) == []
    stats = memory_tasks.run("guard_stats")["memory"]
    assert stats["maxrss_kib"] * 1024 > child_rss + 45 * MIB  # the peak did happen
    assert stats["rss_kib"] * 1024 < child_rss + 30 * MIB


def test_celery_peak_based_limit_recycles_the_same_spiky_task(
    memory_worker, memory_tasks: MemoryTasks, child_rss: int
):
    """The contrast: --max-memory-per-child compares ru_maxrss, the lifetime peak."""
    limit_kib = (child_rss + 30 * MIB) // 1024
    memory_worker(mode="stock", args=[f"--max-memory-per-child={limit_kib}"])
    results = []
    for _ in range(3):
        results += [memory_tasks.send("spike", 50), memory_tasks.send("steady")]

    assert len(pids(results)) >= 2  # replaced after a task that freed everything


# --- recycling loses nothing and runs nothing twice ---------------------------------------


@pytest.mark.compat
@pytest.mark.parametrize("acks_late", [True, False], ids=["acks_late", "early_ack"])
def test_recycling_loses_no_task_and_runs_none_twice(
    memory_worker, memory_tasks: MemoryTasks, acks_late: bool
):
    worker = memory_worker(
        concurrency=2, acks_late=acks_late, options={"memory_growth_limit": "5MiB"}
    )
    results = memory_tasks.leaks_and_steadies(15)

    assert all(isinstance(result.get(timeout=90), dict) for result in results)
    assert "WorkerLostError" not in worker.log  # no child left with a task unreported
    assert "exited with" not in worker.log  # every exit was a normal recycle (EX_RECYCLE)
    assert len(recycle_lines(worker)) >= 2
    worker.stop()
    assert worker.returncode == 0
    executions = memory_tasks.executions()
    assert sorted(executions) == sorted(result.id for result in results)
    assert set(executions.values()) == {1}
    assert memory_tasks.waiting() == 0  # no unacknowledged message was put back


# --- pools that cannot replace a process: warm shutdown for the supervisor -------------


@pytest.mark.compat
@pytest.mark.parametrize("pool", ["threads", "gevent"])
def test_worker_that_cannot_replace_a_process_shuts_down_warm_and_a_restart_finishes_the_rest(
    memory_worker, memory_tasks: MemoryTasks, pool: str
):
    worker = memory_worker(
        pool=pool, concurrency=2, acks_late=True, options={"memory_growth_limit": "6MiB"}
    )
    results = [memory_tasks.send("leak", 2, 0.1) for _ in range(12)]

    assert worker.process is not None
    assert worker.process.wait(60) == 0  # it stopped by itself, as after a SIGTERM
    assert "the process supervisor must start it again" in worker.log
    done = [result for result in results if result.ready()]
    assert 0 < len(done) < len(results)
    assert all(result.successful() for result in done)

    # What the supervisor does: start it again. The rest runs, nothing runs twice.
    memory_worker(pool=pool, concurrency=2, acks_late=True)
    assert all(result.get(timeout=60)["pid"] for result in results)
    assert set(memory_tasks.executions().values()) == {1}
    assert len(memory_tasks.executions()) == len(results)


def test_solo_worker_exits_with_the_configured_status(memory_worker, memory_tasks: MemoryTasks):
    worker = memory_worker(
        pool="solo", options={"memory_growth_limit": "3MiB", "recycle_exit_code": 3}
    )
    results = [memory_tasks.send("leak", 2) for _ in range(4)]

    assert worker.process is not None
    assert worker.process.wait(60) == 3
    assert results[0].get(timeout=10)["pid"] == worker.pid
    assert set(memory_tasks.executions().values()) == {1}


# --- limits that recycling cannot satisfy ------------------------------------------------


def test_limit_below_the_inherited_rss_warns_and_does_not_loop(
    memory_worker, memory_tasks: MemoryTasks
):
    """celery#4125: a child born above the limit would be replaced after every task."""
    worker = memory_worker(options={"memory_limit": "20MiB"})
    results = memory_tasks.leaks_and_steadies(3)

    assert len(pids(results)) == 1
    assert "memory_limit=20.0 MiB is below the" in worker.log
    assert worker.log.count("above memory_limit=20.0 MiB: not recycling it") == 1
    assert recycle_lines(worker) == []


def test_unreadable_limit_stops_the_worker_with_a_hint(memory_worker):
    worker = memory_worker(options={"memory_limit": "lots"}, start=False)
    assert worker.run_to_exit() == 78
    assert "must be a size such as '512MiB'" in worker.log


# --- figures and leak sites --------------------------------------------------------------


@pytest.mark.compat
def test_stats_attribute_growth_to_the_leaking_task(memory_worker, memory_tasks: MemoryTasks):
    memory_worker()
    for result in memory_tasks.leaks_and_steadies(4):
        result.get(timeout=60)
    figures = memory_tasks.run("guard_stats")["memory"]

    leak = figures["by_task"][LEAK]
    steady = figures["by_task"][f"{APP}.steady"]
    assert leak["runs"] == leak["measured"] == 4
    assert 4 * 2048 * 0.9 < leak["growth_kib"] < 4 * 2048 * 1.2
    assert leak["share"] > 0.8 > steady["share"]
    assert figures["tasks"] == 8
    assert figures["slope_kib_per_task"] > 500  # 2 MiB every other task
    assert figures["growth_kib"] >= leak["growth_kib"] * 0.9
    assert figures["rss_source"] == "/proc/self/statm"


def test_leak_site_mode_names_the_allocating_line_and_the_tasks(
    memory_worker, memory_tasks: MemoryTasks
):
    worker = memory_worker(options={"memory_leak_sites_every": 6, "memory_leak_sites_top": 3})
    for result in memory_tasks.leaks_and_steadies(4):
        result.get(timeout=60)
    figures = memory_tasks.run("guard_stats")["memory"]["leak_sites"]

    top = figures["sites"][0]
    assert "memory_app.py" in top["site"]
    assert top["growth_kib"] > 2 * 2048 * 0.9  # the two or three leaks of that period
    assert LEAK in figures["tasks"]
    assert "lifeguard: leak sites of process" in worker.log
    assert f"{LEAK} x" in worker.log
