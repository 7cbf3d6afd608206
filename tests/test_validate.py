"""``lifeguard validate`` against real workers: the seed guide's load test, automated.

Each scenario starts a real prefork ``celery worker`` (the Django sandbox or the memory
sandbox app) on Redis, runs ``lifeguard validate --json`` in a subprocess as an operator
would, and checks its verdict against what PostgreSQL itself shows.
"""

from __future__ import annotations

import dataclasses
import json
import socket
import uuid
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from celery import Celery

from lifeguard.demo.worker import CeleryWorker
from lifeguard.hooks import PoolKind
from lifeguard.report import RunRecord
from lifeguard.validate.sampler import UNATTRIBUTED
from lifeguard.validate.workers import VIA_LIFEGUARD, VIA_PROC, ProcessSampler, find_workers
from tests.harness.django_worker import sandbox_worker as django_sandbox_worker
from tests.monitor_support import lifeguard, start_lifeguard, wait_for
from tests.support import Database, stop_workers
from tests.validate_support import (
    DJANGO_APP,
    DJANGO_TASKS,
    MEMORY_APP,
    Validated,
    chromium,
    chromium_run,
    data_block,
    memory_worker,
    png_size,
    validate,
)

MIB = 1024 * 1024
HOST = socket.gethostname()
CRITERIA = {
    "idle_back_to_baseline",
    "no_idle_in_transaction",
    "no_connection_errors",
    "peak_within_budget",
    "every_task_succeeded",
}


def labels(pids: list[int]) -> set[str]:
    """``host:pid`` of processes of this machine, as validate names them."""
    return {f"{HOST}:{pid}" for pid in pids}


# --- a clean app: lifeguard installed, one query per task ---------------------------------


@dataclass
class CleanRun:
    worker: CeleryWorker
    prefix: str
    run: Validated
    report: Path
    children: list[int]


@pytest.fixture(scope="module")
def clean_run(
    test_db: Database, redis_url: str, tmp_path_factory: pytest.TempPathFactory, request
) -> Iterator[CleanRun]:
    """One validation of the Django sandbox with lifeguard, shared by the tests below."""
    prefix = f"lgt{uuid.uuid4().hex[:8]}"
    worker = django_sandbox_worker(
        db_url=test_db.url, broker_url=f"{redis_url}/14", queue=f"q-{prefix}", prefix=prefix
    )
    worker.start()
    report = tmp_path_factory.mktemp("validate") / "report.html"
    try:
        run = validate(
            worker,
            DJANGO_APP,
            f"{DJANGO_TASKS}.one_query",
            "--count",
            "60",
            "--report",
            str(report),
        )
        yield CleanRun(worker, prefix, run, report, worker.children())
    finally:
        stop_workers([worker], request, test_db, prefix)


@pytest.mark.compat
def test_clean_app_passes_every_criterion(clean_run: CleanRun, test_db: Database):
    run = clean_run.run
    assert run.code == 0, run.result
    assert run.result["result"] == "pass"
    assert run.statuses() == dict.fromkeys(CRITERIA, "pass")
    (worker,) = run.result["workers"]
    assert worker["lifeguard"] and worker["local"] and worker["processes_via"] == VIA_LIFEGUARD
    assert (worker["pool"], worker["concurrency"]) == ("prefork", 2)
    assert run.result["tasks"]["sent"] == run.result["tasks"]["succeeded"] == 60

    # One connection per child, told apart by lifeguard's application_name; kept warm.
    connections = run.result["connections"]
    assert connections["peak_by_process"] == dict.fromkeys(labels(clean_run.children), 1)
    assert run.result["budget"]["connections"] == connections["peak"]["workers"] == 2
    assert connections["baseline"]["by_state"]["idle"] == connections["final"]["by_state"]["idle"]
    # What the database shows after the run agrees: two idle sessions, nothing else.
    assert sorted(b.state for b in test_db.backends(clean_run.prefix)) == ["idle", "idle"]

    # Every child's RSS, read by the worker's MainProcess (lifeguard_processes).
    memory = run.result["memory"]
    assert {p["pid"] for p in memory["processes"]} == set(clean_run.children)
    assert all(p["last_rss"] > 10 * MIB for p in memory["processes"])
    assert memory["recycles"] == []


