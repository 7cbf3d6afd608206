"""One validation, phase by phase, against the user's running workers.

1. **workers**: the nodes consuming the task's queue (:mod:`.workers`);
2. **warm-up**: rounds of 2 tasks per unit of the workers' concurrency until the
   database's idle count stops changing (at most ``warmup_rounds``), so connections a
   healthy worker keeps (one per process and database) are in the baseline, as on a
   worker that has been running;
3. **baseline**: a sample of the database (``pg_stat_activity``, ``pg_stat_database``);
4. **burst**: ``count`` tasks sent, at most ``concurrency`` unfinished at a time if given
   (all at once otherwise), then **drain**: until every outcome is in the result backend;
5. **soak** (optional): the load kept going for ``soak`` seconds, then drained;
6. **settle**: a few seconds for connections to be released;
7. **final**: a sample, then the criteria (:mod:`.criteria`).

Samples are taken every ``interval`` seconds throughout, by a thread of their own.
"""

from __future__ import annotations

import platform
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from ..monitor.report import Monitor
from ..monitor.snapshot import SessionRates, Snapshot, session_rates
from ..report.record import Criterion, Phase, RunRecord
from ..version import __version__
from . import charts, criteria
from .load import Load, Outcomes, TaskCall
from .sampler import Recycle, Sample, Sampler, recycles
from .workers import VIA_STATS, CannotValidate, ProcessSampler, WorkerNode, find_workers

MIB = 1024 * 1024
#: Pause after a warm-up round before the idle connections are counted.
_ROUND_PAUSE = 0.3


@dataclass(frozen=True)
class Settings:
    """What to run and how to judge it (the command's options)."""

    call: TaskCall
    count: int = 500
    concurrency: int | None = None  # unfinished tasks at most; None: all at once
    budget: int | None = None  # connections the workers may hold; None: computed
    soak: float | None = None  # seconds
    slope_limit: int = 5 * MIB  # bytes per minute, for --soak
    settle: float = 3.0
    interval: float = 0.5
    timeout: float = 300.0  # seconds to wait for outcomes after the last send
    warmup_rounds: int = 3
    inspect_timeout: float = 1.0


class Progress(Protocol):
    """Where the run tells what it is doing (the command draws a progress bar)."""

    def phase(self, name: str, total: float | None = None) -> None: ...

    def update(self, completed: float, detail: str = "") -> None: ...


class _Silent:
    def phase(self, name: str, total: float | None = None) -> None:
        pass

    def update(self, completed: float, detail: str = "") -> None:
        pass


