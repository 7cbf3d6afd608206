"""Samples taken all along a validation: the database's connections by state, the ones
the workers hold (per worker process when it can be told), and every task process's RSS.

Which backends are the workers'? In order:

1. those named ``<prefix>:<host>:<pid>`` by lifeguard (the process is in the name);
2. for workers running on this machine, those whose client address and port are the
   local end of a TCP connection one of the worker's processes holds (``/proc``): this
   attributes the connections of workers without lifeguard, and raw connections that
   lifeguard does not name;
3. any other backend opened after the validation started (not ``lifeguard-monitor``):
   the load caused it, but its process is unknown ("unattributed").

Backends that already existed at the start and match neither 1 nor 2 (other clients,
remote workers without lifeguard) are counted by state, not as the workers'.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field

from .. import procfs
from ..monitor.report import Monitor
from ..monitor.snapshot import Backend, BackendRef, Snapshot
from ..monitor.target import MONITOR_APPLICATION_NAME, DatabaseUnreachable
from .workers import ProcessSampler, TaskProcess, WorkerNode

UNATTRIBUTED = "unattributed"


@dataclass(frozen=True)
class Sample:
    """The database and the workers' processes at one moment (``t``: run seconds)."""

    t: float
    by_state: dict[str, int] = field(default_factory=dict)  # every client backend
    workers_by_state: dict[str, int] = field(default_factory=dict)  # the workers' backends
    # "host:pid" (or UNATTRIBUTED) -> its backends by state
    by_process: dict[str, dict[str, int]] = field(default_factory=dict)
    processes: tuple[TaskProcess, ...] = ()
    main_rss: dict[str, int | None] = field(default_factory=dict)  # node -> MainProcess RSS
    error: str | None = None  # the database could not be read

    @property
    def workers(self) -> int:
        return sum(self.workers_by_state.values())

    @property
    def total(self) -> int:
        return sum(self.by_state.values())


@dataclass(frozen=True)
class Recycle:
    """A task process that disappeared between two samples, and its replacements."""

    t: float  # when it was first missed
    node: str
    pid: int
    replaced_by: tuple[int, ...]


class Sampler:
    """Takes samples on demand (:meth:`take`) and every ``interval`` seconds in a thread."""

    def __init__(
        self,
        monitor: Monitor,
        processes: ProcessSampler,
        nodes: list[WorkerNode],
        clock: Callable[[], float],
        interval: float,
    ) -> None:
        self.monitor = monitor
        self.processes = processes
        self.local_nodes = {node.name: node for node in nodes if node.local}
        self.clock = clock
        self.interval = interval
        self.samples: list[Sample] = []
        self.initial: frozenset[BackendRef] | None = None
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def latest(self) -> Sample | None:
        return self.samples[-1] if self.samples else None

    def take(self) -> tuple[Sample, Snapshot | None]:
        """A sample now (thread-safe), with the database snapshot behind it."""
        with self._lock:
            processes = self.processes.sample()
            t = self.clock()
            try:
                snapshot: Snapshot | None = self.monitor.snapshot()
            except DatabaseUnreachable as exc:
                snapshot = None
                sample = Sample(t, processes=tuple(processes), error=str(exc))
            else:
                assert snapshot is not None
                if self.initial is None:
                    self.initial = frozenset(backend.ref for backend in snapshot.backends)
                sample = self._sample(t, snapshot, processes)
            self.samples.append(sample)
            return sample, snapshot

    def _sample(self, t: float, snapshot: Snapshot, processes: list[TaskProcess]) -> Sample:
        # Reading /proc/net/tcp costs milliseconds: only when a backend needs it.
        unnamed = [b for b in snapshot.backends if b.worker is None and b.client_port]
        owners = self._local_owners(processes) if unnamed else {}
        held: dict[str, list[Backend]] = {}
        for backend in snapshot.backends:
            label = self._holder(backend, owners)
            if label is not None:
                held.setdefault(label, []).append(backend)
        return Sample(
            t=t,
            by_state=snapshot.by_state(),
            workers_by_state=snapshot.by_state(b for backends in held.values() for b in backends),
            by_process={label: snapshot.by_state(held[label]) for label in sorted(held)},
            processes=tuple(processes),
            main_rss=dict(self.processes.main_rss),
        )

    def _local_owners(self, processes: list[TaskProcess]) -> dict[procfs.Endpoint, str]:
        """Local TCP endpoints of the local workers' processes -> ``host:pid``."""
        if not self.local_nodes:
            return {}
        labels = {
            process.pid: process.label for process in processes if process.node in self.local_nodes
        }
        for node in self.local_nodes.values():
            labels.setdefault(node.main_pid, f"{node.host}:{node.main_pid}")
        endpoints = procfs.tcp_endpoints_of(labels)
        return {endpoint: labels[pid] for endpoint, pid in endpoints.items()}

    def _holder(self, backend: Backend, owners: dict[procfs.Endpoint, str]) -> str | None:
        """``host:pid`` of the worker process holding the backend, UNATTRIBUTED for a new
        backend of unknown origin, None when it is not the workers'."""
        if backend.worker is not None:
            return f"{backend.worker.hostname}:{backend.worker.pid}"
        if backend.client_addr is not None and backend.client_port is not None:
            endpoint = (procfs.normalise_address(backend.client_addr), backend.client_port)
            holder = owners.get(endpoint)
            if holder is not None:
                return holder
        if backend.application_name == MONITOR_APPLICATION_NAME:
            return None
        if self.initial is not None and backend.ref not in self.initial:
            return UNATTRIBUTED
        return None

    # --- the background thread --------------------------------------------------------

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="lifeguard-sampler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _loop(self) -> None:
        next_at = self.clock()
        while not self._stop.is_set():
            next_at += self.interval
            if not self._stop.wait(max(next_at - self.clock(), 0.0)):
                self.take()
            next_at = max(next_at, self.clock() - self.interval)  # no burst of catch-ups


def recycles(samples: list[Sample]) -> list[Recycle]:
    """Task processes that went away between samples (recycled, crashed or killed)."""
    found: list[Recycle] = []
    previous: dict[str, set[int]] | None = None
    for sample in samples:
        if not sample.processes:
            continue  # the workers did not answer this time
        current: dict[str, set[int]] = {}
        for process in sample.processes:
            current.setdefault(process.node, set()).add(process.pid)
        if previous is not None:
            for node, pids in current.items():
                gone = sorted(previous.get(node, set()) - pids)
                new = tuple(sorted(pids - previous.get(node, set())))
                found += [Recycle(sample.t, node, pid, new) for pid in gone]
        previous = {**(previous or {}), **current}
    return found
