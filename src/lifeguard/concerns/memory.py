"""Worker memory: RSS per task and per task name, growth slope, recycling on limits that
measure the right thing, and (on demand) the allocation sites of a leak.

In each process that runs tasks (a prefork child, or the worker itself):

* the current RSS is read before and after every task from ``/proc/self/statm`` with
  ``os.pread`` on a descriptor opened after fork (about 2 µs; a descriptor inherited
  across fork would read the parent); psutil is the fallback off Linux;
* each task's RSS delta is credited to its task name. Under threads, gevent and eventlet
  RSS is process-wide, so a delta is credited only when the task ran alone: no other
  task was running when it started, and none started before it ended;
* the growth slope (KiB per task) is a least-squares fit of RSS over the last
  ``memory_slope_window`` tasks;
* after each task, three optional limits are checked: the current RSS
  (``memory_limit``), the growth since the process's first task
  (``memory_growth_limit``), the slope (``memory_slope_limit``). Over one, the process
  is recycled between tasks (:meth:`lifeguard.lifecycle.Lifecycle.request_recycle`);
* leak-site mode diffs tracemalloc snapshots every ``memory_leak_sites_every`` tasks.

Unlike Celery's ``max_memory_per_child`` (the child's lifetime peak, ``ru_maxrss``), the
current RSS is what stays after a task: a task that allocates and frees a large buffer
does not recycle the process. A process that starts above ``memory_limit`` (a prefork
child inherits its parent's pages) is not recycled for it: its replacement would start
just as large, and recycle after every task (celery#4125).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import tracemalloc
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import ConfigurationError
from ..hooks import Hook, PoolKind, TaskOutcome, TaskRun, WorkerInfo
from ..options import Options
from .metrics import Sample

logger = logging.getLogger("lifeguard.memory")

KIB = 1024
MIB = 1024 * 1024
_SCRATCH_KEY = "memory"


def _mib(size: float) -> str:
    return f"{size / MIB:.1f} MiB"


def _signed_mib(size: float) -> str:
    return f"{'+' if size >= 0 else '-'}{abs(size) / MIB:.1f} MiB"


# --- reading RSS ------------------------------------------------------------------------


class RssReader:
    """The current RSS of this process, in bytes. Open it in the process it measures."""

    def __init__(self, read: Callable[[], int], source: str, close: Callable[[], None]) -> None:
        self.read = read
        self.source = source
        self.close = close

    @classmethod
    def open(cls) -> RssReader | None:
        """``/proc/self/statm`` (Linux), else psutil, else None."""
        try:
            fd = os.open("/proc/self/statm", os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except OSError:
            return cls._open_psutil()
        page_size = os.sysconf("SC_PAGE_SIZE")

        def read(pread: Callable[[int, int, int], bytes] = os.pread) -> int:
            # "size resident shared ...", in pages
            return int(pread(fd, 128, 0).split(None, 2)[1]) * page_size

        return cls(read, "/proc/self/statm", lambda: os.close(fd))

    @classmethod
    def _open_psutil(cls) -> RssReader | None:
        try:
            import psutil
        except ImportError:
            return None
        process = psutil.Process()

        def read() -> int:
            return int(process.memory_info().rss)

        return cls(read, "psutil", lambda: None)


def read_rss_once() -> int | None:
    reader = RssReader.open()
    if reader is None:
        return None
    try:
        return reader.read()
    finally:
        reader.close()


def peak_rss() -> int | None:
    """The lifetime peak RSS (``ru_maxrss``): what Celery's max_memory_per_child checks."""
    try:
        import resource
    except ImportError:
        return None
    import sys

    maxrss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(maxrss) if sys.platform == "darwin" else int(maxrss) * KIB


# --- figures ---------------------------------------------------------------------------


@dataclass
class TaskMemory:
    """RSS deltas of one task name in this process."""

    runs: int = 0
    measured: int = 0  # runs that ran alone, whose delta is credited here
    growth: int = 0  # bytes: sum of the measured deltas

    def as_dict(self, total_growth: int) -> dict[str, Any]:
        share = max(self.growth, 0) / total_growth if total_growth > 0 else 0.0
        return {
            "runs": self.runs,
            "measured": self.measured,
            "growth_kib": round(self.growth / KIB, 1),
            "mean_kib": round(self.growth / KIB / self.measured, 1) if self.measured else None,
            "share": round(share, 3),
        }


