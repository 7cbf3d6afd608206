"""Worker metrics for Prometheus: every process's counters, one endpoint per worker.

Enabled by the option ``metrics_port``. Each process that runs tasks (each prefork
child) writes its figures to files of its own in a directory shared with the
MainProcess (prometheus_client's multiprocess mode); the MainProcess serves them all,
summed, on ``http://<metrics_address>:<metrics_port>/metrics``. Counters of children
that exited stay in the sums; per-process gauges (labelled ``pid``) disappear with
their process.

Exported:

* every counter of ``guard.stats()`` as ``lifeguard_<counter>_total{task,reason}``:
  ``connections_opened``, ``connections_reused``, ``connections_discarded`` (by
  reason), ``transactions_rolled_back``, ``queries_cancelled``, ``leaks_found``,
  ``tasks``, ``hook_errors``, ``once_skipped``, ``singleton_waited``,
  ``singleton_skipped``, ``singleton_busy`` (by reason), ``orphaned_claims``; ``task``
  is empty for what happened outside a task;
* ``lifeguard_process_tasks{pid}``: tasks run by each live process;
* whatever the other concerns contribute: a :class:`~lifeguard.hooks.Hook` that has a
  ``metric_samples()`` method (:class:`MetricsSource`) is asked for its
  :class:`Sample` list after each task, in the process that ran it. Nothing here needs
  to change for a new concern to export its figures.

Figures are written when a task ends (and when the process starts and stops), so a
scrape sees each process as of its last task.
"""

from __future__ import annotations

import contextlib
import glob
import logging
import os
import re
import shutil
import tempfile
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from .. import stats
from ..errors import ConfigurationError
from ..hooks import Hook, TaskOutcome, TaskRun, WorkerInfo

logger = logging.getLogger("lifeguard.metrics")

PREFIX = "lifeguard_"
#: How a gauge of several processes is combined (prometheus_client's multiprocess modes).
GAUGE_MODES = frozenset(
    {"all", "liveall", "min", "livemin", "max", "livemax", "sum", "livesum", "mostrecent",
     "livemostrecent"}
)  # fmt: skip
_NAME = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_COUNTER_HELP = {
    stats.CONNECTIONS_OPENED: "Database connections opened",
    stats.CONNECTIONS_REUSED: "Tasks that reused a kept connection",
    stats.CONNECTIONS_DISCARDED: "Connections closed instead of reused, by reason",
    stats.TRANSACTIONS_ROLLED_BACK: "Transactions left open by a task and rolled back",
    stats.QUERIES_CANCELLED: "Queries cancelled on the server after an interruption",
    stats.LEAKS_FOUND: "Connections leaked by threads or greenlets a task started",
    stats.TASKS: "Tasks run",
    stats.HOOK_ERRORS: "Errors inside lifeguard's hooks (tasks unaffected)",
    stats.TASKS_HANDED_BACK: "Tasks handed back after a transient database failure, by class",
    stats.HAND_BACKS_EXHAUSTED: "Tasks that failed after hand_back_limit hand-backs",
    stats.ONCE_SKIPPED: "Once blocks whose key was already committed (body skipped)",
    stats.SINGLETON_WAITED: "Singleton runs that waited for the lock's holder",
    stats.SINGLETON_SKIPPED: "Singleton runs skipped because the lock was held",
    stats.SINGLETON_BUSY: "Singleton runs that gave up on a held lock, by reason",
    stats.ORPHANED_CLAIMS: "Effect claims found whose owner died, by policy",
}


@dataclass(frozen=True)
class Sample:
    """One figure a concern exports, as of now, in the process that reports it.

    ``name`` is prefixed with ``lifeguard_``; a counter also gets ``_total``. A gauge's
    ``mode`` says how the worker's processes combine: ``liveall`` (default) keeps one
    series per live process, labelled ``pid``; ``livesum``/``max``/... aggregate.
    Counters are cumulative per process and summed over all processes, dead ones too.
    """

    name: str
    value: float
    kind: str = "gauge"  # or "counter"
    labels: Mapping[str, str] = field(default_factory=dict)
    help: str = ""
    mode: str = "liveall"


@runtime_checkable
class MetricsSource(Protocol):
    """A concern with figures of its own (memory: RSS per child, recycles, ...)."""

    def metric_samples(self) -> Iterable[Sample]: ...


_Key = tuple[str, str, tuple[tuple[str, str], ...]]  # (kind, name, labels)