@dataclass
class Validation:
    """Runs the procedure against ``app``'s workers and judges the outcome."""

    app: Any
    monitor: Monitor
    settings: Settings
    app_name: str = ""
    progress: Progress = field(default_factory=_Silent)

    def __post_init__(self) -> None:
        self._t0 = time.monotonic()
        self.started_at = time.time()
        self.phases: list[Phase] = []
        self.nodes: list[WorkerNode] = []
        self.warmup = Outcomes()
        self.outcomes = Outcomes()
        self.sampler: Sampler | None = None

    def clock(self) -> float:
        return time.monotonic() - self._t0

    # --- the procedure ----------------------------------------------------------------

    def run(self) -> Result:
        """Raises :class:`CannotValidate` (or ``DatabaseUnreachable``) when it cannot run."""
        from ..guard import current_guard

        settings = self.settings
        self.progress.phase("finding the workers")
        self.nodes = find_workers(
            self.app,
            settings.call.queue,
            settings.call.name,
            settings.inspect_timeout,
            lifeguard=current_guard(self.app) is not None,
        )
        load = Load(self.app, settings.call, self.clock)
        processes = ProcessSampler(self.app, self.nodes, settings.inspect_timeout)
        self._t0, self.started_at = time.monotonic(), time.time()  # t = 0: the first sample
        sampler = self.sampler = Sampler(
            self.monitor, processes, self.nodes, self.clock, settings.interval
        )
        first, _ = sampler.take()
        if first.error is not None:
            raise CannotValidate(first.error)
        sampler.start()
        try:
            self._warm_up(load)
            baseline, baseline_snapshot = self._sample_or_fail("baseline")
            self._burst(load)
            if settings.soak:
                self._soak(load, settings.soak)
            self._settle(settings.settle)
            final, final_snapshot = self._sample_or_fail("final")
        finally:
            sampler.stop()
        return self._judge(baseline, baseline_snapshot, final, final_snapshot)

    @property
    def concurrency(self) -> int:
        """The workers' concurrency: tasks they run at once (processes, threads, ...)."""
        return sum(node.concurrency for node in self.nodes)

    def _sample_or_fail(self, what: str) -> tuple[Sample, Snapshot]:
        assert self.sampler is not None
        self.progress.phase(f"{what} sample")
        sample, snapshot = self.sampler.take()
        if snapshot is None:
            raise CannotValidate(f"the {what} sample failed: {sample.error}")
        return sample, snapshot

    def _warm_up(self, load: Load) -> None:
        rounds = self.settings.warmup_rounds
        if rounds <= 0:
            return
        assert self.sampler is not None
        start = self.clock()
        per_round = 2 * self.concurrency
        self.progress.phase("warm-up", rounds * per_round)
        previous: int | None = None

        def report(outcomes: Outcomes, in_flight: int) -> None:
            so_far = self.warmup.merge(outcomes)  # the rounds before, and this one
            self.progress.update(so_far.finished, self._detail(so_far))

        for index in range(rounds):
            outcomes = load.run(count=per_round, timeout=self.settings.timeout, on_progress=report)
            self.warmup = self.warmup.merge(outcomes)
            time.sleep(_ROUND_PAUSE)
            sample, _ = self.sampler.take()
            idle = None if sample.error else sample.by_state.get("idle", 0)
            if index > 0 and idle == previous:
                break
            previous = idle
        self.phases.append(Phase("warm-up", start, self.clock()))

    def _burst(self, load: Load) -> None:
        settings = self.settings
        start = self.clock()
        self.progress.phase("burst", settings.count)
        outcomes = load.run(
            count=settings.count,
            in_flight=settings.concurrency,
            timeout=settings.timeout,
            on_progress=self._reporter(),
        )
        self._load_phases("burst", start, outcomes)

    def _soak(self, load: Load, seconds: float) -> None:
        start = self.clock()
        in_flight = self.settings.concurrency or 2 * self.concurrency
        self.progress.phase(f"soak {seconds:g}s ({in_flight} at a time)", seconds)

        def report(outcomes: Outcomes, pending: int) -> None:
            self.progress.update(min(self.clock() - start, seconds), self._detail(outcomes))

        outcomes = load.run(
            until=start + seconds,
            in_flight=in_flight,
            timeout=self.settings.timeout,
            on_progress=report,
        )
        self._load_phases("soak", start, outcomes)

    def _load_phases(self, name: str, start: float, outcomes: Outcomes) -> None:
        self.outcomes = self.outcomes.merge(outcomes)
        sent_until = outcomes.last_sent_at or start
        end = self.clock()
        self.phases.append(Phase(name, start, sent_until))
        self.phases.append(Phase("drain", sent_until, end))

    def _settle(self, seconds: float) -> None:
        start = self.clock()
        self.progress.phase("settle", seconds)
        while (elapsed := self.clock() - start) < seconds:
            self.progress.update(elapsed, self._detail(self.outcomes))
            time.sleep(min(0.1, seconds - elapsed))
        self.phases.append(Phase("settle", start, self.clock()))

    def _reporter(self) -> Callable[[Outcomes, int], None]:
        def report(outcomes: Outcomes, in_flight: int) -> None:
            self.progress.update(outcomes.finished, self._detail(outcomes))

        return report

    def _detail(self, outcomes: Outcomes) -> str:
        text = f"{outcomes.succeeded} ok, {outcomes.failed} failed"
        latest = self.sampler.latest if self.sampler is not None else None
        if latest is not None and latest.error is None:
            idle = latest.by_state.get("idle", 0)
            text += f" · db {latest.total} ({idle} idle) · workers hold {latest.workers}"
        return text

    # --- judging ----------------------------------------------------------------------

    def budget(self) -> tuple[int, str]:
        """The connections the workers may hold, and how that number was reached."""
        if self.settings.budget is not None:
            return self.settings.budget, "--budget"
        return workers_budget(self.app, self.nodes)

    def _judge(
        self,
        baseline: Sample,
        baseline_snapshot: Snapshot,
        final: Sample,
        final_snapshot: Snapshot,
    ) -> Result:
        assert self.sampler is not None
        samples = self.sampler.samples
        budget, explained = self.budget()
        rates = session_rates(baseline_snapshot.baseline(), final_snapshot)
        no_rates = (
            "the session counters were reset during the run"
            if final_snapshot.counters is not None
            else f"PostgreSQL {final_snapshot.server_version // 10000} has no session counters "
            "(14+)"
        )
        judged = _Judged(baseline, final, rates, budget, explained, recycles(samples))
        judged.checks += [
            criteria.idle_back_to_baseline(baseline, final),
            criteria.no_idle_in_transaction(final),
            criteria.no_connection_errors(rates, no_rates),
            criteria.peak_within_budget(samples, budget, explained),
            criteria.every_task_succeeded(self.outcomes),
        ]
        soak = next((phase for phase in self.phases if phase.name == "soak"), None)
        if soak is not None:
            criterion, judged.slopes = criteria.memory_slope(
                soak, samples, self.settings.slope_limit, self._no_rss_reason()
            )
            judged.checks.append(criterion)
        record = self._record(judged)
        return Result(record, self._summary(record, judged))

    def _no_rss_reason(self) -> str:
        assert self.sampler is not None
        blind = [n for n, via in self.sampler.processes.via.items() if via == VIA_STATS]
        if not blind:
            return ""
        return (
            f"no RSS for {', '.join(blind)}: they run on another machine without lifeguard "
            "(lifeguard.install(app) lets their MainProcess report it)"
        )

    def _record(self, judged: _Judged) -> RunRecord:
        assert self.sampler is not None
        samples = self.sampler.samples
        duration = self.clock()
        record = RunRecord(
            title=f"lifeguard validate: {self.settings.call.name}",
            started_at=self.started_at,
            duration=duration,
            parameters=self.parameters(),
            phases=list(self.phases),
            criteria=list(judged.checks),
        )
        record.charts.append(charts.connections_chart(samples, judged.budget))
        optional = [
            charts.process_connections_chart(samples),
            charts.rss_chart(samples, judged.recycles),
        ]
        record.charts += [chart for chart in optional if chart is not None]
        record.charts.append(
            charts.throughput_chart(
                self.warmup.merge(self.outcomes), duration, self.settings.interval
            )
        )
        record.tables.append(charts.processes_table(samples, judged.final, judged.slopes))
        errors = charts.errors_table(self.outcomes)
        if errors is not None:
            record.tables.append(errors)
        record.notes += self._notes()
        return record

    def parameters(self) -> dict[str, str]:
        settings, call = self.settings, self.settings.call
        import celery

        return {
            "app": self.app_name,
            "task": call.name,
            "args / kwargs": f"{list(call.args)!r} / {call.kwargs!r}",
            "queue": call.queue,
            "count": str(settings.count),
            "concurrency": str(settings.concurrency or "all at once"),
            "soak": f"{settings.soak:g}s" if settings.soak else "no",
            "slope limit": f"{settings.slope_limit / MIB:g} MiB/min" if settings.soak else "-",
            "database": self.monitor.target.where,
            "workers": ", ".join(
                f"{n.name} ({n.pool.value} -c {n.concurrency})" for n in self.nodes
            ),
            "prefix": self.monitor.prefix,
            "sample interval": f"{settings.interval:g}s",
            "settle": f"{settings.settle:g}s",
            "host": platform.node(),
            "versions": f"lifeguard {__version__}, Celery {celery.__version__}, "
            f"Python {platform.python_version()}",
        }

    def _notes(self) -> list[str]:
        assert self.sampler is not None
        notes = [
            f"Warm-up: {self.warmup.sent} tasks before the baseline, so that connections "
            "kept by the workers are in it.",
        ]
        for node in self.nodes:
            via = self.sampler.processes.via.get(node.name, "")
            notes.append(
                f"{node.name}: {'lifeguard installed' if node.lifeguard else 'no lifeguard'}, "
                f"{'on this machine' if node.local else 'on another machine'}; processes "
                f"read with {via}."
            )
        return notes

    def _summary(self, record: RunRecord, judged: _Judged) -> dict[str, Any]:
        assert self.sampler is not None
        rates = judged.rates
        samples = [s for s in self.sampler.samples if s.error is None]
        peak = max(samples, key=lambda sample: sample.workers)
        processes = self.sampler.processes
        return {
            "result": record.verdict,
            "exit_code": 0 if record.verdict == "pass" else 1,
            "app": self.app_name,
            "task": self.settings.call.name,
            "queue": self.settings.call.queue,
            "database": self.monitor.target.where,
            "prefix": self.monitor.prefix,
            "parameters": record.parameters,
            "workers": [
                {**node.to_json(), "processes_via": processes.via.get(node.name)}
                for node in self.nodes
            ],
            "budget": {"connections": judged.budget, "explained": judged.explained},
            "phases": [
                {"name": p.name, "start": round(p.start, 3), "end": round(p.end, 3)}
                for p in self.phases
            ],
            "warmup": self.warmup.to_json(),
            "tasks": self.outcomes.to_json(),
            "connections": {
                "baseline": _counts(judged.baseline),
                "final": _counts(judged.final),
                "peak": {**_counts(peak), "t": round(peak.t, 3)},
                "peak_by_process": _peaks_by_process(samples),
            },
            "sessions": None
            if rates is None
            else {"seconds": round(rates.seconds, 3), **rates.delta.as_dict()},
            "memory": {
                "recycles": [
                    {"t": round(r.t, 3), "node": r.node, "pid": r.pid, "new": list(r.replaced_by)}
                    for r in judged.recycles
                ],
                "processes": _memory_json(self.sampler.samples),
                "soak_slopes": [
                    {
                        "process": s.label,
                        "bytes_per_minute": [None if v is None else round(v) for v in s.windows],
                        "growth_bytes": s.growth,
                    }
                    for s in judged.slopes
                ],
            },
            "criteria": [vars(criterion).copy() for criterion in record.criteria],
            "samples": len(self.sampler.samples),
            "duration": round(record.duration, 3),
        }


