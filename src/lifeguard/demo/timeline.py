"""The demo's report run: one workload on stock Celery, then on lifeguard, with the same
faults injected at the same moments, sampled from PostgreSQL and ``/proc``.

Each side is a real prefork worker of the sandbox project under a steady stream of
one-query tasks. At marked moments the run injects: a soft time limit mid-query, a task
that leaves a transaction open, ``pg_terminate_backend`` of the workers' backends, a
task that leaks memory, and (embedded server only) a database restart. Every figure of
the report comes from what was measured: ``pg_stat_database.sessions``,
``pg_stat_activity`` states, the tasks' outcomes in the result backend, RSS of each
child.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from ..monitor.report import Monitor
from ..monitor.snapshot import IDLE_IN_TRANSACTION, IDLE_IN_TRANSACTION_ABORTED
from ..monitor.target import resolve_target
from ..monitor.thresholds import Thresholds
from ..report.record import FAIL, PASS, UNIT_BYTES, Chart, Criterion, Marker, RunRecord, Series
from ..validate import charts
from ..validate.sampler import Sample, Sampler, recycles
from ..validate.workers import ProcessSampler, find_workers, lifeguard_nodes
from .project import TASKS

Log = Callable[[str], None]
MIB = 1024 * 1024
INTERVAL = 0.5  # seconds between samples
RATE = 8.0  # steady tasks per second
LEAK_MIB = 8
LEAK_RUNS = 10
MEMORY_LIMIT_MIB = 32


@dataclass(frozen=True)
class Fault:
    """A fault the run injects, ``at`` seconds into each side."""

    key: str
    at: float
    label: str


def faults(restart: bool, duration: float) -> list[Fault]:
    """The faults, at the same fractions of each side's run (20 s at least)."""
    planned = [
        Fault("soft_time_limit", 0.12 * duration, "soft time limit mid-query"),
        Fault("open_transaction", 0.27 * duration, "a task leaves a transaction open"),
        Fault("terminate", 0.38 * duration, "pg_terminate_backend"),
        Fault("leak", 0.5 * duration, f"a task keeps {LEAK_MIB} MiB, {LEAK_RUNS} runs"),
    ]
    if restart:
        planned.append(Fault("restart", 0.75 * duration, "database restart"))
    return planned


@dataclass
class Side:
    """What one side measured, and its record for the report."""

    title: str
    lifeguard: bool = False  # detected from the worker, not assumed
    concurrency: int = 0
    succeeded: int = 0
    failed: int = 0
    sessions: int = 0
    failed_after: dict[str, int] = field(default_factory=dict)
    ran_on: int = 0  # backends still running the interrupted query after its limit
    idle_in_transaction: float = 0.0  # backend-seconds
    growth: int = 0  # bytes: the most one child grew without being recycled
    recycles: int = 0
    record: RunRecord | None = None

    @property
    def tasks(self) -> int:
        return self.succeeded + self.failed

    @property
    def sessions_per_task(self) -> float:
        return self.sessions / max(self.tasks, 1)


@dataclass
class _Task:
    result: Any
    fault: str | None = None  # the fault this task is (not counted as a victim)
    t: float | None = None
    ok: bool | None = None