def test_worker_answers_lifeguard_processes_with_its_children(
    clean_run: CleanRun, celery_client: Celery
):
    node = f"q-{clean_run.prefix}@{HOST}"
    (reply,) = celery_client.control.broadcast(
        "lifeguard_processes", destination=[node], reply=True, timeout=5, limit=1
    )
    answer = reply[node]
    assert answer["pid"] == clean_run.worker.pid
    assert (answer["pool"], answer["concurrency"], answer["prefix"]) == (
        "prefork",
        2,
        clean_run.prefix,
    )
    assert sorted(p["pid"] for p in answer["processes"]) == clean_run.children
    assert all(p["rss"] > 10 * MIB for p in answer["processes"])


@pytest.mark.skipif(
    chromium() is None, reason="chromium is not installed (apt-get install chromium)"
)
def test_html_report_renders_offline_with_charts_and_data(clean_run: CleanRun, tmp_path: Path):
    html = clean_run.report.read_text()
    # Self-contained: nothing to fetch, one script element (the data, not code).
    assert "<link" not in html and " src=" not in html and " href=" not in html
    assert html.count("<script") == 1

    screenshot = tmp_path / "report.png"
    shot = chromium_run(
        clean_run.report, tmp_path, f"--screenshot={screenshot}", "--window-size=1280,2000"
    )
    assert screenshot.exists(), shot.stderr[-2000:]
    assert png_size(screenshot) == (1280, 2000)
    assert len(set(_png_pixels(screenshot))) > 50, "the screenshot is blank"

    dom = chromium_run(clean_run.report, tmp_path, "--dump-dom").stdout
    for chart in ("connections", "process_connections", "rss", "throughput"):
        assert f'data-chart="{chart}"' in dom
    assert dom.count('<svg class="chart"') == 4
    assert dom.count('class="criterion pass"') == len(CRITERIA)

    (record,) = [RunRecord.from_json(r) for r in data_block(dom)["records"]]
    assert record.verdict == "pass"
    idle = record.chart("connections").series_named("idle")
    assert idle.peak() == 2
    rss = record.chart("rss")
    assert {s.label for s in rss.series if not s.dashed} == labels(clean_run.children)
    assert all(len(s.points) >= 3 for s in rss.series)
    assert record.chart("throughput").series_named("succeeded").peak()


def _png_pixels(path: Path) -> bytes:
    """The decompressed image data of a PNG (enough to tell a blank page)."""
    data, position, chunks = path.read_bytes(), 8, []
    while position < len(data):
        length = int.from_bytes(data[position : position + 4], "big")
        kind = data[position + 4 : position + 8]
        if kind == b"IDAT":
            chunks.append(data[position + 8 : position + 8 + length])
        position += 12 + length
    return zlib.decompress(b"".join(chunks))


def test_unknown_task_or_queue_cannot_run(clean_run: CleanRun):
    unknown = validate(clean_run.worker, DJANGO_APP, f"{DJANGO_TASKS}.no_such_task")
    assert unknown.code == 3
    assert unknown.result["result"] == "error"
    assert "do not know the task" in unknown.result["error"]

    nobody = validate(
        clean_run.worker, DJANGO_APP, f"{DJANGO_TASKS}.one_query", "--queue", "nobody-here"
    )
    assert nobody.code == 3
    assert "no running worker consumes the queue 'nobody-here'" in nobody.result["error"]