class WorkerMetrics(Hook):
    """The metrics concern: files per process, one HTTP endpoint in the MainProcess."""

    name = "metrics"

    def __init__(self) -> None:
        self.enabled = False
        self.directory: str | None = None
        self._own_directory = False
        self._server: Any = None
        self._lock = threading.Lock()  # the mirror of the counters
        self._write_lock = threading.Lock()  # the value files
        self._value_class: Any = None
        self._values: dict[_Key, Any] = {}
        self._written: dict[_Key, float] = {}
        # This process's counters by (counter, reason, task or ""), kept by the listener.
        self._counts: dict[tuple[str, str, str], int] = {}
        self._dirty: set[tuple[str, str, str]] = set()
        self._tasks_run = 0
        self._listening = False
        self._reported: set[str] = set()  # problems already logged once

    # --- MainProcess ------------------------------------------------------------------

    def on_worker_start(self, worker: WorkerInfo) -> None:
        options = self.guard.options
        if options.metrics_port is None:
            return
        try:
            from prometheus_client import values
        except ImportError:
            raise ConfigurationError(
                "lifeguard option metrics_port needs prometheus_client: "
                "pip install 'celery-lifeguard[prometheus]'"
            ) from None
        self.directory = self._prepare_directory(options.metrics_dir)
        if not self._listening:  # once, even if this guard sees several worker starts
            self.guard.counters.add_listener(self._count)
            self._listening = True
        self.enabled = True
        if not getattr(values.ValueClass, "_multiprocess", False):
            self.guard.lifecycle.announce(
                logger,
                logging.WARNING,
                "lifeguard: prometheus_client was imported before PROMETHEUS_MULTIPROC_DIR "
                "was set: your own metrics stay per process and are not on lifeguard's "
                "endpoint; set PROMETHEUS_MULTIPROC_DIR=%s in the worker's environment to "
                "include them",
                self.directory,
            )
        self._serve(options.metrics_port, options.metrics_address)

    def _prepare_directory(self, configured: str | None) -> str:
        directory = configured or os.environ.get("PROMETHEUS_MULTIPROC_DIR")
        if directory:
            os.makedirs(directory, exist_ok=True)
            for path in glob.glob(os.path.join(directory, "*.db")):
                os.remove(path)  # files of a previous run would add to this one's sums
        else:
            directory = tempfile.mkdtemp(prefix="lifeguard-metrics-")
            self._own_directory = True
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = directory
        return directory

    def _serve(self, port: int, address: str) -> None:
        from prometheus_client import CollectorRegistry, start_http_server

        registry = CollectorRegistry(auto_describe=False)
        registry.register(_WorkerCollector(self))
        try:
            self._server, _thread = start_http_server(port, address, registry=registry)
        except OSError as exc:
            # Metrics are for watching: never keep the worker from working because of them.
            self.guard.lifecycle.announce(
                logger,
                logging.ERROR,
                "lifeguard: cannot serve worker metrics on %s:%d (%s): the worker runs "
                "without them; choose another metrics_port",
                address,
                port,
                exc,
            )
            return
        self.guard.lifecycle.announce(
            logger,
            logging.INFO,
            "lifeguard: worker metrics on http://%s:%d/metrics (files in %s)",
            address,
            port,
            self.directory,
        )

    def on_worker_stop(self, worker: WorkerInfo) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
        if self._own_directory and self.directory:
            shutil.rmtree(self.directory, ignore_errors=True)

    def sweep_dead_processes(self) -> None:
        """Drop the per-process gauges of processes that are gone (killed children)."""
        assert self.directory is not None
        pids = set()
        for path in glob.glob(os.path.join(self.directory, "gauge_live*_*.db")):
            text = os.path.basename(path)[: -len(".db")].rpartition("_")[2]
            if text.isdigit():
                pids.add(int(text))
        for pid in pids:
            if not _alive(pid):
                _prometheus("multiprocess").mark_process_dead(pid, self.directory)

    # --- processes that run tasks -----------------------------------------------------

    def on_process_start(self, worker: WorkerInfo, forked: bool) -> None:
        if not self.enabled:
            return
        if forked:
            # A lock held by another thread of the parent at fork would never be released;
            # the counters were reset at fork: so is their mirror.
            self._lock, self._write_lock = threading.Lock(), threading.Lock()
            self._counts.clear()
            self._dirty.clear()
            self._tasks_run = 0
        with self._write_lock:
            self._value_class = _prometheus("values").MultiProcessValue()
            self._values.clear()
            self._written.clear()
        self.write()

    def after_task(self, run: TaskRun, outcome: TaskOutcome) -> None:
        if self.enabled:
            self.write()

    def on_process_stop(self, worker: WorkerInfo) -> None:
        if not self.enabled or self._value_class is None:
            return
        self.write()
        if not worker.is_main_process:
            _prometheus("multiprocess").mark_process_dead(os.getpid(), self.directory)

    def _count(self, counter: str, task: str | None, reason: str | None, n: int) -> None:
        """Stats listener: mirror one increment (must never raise into the caller)."""
        key = (counter, reason or "", task or "")
        with self._lock:
            self._counts[key] = self._counts.get(key, 0) + n
            self._dirty.add(key)
            if counter == stats.TASKS:
                self._tasks_run += n

    def write(self) -> None:
        """Write this process's changed figures to its files."""
        if self._value_class is None:
            return  # a MainProcess of a forking pool: its children report
        with self._write_lock:
            with self._lock:
                dirty, self._dirty = self._dirty, set()
                changes = [(key, self._counts[key]) for key in dirty]
                tasks_run = self._tasks_run
            for (counter, reason, task), value in changes:
                labels = {"task": task, "reason": reason}
                help_text = _COUNTER_HELP.get(counter, f"lifeguard counter {counter}")
                self._set(Sample(counter, value, "counter", labels, help_text))
            self._set(Sample("process_tasks", tasks_run, help="Tasks run by each live process"))
            for sample in self._samples():
                self._set(sample)

    def _samples(self) -> Iterator[Sample]:
        for hook in self.guard.hooks:
            if hook is self or not isinstance(hook, MetricsSource):
                continue
            try:
                yield from hook.metric_samples()
            except Exception:
                if f"hook:{hook.name}" not in self._reported:
                    self._reported.add(f"hook:{hook.name}")
                    logger.exception("lifeguard: metric_samples() of %s failed", hook.name)

    def _set(self, sample: Sample) -> None:
        labels = tuple(sorted((str(k), str(v)) for k, v in sample.labels.items()))
        key = (sample.kind, sample.name, labels)
        if self._written.get(key) == sample.value:
            return
        slot = self._values.get(key)
        if slot is None:
            slot = self._new_value(sample, labels)
            if slot is None:
                return
            self._values[key] = slot
        slot.set(float(sample.value))
        self._written[key] = sample.value

    def _new_value(self, sample: Sample, labels: tuple[tuple[str, str], ...]) -> Any:
        problem = _sample_problem(sample, labels)
        if problem:
            if f"metric:{sample.name}" not in self._reported:
                self._reported.add(f"metric:{sample.name}")
                logger.error("lifeguard: metric %r not exported: %s", sample.name, problem)
            return None
        metric = PREFIX + sample.name
        return self._value_class(
            sample.kind,
            metric,
            metric + "_total" if sample.kind == "counter" else metric,
            [k for k, _ in labels],
            [v for _, v in labels],
            sample.help or f"lifeguard {sample.name.replace('_', ' ')}",
            multiprocess_mode=sample.mode if sample.kind == "gauge" else "",
        )


