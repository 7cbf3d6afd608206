"""Worker metrics: one Prometheus endpoint per worker, fed by every process that runs tasks.

The figures are scraped over HTTP from real ``celery worker`` processes and parsed back
with prometheus_client's own parser.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import socket
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from celery import Celery, signals

import lifeguard
from lifeguard.concerns.metrics import Sample
from lifeguard.demo.postgres import free_port
from lifeguard.hooks import Hook
from tests.monitor_support import samples, scrape, wait_for
from tests.support import SandboxTasks

TOUCH = "lifeguard.demo.project.tasks.touch"


def metrics_options(port: int, **more: Any) -> str:
    return json.dumps({"metrics_port": port, "metrics_address": "127.0.0.1", **more})


def task_count(port: int, task: str = TOUCH) -> float:
    counts = samples(scrape(port), "lifeguard_tasks_total")
    return counts.get((("reason", ""), ("task", task)), 0.0)


def per_process(port: int) -> dict[int, float]:
    gauge = samples(scrape(port), "lifeguard_process_tasks")
    return {int(dict(labels)["pid"]): value for labels, value in gauge.items()}


def run_on_both_children(tasks: SandboxTasks, n: int = 20) -> Counter[int]:
    """Run ``touch`` until both prefork children have run some; tasks per child pid."""
    done: Counter[int] = Counter()
    for _ in range(10):
        done.update(result["worker_pid"] for result in tasks.run_many("touch", n))
        if len(done) == 2:
            return done
    raise AssertionError(f"one child ran every task: {done}")


@pytest.mark.compat
def test_prefork_worker_serves_both_childrens_counts_on_one_endpoint(
    sandbox_worker, tasks: SandboxTasks
):
    port = free_port()
    worker = sandbox_worker(pool="prefork", concurrency=2, options=metrics_options(port))
    by_child = run_on_both_children(tasks)
    total = sum(by_child.values())
    # Figures are written at task_postrun, just after the result is sent: wait for them.
    wait_for(lambda: task_count(port) == total, what="every task counted")
    assert per_process(port) == dict(by_child)
    assert set(by_child) == set(worker.children())  # children only, not the MainProcess

    families = scrape(port)
    opened = samples(families, "lifeguard_connections_opened_total")
    reused = samples(families, "lifeguard_connections_reused_total")
    assert opened[(("reason", ""), ("task", TOUCH))] == 2  # one connection per child
    assert reused[(("reason", ""), ("task", TOUCH))] == total - 2
    assert "lifeguard: worker metrics on http://127.0.0.1:" in worker.log

    # The memory watchdog contributes its figures: RSS per live child, growth per task.
    rss = samples(families, "lifeguard_process_rss_bytes")
    assert {int(dict(labels)["pid"]) for labels in rss} == set(by_child)
    assert all(value > 10 * 2**20 for value in rss.values())
    growth = samples(families, "lifeguard_task_rss_growth_bytes")
    assert (("task", TOUCH),) in growth


def test_killed_child_keeps_its_counts_and_drops_its_gauge(sandbox_worker, tasks: SandboxTasks):
    port = free_port()
    worker = sandbox_worker(pool="prefork", concurrency=2, options=metrics_options(port))
    by_child = run_on_both_children(tasks, n=10)
    total = sum(by_child.values())
    wait_for(lambda: task_count(port) == total)
    victim = next(iter(by_child))
    os.kill(victim, signal.SIGKILL)
    wait_for(lambda: victim not in worker.children() and len(worker.children()) == 2)

    assert victim not in per_process(port)  # the dead child's gauge is gone
    assert task_count(port) == total  # its counts are not
    tasks.run_many("touch", 4)
    wait_for(lambda: task_count(port) == total + 4)

    directory = re.search(r"files in (\S+)\)", worker.log)
    assert directory is not None and Path(directory[1]).is_dir()
    worker.stop()
    assert not Path(directory[1]).exists()  # a temporary directory goes with the worker


def test_files_of_a_previous_run_are_wiped_at_start(
    sandbox_worker, tasks: SandboxTasks, tmp_path: Path
):
    from prometheus_client.mmap_dict import MmapedDict, mmap_key

    directory = tmp_path / "metrics"
    directory.mkdir()
    stale = MmapedDict(str(directory / "counter_99999.db"))
    key = mmap_key("lifeguard_tasks", "lifeguard_tasks_total", ["reason", "task"], ["", TOUCH], "")
    stale.write_value(key, 1000.0, 0.0)
    stale.close()
    port = free_port()
    sandbox_worker(
        pool="prefork", concurrency=1, options=metrics_options(port, metrics_dir=str(directory))
    )
    tasks.run_many("touch", 3)
    wait_for(lambda: task_count(port) == 3)
    assert not (directory / "counter_99999.db").exists()


def test_threads_pool_counts_in_the_worker_process(sandbox_worker, tasks: SandboxTasks):
    port = free_port()
    worker = sandbox_worker(pool="threads", concurrency=2, options=metrics_options(port))
    tasks.run_many("touch", 5)
    wait_for(lambda: task_count(port) == 5)
    assert per_process(port) == {worker.pid: 5}


def test_busy_port_leaves_the_worker_working(sandbox_worker, tasks: SandboxTasks):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        worker = sandbox_worker(pool="prefork", concurrency=1, options=metrics_options(port))
        assert tasks.run("touch")["worker_pid"] in worker.children()
    assert f"cannot serve worker metrics on 127.0.0.1:{port}" in worker.log


def test_bad_metrics_port_stops_the_worker_at_start(sandbox_worker):
    worker = sandbox_worker(options='{"metrics_port": "ninety"}', start=False)
    assert worker.run_to_exit() != 0
    assert "'CELERY_LIFEGUARD_METRICS_PORT' must be a TCP port (1-65535) or None" in worker.log


# --- a concern's own figures ------------------------------------------------------------


class _WorkController:
    """What Celery's worker_init/worker_shutdown senders look like to lifeguard."""

    def __init__(self, app: Celery) -> None:
        self.app = app
        self.hostname = "celery@metrics-test"
        self.pool_cls = "solo"
        self.concurrency = 1