def test_bad_arguments_exit_3_before_anything_runs():
    result = lifeguard("validate", "-A", DJANGO_APP, "--task", "x", "--args", '{"not": "a list"}')
    assert result.returncode == 3
    assert "must be a JSON list" in result.stderr
    result = lifeguard("validate", "--task", "x", "--json")
    assert result.returncode == 3
    assert "give the Celery app with -A" in json.loads(result.stdout)["error"]


# --- a leaking app: no lifeguard, CONN_MAX_AGE=None, a raw connection never closed ------


@pytest.mark.compat
def test_leaking_app_fails_and_names_the_processes_holding_the_leak(
    sandbox_worker, test_db: Database, prefix: str
):
    worker = sandbox_worker(mode="stock", conn_max_age="none")
    run = validate(
        worker,
        DJANGO_APP,
        f"{DJANGO_TASKS}.leak_connection",
        "--count",
        "16",
        "--warmup-rounds",
        "2",
    )

    assert run.code == 1
    assert run.result["result"] == "fail"
    assert run.statuses() == {
        "idle_back_to_baseline": "fail",
        "no_idle_in_transaction": "pass",
        "no_connection_errors": "pass",
        "peak_within_budget": "fail",
        "every_task_succeeded": "pass",
    }
    (worker_json,) = run.result["workers"]
    assert not worker_json["lifeguard"] and worker_json["processes_via"] == VIA_PROC

    # The database holds every leaked connection, idle; validate found each one's
    # process by its TCP socket, though nothing names it.
    leaked = [b for b in test_db.backends(prefix) if b.application_name == f"{prefix}:leak"]
    assert len(leaked) == run.result["warmup"]["sent"] + 16
    assert all(b.state == "idle" for b in leaked)
    final = run.result["connections"]["final"]
    assert final["by_state"]["idle"] >= len(leaked)
    assert UNATTRIBUTED not in final["by_process"]
    assert set(final["by_process"]) <= labels(worker.children())
    assert sum(sum(states.values()) for states in final["by_process"].values()) >= len(leaked)
    idle = run.criterion("idle_back_to_baseline")
    assert idle["measured"] > idle["limit"]
    assert "held by " in idle["detail"]


def test_sessions_killed_during_the_run_are_connection_errors(
    sandbox_worker, test_db: Database, prefix: str
):
    """An administrator terminates the workers' backends mid-run: pg_stat_database counts
    them as killed, and validate fails on it. (No warm-up: the backends are the load's.)"""
    worker = sandbox_worker()
    command = ["validate", "-A", DJANGO_APP, "--task", f"{DJANGO_TASKS}.one_query", "--json"]
    command += ["--count", "20", "--soak", "3s", "--warmup-rounds", "0", "--settle", "1"]
    running = start_lifeguard(*command, env=worker.env)
    try:
        wait_for(lambda: test_db.backends(prefix), timeout=60, what="the workers' backends")
        killed = test_db.terminate(prefix)
        stdout, stderr = running.communicate(timeout=120)
    finally:
        running.kill()
    result = json.loads(stdout)

    assert running.returncode == 1, stderr
    errors = next(c for c in result["criteria"] if c["name"] == "no_connection_errors")
    assert errors["status"] == "fail"
    assert result["sessions"]["killed"] >= killed >= 1
    assert f"killed {result['sessions']['killed']}" in errors["detail"]


# --- memory under a soak --------------------------------------------------------------------


@pytest.fixture
def memory_app_worker(redis_url: str, prefix: str) -> Iterator[Callable[..., CeleryWorker]]:
    """Start workers of the memory sandbox app on this test's queue; stopped at the end."""
    started: list[CeleryWorker] = []

    def start(**kw: Any) -> CeleryWorker:
        worker = memory_worker(redis_url, f"q-{prefix}", **kw)
        started.append(worker)
        return worker.start()

    yield start
    for worker in started:
        worker.stop()


def validate_leak(worker: CeleryWorker, db: Database, *args: str) -> Validated:
    """validate the memory app's task that keeps 1 MiB per run, 2 at a time."""
    leak = f"{MEMORY_APP}.leak"
    common = ["--database-url", db.url, "--args", "[1]", "--concurrency", "2"]
    return validate(worker, MEMORY_APP, leak, *common, *args)