class SideRun:
    """One side: the worker, the load thread, the sampler, the faults."""

    def __init__(self, demo: Any, mode: str, title: str, duration: float, log: Log) -> None:
        self.demo = demo
        self.mode = mode
        self.title = title
        self.duration = duration
        self.log = log
        self.restart = demo.can_restart
        self.faults = faults(self.restart, duration)
        self.tasks: list[_Task] = []
        self.samples: list[Sample] = []
        self.sessions: list[tuple[float, int]] = []
        self.fault_t: dict[str, float] = {}
        self.side = Side(title)

    def run(self) -> Side:
        options = {"memory_growth_limit": f"{MEMORY_LIMIT_MIB}MiB"}
        with self.demo.worker(self.mode, options=json.dumps(options)) as client:
            self.client = client
            app = client.app
            found = find_workers(
                app, client.worker.queue, f"{TASKS}.one_query", 2.0, lifeguard=False
            )
            # Whether lifeguard runs is asked of the worker itself, not of this process.
            detected = lifeguard_nodes(app, [node.name for node in found], timeout=2.0)
            nodes = [replace(node, lifeguard=node.name in detected) for node in found]
            self.side.lifeguard = bool(detected)
            self.side.concurrency = sum(node.concurrency for node in nodes)
            monitor = Monitor(
                resolve_target(self.demo.server.url(self.demo.database)),
                self.demo.PREFIX,
                Thresholds(),
            )
            self.started_at = time.time()
            self.t0 = time.monotonic()
            sampler = Sampler(monitor, ProcessSampler(app, nodes, 1.0), nodes, self.clock, INTERVAL)
            stop_load, stop_sampling = threading.Event(), threading.Event()
            sampling = threading.Thread(
                target=self._sample, args=(sampler, stop_sampling), daemon=True
            )
            loading = threading.Thread(target=self._load, args=(stop_load,), daemon=True)
            self._take(sampler)
            sampling.start()
            loading.start()
            try:
                self._inject()
                stop_load.set()
                loading.join()
                self._collect()
                time.sleep(1.0)  # sessions' statistics are flushed as they end
            finally:  # on Ctrl-C too: no thread left, then the worker is stopped
                stop_load.set()
                stop_sampling.set()
                loading.join()
                sampling.join()
            self._take(sampler)
        self._judge()
        return self.side

    def clock(self) -> float:
        return time.monotonic() - self.t0

    # --- threads ------------------------------------------------------------------------

    def _take(self, sampler: Sampler) -> None:
        sample, snapshot = sampler.take()
        self.samples.append(sample)
        if snapshot is not None and snapshot.counters is not None:
            self.sessions.append((sample.t, snapshot.counters.sessions))

    def _sample(self, sampler: Sampler, stop: threading.Event) -> None:
        while not stop.wait(INTERVAL):
            self._take(sampler)

    def _load(self, stop: threading.Event) -> None:
        next_at = self.clock()
        while not stop.is_set() and self.clock() < self.duration:
            self.tasks.append(_Task(self.client.send("one_query")))
            next_at += 1 / RATE
            stop.wait(max(next_at - self.clock(), 0.0))

    def _wait_until(self, t: float) -> None:
        time.sleep(max(t - self.clock(), 0.0))

    def _inject(self) -> None:
        for fault in self.faults:
            self._wait_until(fault.at)
            self.fault_t[fault.key] = self.clock()
            self.log(f"{self.title}: {fault.label} at {self.clock():.0f}s")
            getattr(self, f"_fault_{fault.key}")(fault)
        self._wait_until(self.duration)

    def _fault_soft_time_limit(self, fault: Fault) -> None:
        result = self.client.send("sleep_query", 5, soft_time_limit=1)
        self.tasks.append(_Task(result, fault.key))
        time.sleep(2.5)  # the limit struck 1 s in: is the query still running?
        with self.demo.server.admin() as conn:
            self.side.ran_on = conn.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND state = 'active' "
                "AND query LIKE 'SELECT pg_sleep%%'",
                [self.demo.database],
            ).fetchone()[0]

    def _fault_open_transaction(self, fault: Fault) -> None:
        self.tasks.append(_Task(self.client.send("leave_transaction_open", "demo"), fault.key))

    def _fault_terminate(self, fault: Fault) -> None:
        with self.demo.server.admin() as conn:
            conn.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s "
                "AND application_name LIKE %s",
                [self.demo.database, self.demo.PREFIX + ":%"],
            )

    def _fault_leak(self, fault: Fault) -> None:
        for _ in range(LEAK_RUNS):
            self.tasks.append(_Task(self.client.send("leak", LEAK_MIB), fault.key))
            time.sleep(0.4)

    def _fault_restart(self, fault: Fault) -> None:
        self.demo.restart_server()

    def _collect(self, within: float = 60.0) -> None:
        deadline = self.clock() + within
        for task in self.tasks:
            try:
                task.result.get(timeout=max(deadline - self.clock(), 0.1), propagate=False)
            except Exception:  # never finished: counted as failed at the end
                task.ok, task.t = False, self.clock()
                continue
            task.ok = task.result.state == "SUCCESS"
            done = task.result.date_done
            task.t = done.timestamp() - self.started_at if done is not None else self.clock()

    # --- the figures --------------------------------------------------------------------

    def _judge(self) -> None:
        side = self.side
        load = [task for task in self.tasks if task.fault is None or task.fault == "leak"]
        side.succeeded = sum(1 for task in self.tasks if task.ok)
        side.failed = sum(1 for task in self.tasks if not task.ok)
        if len(self.sessions) >= 2:
            side.sessions = self.sessions[-1][1] - self.sessions[0][1]
        keys = [fault.key for fault in self.faults]
        for index, key in enumerate(keys):
            start = self.fault_t.get(key, self.duration)
            end = self.fault_t.get(keys[index + 1], 1e9) if index + 1 < len(keys) else 1e9
            side.failed_after[key] = sum(
                1 for task in load if not task.ok and task.t is not None and start <= task.t < end
            )
        stuck = (IDLE_IN_TRANSACTION, IDLE_IN_TRANSACTION_ABORTED)
        side.idle_in_transaction = INTERVAL * sum(
            sample.workers_by_state.get(state, 0) for sample in self.samples for state in stuck
        )
        gone = recycles(self.samples)
        side.recycles = len(gone)
        # Growth without recycle: children still there at the end, first RSS to last.
        first: dict[str, int] = {}
        last: dict[str, int] = {}
        for sample in self.samples:
            for process in sample.processes:
                if process.rss:
                    first.setdefault(process.label, process.rss)
                    last[process.label] = process.rss
        alive = {p.label for p in self.samples[-1].processes} if self.samples else set()
        side.growth = max((last[k] - first[k] for k in last if k in alive), default=0)
        side.record = self._record(gone)

    def _record(self, gone: list[Any]) -> RunRecord:
        side = self.side
        duration = max((s.t for s in self.samples), default=self.duration)
        record = RunRecord(title=self.title, started_at=self.started_at, duration=duration)
        record.parameters = {
            "worker": f"prefork, concurrency {side.concurrency} (from the worker)",
            "lifeguard": "installed (the worker answers lifeguard_processes)"
            if side.lifeguard
            else "not installed (the worker does not answer lifeguard_processes)",
            "load": f"{RATE:g} one-query tasks/s for {self.duration:g}s",
            "faults": ", ".join(f"{f.label} at {f.at:.0f}s" for f in self.faults),
        }
        sessions = Chart("sessions", "Sessions opened per second", "sessions/s")
        opened = sessions.series_named("sessions opened")
        for (t0, n0), (t1, n1) in zip(self.sessions, self.sessions[1:], strict=False):
            opened.add(t1, (n1 - n0) / max(t1 - t0, 1e-3))
        backends = charts.connections_chart(self.samples, side.concurrency)
        backends.title = "Backends by state"
        backends.limit = None  # the budget line of validate: not this page's question
        backends.note = (
            "Every client backend of the demo's database (the sampler's own included), "
            "stacked by state; the dashed line is what the worker holds."
        )
        throughput = Chart("throughput", "Tasks succeeded and failed per second", "tasks/s")
        for name, ok, color in (("succeeded", True, "#16a34a"), ("failed", False, "#dc2626")):
            series = Series(name, color=color)
            for second in range(int(duration) + 1):
                series.add(
                    second + 0.5,
                    sum(1 for t in self.tasks if t.ok is ok and t.t and second <= t.t < second + 1),
                )
            throughput.series.append(series)
        rss = charts.rss_chart(self.samples, gone) or Chart("rss", "RSS per task process", "")
        rss.title = "RSS per child, with recycles"
        rss.limit = float(MEMORY_LIMIT_MIB * MIB) if side.lifeguard else None
        rss.limit_label = f"memory_growth_limit {MEMORY_LIMIT_MIB} MiB" if side.lifeguard else ""
        if rss.unit != UNIT_BYTES:
            rss.unit = UNIT_BYTES
        for chart in (sessions, backends, throughput, rss):
            for fault in self.faults:
                t = self.fault_t.get(fault.key)
                if t is not None:
                    chart.markers.append(Marker(t, fault.label, kind="fault"))
            record.charts.append(chart)
        record.criteria = criteria(side, [f for f in self.faults if f.key in self.fault_t])
        return record