class SlopeWindow:
    """Least-squares slope of RSS against task number over the last ``size`` tasks.

    Running sums make each task O(1); integers keep them exact however long the
    process lives.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.points: deque[tuple[int, int]] = deque()
        self.sx = self.sy = self.sxx = self.sxy = 0

    def __len__(self) -> int:
        return len(self.points)

    def add(self, x: int, y: int) -> None:
        self.points.append((x, y))
        self.sx += x
        self.sy += y
        self.sxx += x * x
        self.sxy += x * y
        if len(self.points) > self.size:
            ox, oy = self.points.popleft()
            self.sx -= ox
            self.sy -= oy
            self.sxx -= ox * ox
            self.sxy -= ox * oy

    def slope(self) -> float | None:
        """Bytes per task, or None with fewer than two points."""
        n = len(self.points)
        spread = n * self.sxx - self.sx * self.sx
        if n < 2 or spread == 0:
            return None
        return (n * self.sxy - self.sx * self.sy) / spread


def top_growers(by_task: dict[str, TaskMemory], unattributed: int = 0, limit: int = 3) -> str:
    """'a +12.0 MiB (96%) in 6 runs, b +0.5 MiB (4%) in 6 runs' for a log line."""
    total = sum(max(entry.growth, 0) for entry in by_task.values())
    growing = sorted(
        (item for item in by_task.items() if item[1].growth > 0),
        key=lambda item: item[1].growth,
        reverse=True,
    )[:limit]
    text = ", ".join(
        f"{name} {_signed_mib(entry.growth)} ({entry.growth / total:.0%}) in {entry.measured} runs"
        for name, entry in growing
    )
    if unattributed:
        overlapped = f"{unattributed} tasks overlapped others and are not counted"
        text = f"{text}; {overlapped}" if text else f"nothing measured alone ({overlapped})"
    return text or "no task grew"


# --- leak-site mode --------------------------------------------------------------------

_IGNORED_FILES = (
    tracemalloc.__file__,
    __file__,
    "<frozen importlib._bootstrap>",
    "<frozen importlib._bootstrap_external>",
    "<unknown>",
)


class LeakSites:
    """tracemalloc snapshots every ``every`` tasks; logs the allocation sites that grew.

    The first snapshot is taken after the process's first task, so first-use imports
    and caches are not reported.
    """

    def __init__(self, every: int, top: int, frames: int) -> None:
        self.every = every
        self.top = top
        self.key_type = "lineno" if frames == 1 else "traceback"
        self.started_tracing = not tracemalloc.is_tracing()
        if self.started_tracing:
            tracemalloc.start(frames)
        self.previous: tracemalloc.Snapshot | None = None
        self.names: Counter[str] = Counter()
        self.report: list[dict[str, Any]] = []
        self.report_tasks: dict[str, int] = {}

    def task_done(self, name: str) -> None:
        self.names[name] += 1
        if self.previous is None:
            self._start_period()
            return
        if sum(self.names.values()) >= self.every:
            self._report()
            self._start_period()

    def _snapshot(self) -> tracemalloc.Snapshot:
        return tracemalloc.take_snapshot().filter_traces(
            [tracemalloc.Filter(False, pattern) for pattern in _IGNORED_FILES]
        )

    def _start_period(self) -> None:
        self.previous = self._snapshot()
        self.names = Counter()

    def _report(self) -> None:
        assert self.previous is not None
        diff = self._snapshot().compare_to(self.previous, self.key_type)
        growing = [stat for stat in diff if stat.size_diff > 0][: self.top]
        self.report = [
            {
                "site": _site(stat.traceback),
                "growth_kib": round(stat.size_diff / KIB, 1),
                "blocks": stat.count_diff,
            }
            for stat in growing
        ]
        self.report_tasks = dict(self.names.most_common())
        tasks = ", ".join(f"{name} x{count}" for name, count in self.names.most_common())
        lines = [
            f"  {_signed_mib(stat.size_diff)} ({stat.count_diff:+d} blocks) {_site(stat.traceback)}"
            for stat in growing
        ]
        logger.warning(
            "lifeguard: leak sites of process %d over its last %d tasks (%s):\n%s",
            os.getpid(),
            sum(self.names.values()),
            tasks,
            "\n".join(lines) or "  no allocation site grew",
        )

    def stop(self) -> None:
        if self.started_tracing:
            tracemalloc.stop()


def _site(traceback: tracemalloc.Traceback) -> str:
    return " <- ".join(f"{frame.filename}:{frame.lineno}" for frame in reversed(traceback))


# --- the hook --------------------------------------------------------------------------


class MemoryWatchdog(Hook):
    """The memory concern: one instance per guard, state per process."""

    name = "memory"

    def __init__(self) -> None:
        self.enabled = False
        self.reader: RssReader | None = None
        self.options: Options | None = None
        self._concurrent = False
        self._check_limits = False
        self._lock = threading.Lock()
        self._reset()

    def _reset(self) -> None:
        """Figures of one process: a forked child starts from nothing."""
        self.birth_rss: int | None = None
        self.last_rss: int | None = None
        self.peak_rss = 0
        self.tasks = 0
        self.unattributed = 0
        self.by_task: dict[str, TaskMemory] = {}
        size = self.options.memory_slope_window if self.options else 100
        self.window = SlopeWindow(size)
        self.recycle_reason: str | None = None
        self.born_above_limit = False
        self.leak_sites: LeakSites | None = None
        self._running = 0
        self._generation = 0

    @property
    def has_limits(self) -> bool:
        options = self.options
        return options is not None and (
            options.memory_limit is not None
            or options.memory_growth_limit is not None
            or options.memory_slope_limit is not None
        )

    # --- worker start: validate, prepare recycling, warn about limits below birth ------

    def on_worker_start(self, worker: WorkerInfo) -> None:
        self.options = options = self.guard.options
        if not options.memory:
            if self.has_limits or options.memory_leak_sites_every is not None:
                raise ConfigurationError(
                    "lifeguard option memory=False turns the memory watchdog off, but "
                    "memory limits or leak-site mode are set: remove them or set memory=True."
                )
            return
        worker_rss = read_rss_once()
        if worker_rss is None:
            if self.has_limits:
                raise ConfigurationError(
                    "lifeguard's memory limits need /proc/self/statm (Linux) or psutil to "
                    "read RSS: pip install psutil, or remove the memory_* limits."
                )
            self.guard.lifecycle.announce(
                logger,
                logging.WARNING,
                "lifeguard: memory watchdog off: no /proc/self/statm and no psutil "
                "(pip install psutil)",
            )
            return
        self.enabled = True
        if self.has_limits:
            self.guard.lifecycle.prepare_recycling()
        self._warn_about_limits(worker, worker_rss)
        self.guard.lifecycle.announce(
            logger, logging.INFO, "lifeguard: memory watchdog: %s", self._policy(worker)
        )

    def _warn_about_limits(self, worker: WorkerInfo, worker_rss: int) -> None:
        assert self.options is not None
        limit = self.options.memory_limit
        born = "each child starts with the MainProcess's pages" if worker.pool.forks else ""
        if limit is not None and limit <= worker_rss:
            self.guard.lifecycle.announce(
                logger,
                logging.WARNING,
                "lifeguard: memory_limit=%s is below the %s this worker already uses%s: "
                "a process that starts above the limit is not recycled for it (its "
                "replacement would start as large). Set memory_limit above %s plus the "
                "tasks' working set, or use memory_growth_limit.",
                _mib(limit),
                _mib(worker_rss),
                f" ({born})" if born else "",
                _mib(worker_rss),
            )
        celery_limit = getattr(self.guard.app.conf, "worker_max_memory_per_child", None)
        if not celery_limit:
            return
        if not worker.pool.forks:
            self.guard.lifecycle.announce(
                logger,
                logging.WARNING,
                "lifeguard: Celery's worker_max_memory_per_child is ignored by the %s "
                "pool (prefork only); lifeguard's memory_limit works with every pool.",
                worker.pool.value,
            )
        elif int(celery_limit) * KIB <= worker_rss:
            self.guard.lifecycle.announce(
                logger,
                logging.WARNING,
                "lifeguard: Celery's worker_max_memory_per_child=%s KiB is below the "
                "MainProcess's %s, which every child starts with: each child will be "
                "replaced after every task (celery#4125).",
                celery_limit,
                _mib(worker_rss),
            )

    def _policy(self, worker: WorkerInfo) -> str:
        assert self.options is not None
        options = self.options
        limits = []
        if options.memory_limit is not None:
            limits.append(f"memory_limit={_mib(options.memory_limit)}")
        if options.memory_growth_limit is not None:
            limits.append(f"memory_growth_limit={_mib(options.memory_growth_limit)}")
        if options.memory_slope_limit is not None:
            limits.append(
                f"memory_slope_limit={options.memory_slope_limit / KIB:.0f} KiB/task over "
                f"{options.memory_slope_window} tasks after {options.memory_slope_warmup}"
            )
        if not limits:
            text = "measuring RSS per task, no limit set"
        elif worker.pool.forks:
            text = f"{', '.join(limits)}; a child over a limit is replaced between tasks"
        else:
            text = (
                f"{', '.join(limits)}; over a limit the {worker.pool.value} pool cannot "
                "replace a process: the worker does a warm shutdown and its process "
                "supervisor must start it again"
            )
        if options.memory_leak_sites_every is not None:
            text += f"; leak-site mode every {options.memory_leak_sites_every} tasks"
        return text

    # --- each process that runs tasks -------------------------------------------------

    def on_process_start(self, worker: WorkerInfo, forked: bool) -> None:
        if not self.enabled:
            return
        assert self.options is not None
        self._reset()
        if self.reader is not None:
            self.reader.close()
        self.reader = RssReader.open()  # after fork: statm must be this process's own
        self._concurrent = not (worker.pool.forks or worker.pool is PoolKind.SOLO)
        self._check_limits = self.has_limits
        every = self.options.memory_leak_sites_every
        if every is not None:
            self.leak_sites = LeakSites(
                every, self.options.memory_leak_sites_top, self.options.memory_leak_sites_frames
            )

    def before_task(self, run: TaskRun) -> None:
        reader = self.reader
        if reader is None:
            return
        if self._concurrent:
            with self._lock:
                self._running += 1
                self._generation += 1
                generation, alone = self._generation, self._running == 1
            # A task that starts beside others gets no delta of its own (see after_task):
            # under gevent -c 100 that is nearly every task, and this read is saved.
            rss = reader.read() if alone or self.birth_rss is None else 0
            run.scratch[_SCRATCH_KEY] = (rss, generation, alone)
        else:
            rss = reader.read()
            run.scratch[_SCRATCH_KEY] = (rss, 0, True)
        if self.birth_rss is None:
            self.birth_rss = rss

    def after_task(self, run: TaskRun, outcome: TaskOutcome) -> None:
        reader = self.reader
        start = run.scratch.pop(_SCRATCH_KEY, None)
        if reader is None or start is None:
            return
        rss = reader.read()
        before, generation, alone = start
        if self._concurrent:
            with self._lock:
                self._running -= 1
                # Alone: no task running when it started, none started since.
                alone = alone and generation == self._generation
                self._record(run.name, rss - before if alone else None, rss)
                reason = self._over_limit(rss) if self._check_limits else None
        else:
            self._record(run.name, rss - before, rss)
            reason = self._over_limit(rss) if self._check_limits else None
        if reason is not None:
            self._recycle(run, reason)
        if self.leak_sites is not None:
            self.leak_sites.task_done(run.name)

    def _record(self, name: str, delta: int | None, rss: int) -> None:
        self.tasks += 1
        self.last_rss = rss
        self.peak_rss = max(self.peak_rss, rss)
        entry = self.by_task.get(name)
        if entry is None:
            entry = self.by_task[name] = TaskMemory()
        entry.runs += 1
        if delta is None:
            self.unattributed += 1
        else:
            entry.measured += 1
            entry.growth += delta
        self.window.add(self.tasks, rss)

    # --- limits and recycling ---------------------------------------------------------

    def _over_limit(self, rss: int) -> str | None:
        """Which limit this RSS is over, with the figures; None if none (or already asked)."""
        options = self.options
        if options is None or self.recycle_reason is not None or self.birth_rss is None:
            return None
        birth = self.birth_rss
        limit = options.memory_limit
        if limit is not None and rss > limit:
            if birth < limit:
                return f"memory_limit: RSS {_mib(rss)} is above {_mib(limit)}"
            self._warn_born_above_limit(limit)
        growth_limit = options.memory_growth_limit
        if growth_limit is not None and rss - birth > growth_limit:
            return (
                f"memory_growth_limit: RSS {_mib(rss)} grew {_signed_mib(rss - birth)} since "
                f"its first task ({_mib(birth)}), more than {_mib(growth_limit)}"
            )
        slope_limit = options.memory_slope_limit
        if slope_limit is not None and self.tasks >= options.memory_slope_warmup + self.window.size:
            slope = self.window.slope()
            if slope is not None and slope > slope_limit:
                return (
                    f"memory_slope_limit: RSS grew {slope / KIB:.0f} KiB/task over the last "
                    f"{len(self.window)} tasks, more than {slope_limit / KIB:.0f} KiB/task "
                    f"(RSS {_mib(rss)})"
                )
        return None

    def _warn_born_above_limit(self, limit: int) -> None:
        if self.born_above_limit:
            return
        self.born_above_limit = True
        logger.error(
            "lifeguard: process %d started at %s RSS, above memory_limit=%s: not recycling it "
            "for that limit, its replacement would start as large. Raise memory_limit or "
            "use memory_growth_limit.",
            os.getpid(),
            _mib(self.birth_rss or 0),
            _mib(limit),
        )

    def _recycle(self, run: TaskRun, reason: str) -> None:
        policy = reason.split(":", 1)[0]
        outcome = self.guard.lifecycle.request_recycle(policy)
        if outcome is None:
            return
        self.recycle_reason = reason
        slope = self.window.slope()
        logger.warning(
            "lifeguard: recycling process %d after task %s, %s. Grew most: %s. "
            "%d tasks, %s since the first task, slope %s. Now: %s.",
            os.getpid(),
            run.name,
            reason,
            top_growers(self.by_task, self.unattributed),
            self.tasks,
            _signed_mib((self.last_rss or 0) - (self.birth_rss or 0)),
            "n/a" if slope is None else f"{slope / KIB:.0f} KiB/task",
            outcome,
        )

    # --- shutdown and figures ---------------------------------------------------------

    def on_process_stop(self, worker: WorkerInfo) -> None:
        if self.reader is not None:
            with contextlib.suppress(OSError):
                self.reader.close()
            self.reader = None
        if self.leak_sites is not None:
            self.leak_sites.stop()

    def metric_samples(self) -> list[Sample]:
        """Figures for the worker's Prometheus endpoint (see :mod:`lifeguard.metrics`)."""
        if self.last_rss is None:
            return []
        samples = [
            Sample("process_rss_bytes", self.last_rss, help="RSS of each live process"),
        ]
        if self.birth_rss is not None:
            samples.append(
                Sample(
                    "process_rss_growth_bytes",
                    self.last_rss - self.birth_rss,
                    help="RSS growth of each live process since its first task",
                )
            )
        slope = self.window.slope()
        if slope is not None:
            samples.append(
                Sample(
                    "process_rss_slope_bytes_per_task",
                    slope,
                    help="RSS growth per task over the recent window, per live process",
                )
            )
        with self._lock:
            growth = {name: entry.growth for name, entry in self.by_task.items()}
        samples += [
            Sample(
                "task_rss_growth_bytes",
                value,
                labels={"task": name},
                help="RSS growth attributed to each task name, summed over live processes",
                mode="livesum",
            )
            for name, value in sorted(growth.items())
        ]
        return samples

    def stats(self) -> dict[str, Any] | None:
        reader = self.reader
        if reader is None:
            return None
        with self._lock:
            by_task = dict(self.by_task)
        rss = reader.read()
        total_growth = sum(max(entry.growth, 0) for entry in by_task.values())
        slope = self.window.slope()
        peak = peak_rss()
        figures: dict[str, Any] = {
            "pid": os.getpid(),
            "rss_source": reader.source,
            "rss_kib": rss // KIB,
            "birth_rss_kib": None if self.birth_rss is None else self.birth_rss // KIB,
            "growth_kib": None if self.birth_rss is None else (rss - self.birth_rss) // KIB,
            "peak_rss_kib": self.peak_rss // KIB,  # highest RSS seen between tasks
            "maxrss_kib": None if peak is None else peak // KIB,  # lifetime peak, in tasks too
            "tasks": self.tasks,
            "unattributed_tasks": self.unattributed,
            "slope_kib_per_task": None if slope is None else round(slope / KIB, 1),
            "slope_window": len(self.window),
            "by_task": {
                name: entry.as_dict(total_growth) for name, entry in sorted(by_task.items())
            },
            "recycle": self.recycle_reason,
        }
        if self.leak_sites is not None:
            figures["leak_sites"] = {
                "sites": self.leak_sites.report,
                "tasks": self.leak_sites.report_tasks,
            }
        return figures