@dataclass
class _Judged:
    """What the criteria were judged on, for the record and the summary."""

    baseline: Sample
    final: Sample
    rates: SessionRates | None
    budget: int
    explained: str
    recycles: list[Recycle]
    checks: list[Criterion] = field(default_factory=list)
    slopes: list[criteria.ProcessSlope] = field(default_factory=list)


@dataclass(frozen=True)
class Result:
    """The report's record, and the summary ``--json`` prints."""

    record: RunRecord
    summary: dict[str, Any]

    @property
    def passed(self) -> bool:
        return self.record.verdict == "pass"


def _counts(sample: Sample) -> dict[str, Any]:
    return {
        "by_state": dict(sample.by_state),
        "total": sample.total,
        "workers": sample.workers,
        "workers_by_state": dict(sample.workers_by_state),
        "by_process": {label: dict(states) for label, states in sample.by_process.items()},
    }


def _peaks_by_process(samples: list[Sample]) -> dict[str, int]:
    peaks: dict[str, int] = {}
    for sample in samples:
        for label, states in sample.by_process.items():
            peaks[label] = max(peaks.get(label, 0), sum(states.values()))
    return dict(sorted(peaks.items()))


def _memory_json(samples: list[Sample]) -> list[dict[str, Any]]:
    first: dict[str, Any] = {}
    for sample in samples:
        for process in sample.processes:
            entry = first.setdefault(
                process.label,
                {"process": process.label, "node": process.node, "pid": process.pid,
                 "first_rss": None, "last_rss": None, "peak_rss": None},
            )  # fmt: skip
            if process.rss is None:
                continue
            entry["first_rss"] = entry["first_rss"] or process.rss
            entry["last_rss"] = process.rss
            entry["peak_rss"] = max(entry["peak_rss"] or 0, process.rss)
    return list(first.values())