def criteria(side: Side, done: list[Fault]) -> list[Criterion]:
    """Criteria from the measured figures: the same thresholds on both sides."""
    found = [
        Criterion(
            "sessions_per_task",
            "At most 1 new session per 10 tasks",
            PASS if side.sessions_per_task <= 0.1 else FAIL,
            f"{side.sessions} sessions opened for {side.tasks} tasks "
            f"({side.sessions_per_task:.2f} per task)",
        ),
        Criterion(
            "query_cancelled",
            "The query a soft time limit interrupted stops on the server",
            PASS if side.ran_on == 0 else FAIL,
            f"{side.ran_on} backend still running it 1.5 s after the limit",
        ),
    ]
    for fault in done:
        failed = side.failed_after.get(fault.key, 0)
        found.append(
            Criterion(
                f"failed_after_{fault.key}",
                f"No task fails after: {fault.label}",
                PASS if failed == 0 else FAIL,
                f"{failed} load task(s) failed between this fault and the next "
                "(the faulty task itself not counted)",
            )
        )
    found.append(
        Criterion(
            "idle_in_transaction",
            "No backend left idle in transaction",
            PASS if side.idle_in_transaction < 1 else FAIL,
            f"{side.idle_in_transaction:.1f} backend-seconds idle in transaction, holding "
            "its locks",
        )
    )
    limit = MEMORY_LIMIT_MIB * MIB
    found.append(
        Criterion(
            "memory_growth",
            f"No child grows more than {MEMORY_LIMIT_MIB} MiB without being recycled",
            PASS if side.growth <= limit else FAIL,
            f"largest growth of one child: +{side.growth / MIB:.0f} MiB; "
            f"{side.recycles} recycle(s)",
        )
    )
    return found