def _sample_problem(sample: Sample, labels: tuple[tuple[str, str], ...]) -> str | None:
    kind, name, mode = sample.kind, sample.name, sample.mode
    if kind not in ("counter", "gauge"):
        return f"kind must be 'counter' or 'gauge', not {kind!r}"
    if not _NAME.match(name) or name.endswith("_total"):
        return "names are letters, digits and '_' (no '_total': counters get it)"
    if kind == "gauge" and mode not in GAUGE_MODES:
        return f"gauge mode must be one of {sorted(GAUGE_MODES)}"
    bad = [k for k, _ in labels if not _NAME.match(k) or k == "pid"]
    if bad:
        return f"bad label names {bad} ('pid' is added by liveall/all gauges)"
    return None


def _prometheus(module: str) -> Any:
    """A prometheus_client module (imported only when metrics are on; untyped)."""
    import importlib

    return importlib.import_module(f"prometheus_client.{module}")


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class _WorkerCollector:
    """Every process's files, summed; the gauges of dead children dropped first."""

    def __init__(self, hook: WorkerMetrics) -> None:
        self.hook = hook

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> Iterator[Any]:
        with contextlib.suppress(OSError):
            self.hook.sweep_dead_processes()
        if self.hook.guard.lifecycle.in_task_process:
            self.hook.write()  # threads/gevent/solo: the MainProcess runs the tasks
        collector = _prometheus("multiprocess").MultiProcessCollector(None, self.hook.directory)
        yield from collector.collect()