def workers_budget(app: Any, nodes: Sequence[WorkerNode]) -> tuple[int, str]:
    """The connections the running workers may hold, and how: doctor's budget of the app's
    PostgreSQL aliases and engines (pool sizes included), for each worker's pool and
    concurrency. An app with neither counts one connection per task slot."""
    from ..doctor.budget import BudgetLine, green_budgets, worker_lines
    from ..doctor.context import (
        Setting,
        WorkerShape,
        django_aliases,
        engine_infos,
        resolve_options,
    )
    from ..guard import current_guard

    aliases = django_aliases() or ()
    guard = current_guard(app)
    options = resolve_options(guard)[0]
    engines = [e for e in engine_infos(guard) or () if e.dialect == "postgresql"]
    total, parts = 0, []
    for node in nodes:
        shape = WorkerShape(
            pool=Setting("pool", node.pool, "the worker"),
            concurrency=Setting("concurrency", node.concurrency, "the worker"),
            max_tasks_per_child=None,
            max_memory_per_child=None,
        )
        green = green_budgets(options, shape, aliases)
        lines = worker_lines(aliases, engines, shape, green) or [
            BudgetLine("one connection per task slot", shape.units, shape.processes, "")
        ]
        total += sum(line.per_host for line in lines)
        terms = " + ".join(f"{line.processes} x {line.per_process} {line.what}" for line in lines)
        parts.append(f"{node.name} ({node.pool.value} -c {node.concurrency}): {terms}")
    return total, "; ".join(parts)
