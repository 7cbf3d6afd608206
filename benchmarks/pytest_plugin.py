"""What the pytest plugin costs per test on a clean suite.

A generated project (a plain Celery app with a SQLAlchemy engine) has a suite of ``N``
tests, each sending one task and waiting for its result. The suite runs in a pytest
subprocess against a real ``celery worker -P prefork -c 2`` in four configurations,
interleaved over the rounds:

* **no-DB ceiling**: a stock worker started by hand, a task that touches no database;
* **stock**: the same worker, the task runs one query;
* **lifeguard worker**: lifeguard installed in the worker started by hand, plugin off;
* **plugin**: the plugin's own worker (lifeguard and its recorder) and every check after
  every test (the task's records, pg_stat_activity, pg_stat_database before and after).

Per test: setup + call + teardown as pytest reports them (``report.duration``, recorded
by the project's conftest), the first ``WARM_UP`` tests of a run left out (the plugin
starts its worker in the first one), and the part of it spent outside the test function
(the plugin's wait for the task's last phase and its read after the test; its read of
``pg_stat_database`` at the test's first publish is inside the function). The table
shows the median test of each run, then the median of the runs; the plugin's cost is
plugin minus lifeguard worker.

    python benchmarks/pytest_plugin.py --tests 200 --runs 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import textwrap
import uuid
from dataclasses import dataclass
from pathlib import Path

from _harness import ROOT, production_like_server
from lifeguard.demo.redis import find_redis
from lifeguard.demo.worker import CeleryWorker

WARM_UP = 10

APP = """
import os

from celery import Celery
from sqlalchemy import create_engine, text

app = Celery("bench_app", broker=os.environ["BENCH_BROKER"], backend=os.environ["BENCH_BROKER"])
app.conf.task_default_queue = os.environ["BENCH_QUEUE"]

if os.environ.get("BENCH_LIFEGUARD") == "1":
    import lifeguard

    guard = lifeguard.install(app)
    engine = guard.add_engine(lambda: create_engine(os.environ["BENCH_DB"], pool_size=1))
else:
    _engines = {}

    def engine():  # one per process, made after the fork: the stock practice
        if os.getpid() not in _engines:
            _engines[os.getpid()] = create_engine(os.environ["BENCH_DB"], pool_size=1)
        return _engines[os.getpid()]


@app.task
def ping(i):
    return i


@app.task
def query(i):
    with engine().connect() as connection:
        return connection.execute(text("SELECT :i"), {"i": i}).scalar()
"""

CONFTEST = """
import json
import os
import time

import pytest

_TOTAL = {}  # test -> setup + call + teardown, seconds
_BODY = {}  # test -> the test function alone


def pytest_runtest_logreport(report):
    _TOTAL[report.nodeid] = _TOTAL.get(report.nodeid, 0.0) + report.duration


@pytest.hookimpl(wrapper=True)
def pytest_pyfunc_call(pyfuncitem):
    started = time.perf_counter()
    try:
        return (yield)
    finally:
        _BODY[pyfuncitem.nodeid] = time.perf_counter() - started


def pytest_sessionfinish(session):
    with open(os.environ["BENCH_OUT"], "w") as out:
        json.dump([(total, _BODY.get(test, 0.0)) for test, total in _TOTAL.items()], out)
"""

SUITE = """
import os

import pytest

import bench_app

TASK = getattr(bench_app, os.environ["BENCH_TASK"])


@pytest.mark.parametrize("i", range(int(os.environ["BENCH_TESTS"])))
def test_task(i):
    assert TASK.delay(i).get(timeout=30) == i