def summary_rows(stock: Side, guarded: Side) -> list[list[str]]:
    """The numbers at the top of the report and at the end of the terminal output."""

    def failed_after(side: Side) -> str:
        return str(sum(side.failed_after.values()))

    return [
        ["tasks succeeded / failed", *(f"{s.succeeded} / {s.failed}" for s in (stock, guarded))],
        [
            "new database sessions",
            *(f"{s.sessions} ({s.sessions_per_task:.2f} per task)" for s in (stock, guarded)),
        ],
        ["load tasks failed after a fault", failed_after(stock), failed_after(guarded)],
        [
            "interrupted query still running on the server",
            *(f"{s.ran_on} backend(s)" for s in (stock, guarded)),
        ],
        [
            "time idle in transaction",
            *(f"{s.idle_in_transaction:.1f} backend-s" for s in (stock, guarded)),
        ],
        [
            "largest child growth without recycle",
            *(f"+{s.growth / MIB:.0f} MiB" for s in (stock, guarded)),
        ],
        ["children recycled", str(stock.recycles), str(guarded.recycles)],
    ]


def report_page(stock: Side, guarded: Side) -> str:
    """The HTML report: both sides on the same axes, the summary in numbers on top."""
    from ..report.html import render_comparison
    from ..report.record import Table

    assert stock.record is not None and guarded.record is not None
    summary = Table(
        "What the same load and the same faults did (measured on PostgreSQL and /proc)",
        ["", stock.title, guarded.title],
        summary_rows(stock, guarded),
    )
    notes = [
        "Fault moments are the dashed violet rules; orange circles mark a child recycled.",
        "Stock Celery's Django fixup closes the connection around every task, hence a new "
        "session per task; with CELERY_DB_REUSE_MAX (its reuse knob) the connection of an "
        "interrupted query is reused instead, and the next tasks on that child fail (the "
        "terminal table shows that row).",
    ]
    return render_comparison(
        stock.record,
        guarded.record,
        "lifeguard demo: the same workload on stock Celery and on lifeguard",
        summary,
        notes,
    )


def run_sides(demo: Any, duration: float, log: Log) -> tuple[Side, Side]:
    """Both sides, stock first, with the same load and faults."""
    sides = []
    for mode, title in (("stock", "stock Celery"), ("lifeguard", "lifeguard")):
        log(f"report run, {title}: {RATE:g} tasks/s for {duration:g}s, with faults: start")
        side = SideRun(demo, mode, title, duration, log).run()
        log(
            f"report run, {title}: end ({side.succeeded} succeeded, {side.failed} failed, "
            f"{side.sessions} new sessions, {side.recycles} recycles)"
        )
        sides.append(side)
    return sides[0], sides[1]
