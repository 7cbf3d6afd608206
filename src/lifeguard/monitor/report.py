"""One look at the database: snapshot, findings, running tasks, actions; and the
:class:`Monitor` that produces such reports one after another.

Both commands are thin shells around :class:`Monitor`: ``lifeguard check`` asks for one
report (its baseline for rates comes from a state file), ``lifeguard monitor`` for one
every few seconds (its baseline is the snapshot about a minute earlier).
"""

from __future__ import annotations

import collections
import dataclasses
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from ..postgres.slots import read_limits
from .actions import Action, terminate_stale
from .attribution import RunningTask, WorkerTasks, running_tasks
from .snapshot import (
    Backend,
    Baseline,
    SessionRates,
    SingletonHold,
    Snapshot,
    session_rates,
    take_snapshot,
)
from .target import (
    DatabaseTarget,
    DatabaseUnreachable,
    connect,
    driver,
    one_line_error,
    time_limited,
)
from .thresholds import Finding, Severity, Thresholds, evaluate, status

#: The window connection-error rates are averaged over in ``lifeguard monitor``.
RATE_WINDOW = 60.0


@dataclass(frozen=True)
class Report:
    """Everything known about the database at one moment."""

    target: str  # the database, described without its password
    snapshot: Snapshot
    thresholds: Thresholds
    rates: SessionRates | None
    findings: tuple[Finding, ...]
    tasks: WorkerTasks | None
    actions: tuple[Action, ...]

    @property
    def status(self) -> Severity:
        return status(self.findings)

    def tasks_of(self, backend: Backend) -> tuple[RunningTask, ...] | None:
        return self.tasks.for_backend(backend) if self.tasks is not None else None

    def task_label(self, backend: Backend) -> str | None:
        """``name[id]`` of what the backend's process runs now, or why it is unknown."""
        if self.tasks is None or backend.worker is None:
            return None
        running = self.tasks.for_backend(backend)
        if running is None:
            return "(worker not answering)"
        if not running:
            return "(no task running)"
        return ", ".join(f"{task.name}[{task.id}]" for task in running)

    def to_json(self) -> dict[str, Any]:
        snap = self.snapshot
        return {
            "status": self.status.name,
            "exit_code": self.status.exit_code,
            "target": self.target,
            "taken_at": datetime.fromtimestamp(snap.taken_at, timezone.utc).isoformat(),
            "snapshot_ms": round(snap.duration * 1000, 3),
            "database": {
                "name": snap.database,
                "role": snap.role,
                "server_version": snap.server_version,
                "max_connections": snap.max_connections,
                "superuser_reserved_connections": snap.superuser_reserved,
                "reserved_connections": snap.reserved,
                "usable_slots": snap.usable_slots,
                "server_backends": snap.server_backends,
            },
            "privileges": dataclasses.asdict(snap.privileges),
            "prefix": snap.prefix,
            "backends_by_state": snap.by_state(),
            "worker_backends_by_state": snap.by_state(snap.worker_backends),
            "sessions": self._sessions_json(),
            "thresholds": {
                "idle_warning": str(self.thresholds.idle_warning),
                "idle_critical": str(self.thresholds.idle_critical),
                "idle_in_transaction_warning": self.thresholds.idle_in_transaction_warning,
                "idle_in_transaction_critical": self.thresholds.idle_in_transaction_critical,
                "errors_warning": self.thresholds.errors_warning,
                "errors_critical": self.thresholds.errors_critical,
            },
            "findings": [self._finding_json(finding) for finding in self.findings],
            "worker_backends": [self._backend_json(b) for b in snap.worker_backends],
            "singleton_locks": [self._hold_json(hold) for hold in snap.singleton_locks],
            "workers_asked": None if self.tasks is None else {"error": self.tasks.error},
            "actions": [dataclasses.asdict(action) for action in self.actions],
        }

    def _sessions_json(self) -> dict[str, Any] | None:
        counters = self.snapshot.counters
        if counters is None:
            return None
        result: dict[str, Any] = {"total": counters.as_dict()}
        if self.rates is not None:
            result["window_seconds"] = round(self.rates.seconds, 3)
            result["delta"] = self.rates.delta.as_dict()
            result["errors_per_minute"] = round(self.rates.errors_per_minute, 3)
        return result

    def _finding_json(self, finding: Finding) -> dict[str, Any]:
        return {
            "check": finding.check,
            "severity": finding.severity.name,
            "summary": finding.summary,
            "workers": finding.workers,
            "backends": [
                {
                    "pid": backend.pid,
                    "application_name": backend.application_name,
                    "worker": backend.worker_label,
                    "state": backend.state,
                    "state_seconds": _round(backend.state_seconds),
                    "critical": backend.pid in finding.critical_pids,
                    "task": self.task_label(backend),
                }
                for backend in finding.backends
            ],
            "gone": [
                {"pid": ref.pid, "application_name": ref.application_name} for ref in finding.gone
            ],
        }

    def _hold_json(self, hold: SingletonHold) -> dict[str, Any]:
        holder = hold.holder
        return {
            "key": hold.key,
            "task": hold.task,
            "lock_id": hold.lock_id,
            "pid": holder.pid,
            "application_name": holder.application_name,
            "worker": holder.worker_label,
            "held_seconds": _round(hold.held_seconds),
            "running": self.task_label(holder),
            "waiting": [
                {"pid": b.pid, "worker": b.worker_label, "application_name": b.application_name}
                for b in hold.waiters
            ],
        }

    def _backend_json(self, backend: Backend) -> dict[str, Any]:
        assert backend.worker is not None
        running = self.tasks_of(backend)
        return {
            "pid": backend.pid,
            "application_name": backend.application_name,
            "host": backend.worker.hostname,
            "worker_pid": backend.worker.pid,
            "user": backend.user,
            "state": backend.state,
            "state_seconds": _round(backend.state_seconds),
            "transaction_seconds": _round(backend.transaction_seconds),
            "query_seconds": _round(backend.query_seconds),
            "wait_event": backend.wait_event,
            "query": backend.query,
            "client_addr": backend.client_addr,
            "tasks": None if running is None else [_task_json(task) for task in running],
        }