"""


@dataclass(frozen=True)
class Config:
    label: str
    task: str
    lifeguard: bool  # installed in the worker
    plugin: bool  # the plugin starts the worker and checks every test


CONFIGS = [
    Config("no-DB ceiling (stock worker, no query)", "ping", False, False),
    Config("stock worker, one query", "query", False, False),
    Config("lifeguard worker, one query, plugin off", "query", True, False),
    Config("plugin: its worker, every check", "query", True, True),
]


def write_project(directory: Path) -> None:
    (directory / "bench_app.py").write_text(textwrap.dedent(APP))
    (directory / "conftest.py").write_text(CONFTEST)
    (directory / "test_bench.py").write_text(SUITE)


@dataclass(frozen=True)
class Measure:
    per_test: float  # ms, the median test (setup + call + teardown)
    outside_body: float  # ms, the median test's time outside its own function


def run_suite(config: Config, project: Path, db_url: str, broker: str, tests: int) -> Measure:
    """One run of the suite."""
    out = project / f"durations-{uuid.uuid4().hex[:6]}.json"
    env = dict(
        os.environ,
        BENCH_BROKER=broker,
        BENCH_QUEUE=f"bench-plugin-{uuid.uuid4().hex[:8]}",
        BENCH_DB=db_url,
        BENCH_LIFEGUARD="1" if config.lifeguard else "0",
        BENCH_TASK=config.task,
        BENCH_TESTS=str(tests),
        BENCH_OUT=str(out),
        PYTHONPATH=os.pathsep.join([str(project), os.environ.get("PYTHONPATH", ""), ROOT]),
    )
    command = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-p", "no:django"]
    worker = None
    if config.plugin:
        command += ["-p", "lifeguard.pytest", "-o", "lifeguard=true"]
        command += [
            "-o",
            "lifeguard_celery_app=bench_app",
            "-o",
            f"lifeguard_database_url={db_url}",
        ]
    else:
        command += ["-p", "no:lifeguard.pytest"]
        worker = CeleryWorker(
            "bench_app",
            pool="prefork",
            concurrency=2,
            queue=env["BENCH_QUEUE"],
            env=env,
            cwd=project,
        )
        worker.start()
    try:
        done = subprocess.run(
            command, cwd=project, env=env, capture_output=True, text=True, check=False
        )
    finally:
        if worker is not None:
            worker.stop()
    if done.returncode != 0:
        raise SystemExit(
            f"{config.label}: the suite failed:\n{done.stdout[-3000:]}{done.stderr[-2000:]}"
        )
    durations = json.loads(out.read_text())[WARM_UP:]
    return Measure(
        statistics.median(total for total, _ in durations) * 1000,
        statistics.median(total - body for total, body in durations) * 1000,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tests", type=int, default=200)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--plain", action="store_true", help="no TLS")
    args = parser.parse_args()
    embedded, server, db_url = production_like_server(plain=args.plain)
    broker = f"{find_redis()}/13"
    results: dict[str, list[Measure]] = {c.label: [] for c in CONFIGS}
    try:
        with tempfile.TemporaryDirectory(prefix="bench-plugin-") as directory:
            project = Path(directory)
            write_project(project)
            for round_no in range(args.runs):
                shift = round_no % len(CONFIGS)
                for config in [*CONFIGS[shift:], *CONFIGS[:shift]]:
                    m = run_suite(config, project, db_url, broker, args.tests)
                    results[config.label].append(m)
                    print(
                        f"round {round_no + 1}: {config.label:<42} {m.per_test:6.2f} ms/test, "
                        f"{m.outside_body:5.2f} ms outside the test function",
                        file=sys.stderr,
                    )
    finally:
        embedded.destroy()
    per_test = {k: statistics.median(m.per_test for m in v) for k, v in results.items()}
    outside = {k: statistics.median(m.outside_body for m in v) for k, v in results.items()}
    stock = per_test[CONFIGS[1].label]
    print(
        f"\n{args.tests} tests per run, median of {args.runs} runs, prefork -c 2, "
        f"{'TLS' if server.tls else 'plaintext'} + scram-sha-256\n"
    )
    print("| configuration | ms per test | vs stock | ms outside the test function |")
    print("| --- | ---: | ---: | ---: |")
    for label, ms in per_test.items():
        print(f"| {label} | {ms:.2f} | {ms / stock:.2f}x | {outside[label]:.2f} |")
    plugin, by_hand = CONFIGS[3].label, CONFIGS[2].label
    print(
        f"\nthe plugin's own work per test: {outside[plugin] - outside[by_hand]:.2f} ms "
        f"(outside the test function, plugin minus lifeguard worker); per test in all: "
        f"{per_test[plugin] - per_test[by_hand]:+.2f} ms"
    )


if __name__ == "__main__":
    main()