def test_soak_fails_when_a_task_keeps_growing_memory(memory_app_worker, test_db: Database):
    worker = memory_app_worker()
    run = validate_leak(worker, test_db, "--count", "10", "--soak", "3s", "--warmup-rounds", "1")

    assert run.code == 1
    assert run.statuses() == {**dict.fromkeys(CRITERIA, "pass"), "memory_slope": "fail"}
    slope = run.criterion("memory_slope")
    assert slope["limit"] == 5 * MIB
    assert slope["measured"] > slope["limit"]
    # Every child kept 1 MiB per task: both grew in every judged window of the soak.
    slopes = {s["process"]: s for s in run.result["memory"]["soak_slopes"]}
    assert set(slopes) == labels(worker.children())
    for figures in slopes.values():
        judged = [v for v in figures["bytes_per_minute"][1:] if v is not None]
        assert judged and all(v > 5 * MIB for v in judged)
        assert figures["growth_bytes"] > 2 * MIB


def test_recycled_children_are_found_and_marked_in_the_report(
    memory_app_worker, test_db: Database, tmp_path: Path
):
    """lifeguard's memory_growth_limit replaces the leaking children: validate sees the
    pids change and marks each recycle on the RSS chart."""
    worker = memory_app_worker(options=json.dumps({"memory_growth_limit": "4MiB"}))
    report = tmp_path / "recycles.html"
    run = validate_leak(
        worker, test_db, "--count", "24", "--warmup-rounds", "0", "--report", str(report)
    )

    assert run.criterion("every_task_succeeded")["status"] == "pass"
    recycled = run.result["memory"]["recycles"]
    assert recycled, run.result["memory"]
    assert len({r["pid"] for r in recycled}) == len(recycled)
    assert all(r["pid"] not in worker.children() for r in recycled)
    (record,) = data_block(report.read_text())["records"]
    rss = next(chart for chart in record["charts"] if chart["id"] == "rss")
    markers = {(m["series"], m["kind"]) for m in rss["markers"]}
    assert markers == {(f"{HOST}:{r['pid']}", "recycle") for r in recycled}


# --- reading the workers' processes: each pool, each way -----------------------------------


@pytest.mark.parametrize(("mode", "via"), [("lifeguard", VIA_LIFEGUARD), ("stock", VIA_PROC)])
def test_threads_worker_is_its_own_task_process(
    memory_app_worker, celery_client: Celery, prefix: str, mode: str, via: str
):
    worker = memory_app_worker(mode=mode, pool="threads", concurrency=4)
    (node,) = find_workers(
        celery_client, f"q-{prefix}", f"{MEMORY_APP}.steady", 2.0, lifeguard=mode == "lifeguard"
    )
    assert (node.pool, node.concurrency, node.main_pid, node.local) == (
        PoolKind.THREADS,
        4,
        worker.pid,
        True,
    )
    sampler = ProcessSampler(celery_client, [node], 2.0)
    (process,) = sampler.sample()
    assert process.pid == worker.pid
    assert process.rss is not None and process.rss > 10 * MIB
    assert sampler.via[node.name] == via


def test_remote_worker_without_lifeguard_still_shows_its_children(
    memory_app_worker, celery_client: Celery, prefix: str
):
    """A worker on another machine without lifeguard: its pool's pids from
    inspect().stats() (recycles still show), no RSS."""
    worker = memory_app_worker(mode="stock")
    (node,) = find_workers(
        celery_client, f"q-{prefix}", f"{MEMORY_APP}.steady", 2.0, lifeguard=False
    )
    remote = dataclasses.replace(node, local=False)
    processes = ProcessSampler(celery_client, [remote], 2.0).sample()
    assert sorted(p.pid for p in processes) == worker.children()
    assert {p.rss for p in processes} == {None}