def _task_json(task: RunningTask) -> dict[str, Any]:
    return {
        "id": task.id,
        "name": task.name,
        "node": task.node,
        "worker_pid": task.worker_pid,
        "running_seconds": _round(task.running_seconds()),
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)


class Monitor:
    """Reports on one database, one after another, over one connection.

    The connection is opened on first use and again after it is lost; an unreachable
    database raises :class:`DatabaseUnreachable` with a one-line reason.
    """

    def __init__(
        self,
        target: DatabaseTarget,
        prefix: str,
        thresholds: Thresholds,
        *,
        app: Any = None,
        inspect_timeout: float = 1.0,
        terminate: bool = False,
        dry_run: bool = True,
        terminate_after: float | None = None,
        connect_timeout: float = 5.0,
    ) -> None:
        self.target = target
        self.prefix = prefix
        self.thresholds = thresholds
        self.app = app
        self.inspect_timeout = inspect_timeout
        self.terminate = terminate
        self.dry_run = dry_run
        self.terminate_after = (
            thresholds.idle_in_transaction_critical if terminate_after is None else terminate_after
        )
        self.connect_timeout = connect_timeout
        self._conn: Any = None
        self._history: collections.deque[Baseline] = collections.deque()

    def report(self, baseline: Baseline | None = None) -> Report:
        """A new report; rates are computed against ``baseline`` or this monitor's past."""
        snapshot = self.snapshot()
        if baseline is None and self._history:
            baseline = self._baseline_for(snapshot)
        rates = session_rates(baseline, snapshot) if baseline is not None else None
        self._remember(snapshot.baseline())
        tasks = running_tasks(self.app, self.inspect_timeout) if self.app is not None else None
        actions: list[Action] = []
        if self.terminate:
            actions = terminate_stale(
                self._conn,
                snapshot,
                self.terminate_after,
                dry_run=self.dry_run,
                tasks=tasks,
                timeout=self.connect_timeout,
            )
        return Report(
            target=str(self.target),
            snapshot=snapshot,
            thresholds=self.thresholds,
            rates=rates,
            findings=tuple(evaluate(snapshot, rates, self.thresholds)) + self._slots(),
            tasks=tasks,
            actions=tuple(actions),
        )

    def _slots(self) -> tuple[Finding, ...]:
        """CRITICAL "slots exhausted" when the server or the monitor's role is at its
        limit (the monitor got in through a reserved slot, or just before the limit)."""
        try:
            with time_limited(self._conn, self.connect_timeout):
                limits = read_limits(self._conn)
        except driver().Error:
            return ()
        exhausted = limits.exhausted() if limits is not None else None
        if exhausted is None:
            return ()
        return (Finding(check="slots", severity=Severity.CRITICAL, summary=exhausted),)

    def close(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    def snapshot(self) -> Snapshot:
        """A snapshot alone (no findings), over this monitor's connection."""
        if self._conn is None:
            self._conn = connect(self.target, self.connect_timeout)
        try:
            with time_limited(self._conn, self.connect_timeout):
                return take_snapshot(self._conn, self.prefix)
        except driver().OperationalError as exc:  # connection lost, server restarting
            self.close()
            raise DatabaseUnreachable(
                f"lost the connection to {self.target}: {one_line_error(exc, self.target)}"
            ) from None

    def _baseline_for(self, snapshot: Snapshot) -> Baseline:
        """The newest past snapshot at least RATE_WINDOW old, else the oldest one."""
        chosen = self._history[0]
        for baseline in self._history:
            if snapshot.taken_at - baseline.taken_at >= RATE_WINDOW:
                chosen = baseline
        return chosen

    def _remember(self, baseline: Baseline) -> None:
        self._history.append(baseline)
        # Keep one baseline older than the window, and everything younger.
        while (
            len(self._history) > 1 and baseline.taken_at - self._history[1].taken_at >= RATE_WINDOW
        ):
            self._history.popleft()