class _Memory(Hook):
    """Stands for the memory concern: contributes figures without touching metrics.py."""

    name = "memory"

    def metric_samples(self) -> Iterator[Sample]:
        yield Sample("memory_rss_bytes", 123456.0, help="Resident memory of the process")
        yield Sample("memory_recycles", 2, kind="counter", labels={"reason": "rss"})
        yield Sample("memory-bad-name", 1.0)


def test_a_concern_contributes_figures_through_metric_samples(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
):
    monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(tmp_path))
    app = Celery("metrics-unit", set_as_current=False)
    port = free_port()
    guard = lifeguard.install(app, metrics_port=port, metrics_address="127.0.0.1", django=False)
    guard.add_hook(_Memory())
    sender = _WorkController(app)
    signals.worker_init.send(sender=sender)
    try:
        guard.counters.incr("connections_opened", task="report")
        with caplog.at_level(logging.ERROR, logger="lifeguard.metrics"):
            families = scrape(port)
        pid = (("pid", str(os.getpid())),)
        assert samples(families, "lifeguard_memory_rss_bytes") == {pid: 123456.0}
        assert samples(families, "lifeguard_memory_recycles_total") == {(("reason", "rss"),): 2}
        opened = samples(families, "lifeguard_connections_opened_total")
        assert opened == {(("reason", ""), ("task", "report")): 1}
        assert not any("bad" in name for name in families)
        assert "metric 'memory-bad-name' not exported" in caplog.text
    finally:
        signals.worker_shutdown.send(sender=sender)
        guard.lifecycle.disconnect()
