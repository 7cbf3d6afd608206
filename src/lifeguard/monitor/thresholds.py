"""Judging a snapshot: warning and critical thresholds, and the findings they produce.

The defaults are those operators already use (the incident-response table of the
Django/Celery connection-leak guide):

==============================  ===================  ====================
check                           warning              critical
==============================  ===================  ====================
idle connections                > 60% of the slots   > 85% of the slots
idle in transaction (age)       > 30 s               > 120 s
connection errors               > 5 per minute       > 20 per minute
==============================  ===================  ====================

"Slots" are the connections ordinary roles may open (``max_connections`` minus the
reserved ones); idle limits may also be absolute counts. Connection errors are sessions
that ended abandoned, fatal or killed (``pg_stat_database``, PostgreSQL 14+). A monitor
that cannot see other roles' states says so as UNKNOWN, with the grant to give.
"""

from __future__ import annotations

import enum
from collections.abc import Iterable
from dataclasses import dataclass, field

from ..errors import ConfigurationError
from .snapshot import IDLE, Backend, BackendRef, SessionRates, Snapshot


class Severity(enum.Enum):
    """Nagios-style status; ``exit_code`` is what ``lifeguard check`` exits with."""

    OK = 0
    WARNING = 1
    CRITICAL = 2
    UNKNOWN = 3

    @property
    def exit_code(self) -> int:
        return self.value

    @property
    def rank(self) -> int:
        """Worst wins: CRITICAL over UNKNOWN over WARNING over OK."""
        return {"OK": 0, "WARNING": 1, "UNKNOWN": 2, "CRITICAL": 3}[self.name]

    @classmethod
    def worst(cls, severities: Iterable[Severity]) -> Severity:
        return max(severities, key=lambda severity: severity.rank, default=cls.OK)


@dataclass(frozen=True)
class ConnectionLimit:
    """A number of connections, or a percentage of the usable slots."""

    value: float
    percent: bool

    @classmethod
    def parse(cls, text: str | float, name: str) -> ConnectionLimit:
        raw = str(text).strip()
        percent = raw.endswith("%")
        try:
            value = float(raw.rstrip("%"))
        except ValueError:
            raise ConfigurationError(
                f"{name} must be a number of connections or a percentage such as 60%, not {text!r}"
            ) from None
        if value < 0 or (percent and value > 100):
            raise ConfigurationError(f"{name} is out of range: {text!r}")
        return cls(value, percent)

    def connections(self, usable_slots: int) -> float:
        return self.value * usable_slots / 100.0 if self.percent else self.value

    def __str__(self) -> str:
        return f"{self.value:g}%" if self.percent else f"{self.value:g}"


@dataclass(frozen=True)
class Thresholds:
    """Every limit, each configurable (``lifeguard check --help`` names the options)."""

    idle_warning: ConnectionLimit = ConnectionLimit(60, percent=True)
    idle_critical: ConnectionLimit = ConnectionLimit(85, percent=True)
    idle_in_transaction_warning: float = 30.0  # seconds
    idle_in_transaction_critical: float = 120.0
    errors_warning: float = 5.0  # abnormal session ends per minute
    errors_critical: float = 20.0

    def __post_init__(self) -> None:
        pairs = [
            (
                "idle in transaction",
                self.idle_in_transaction_warning,
                self.idle_in_transaction_critical,
            ),
            ("connection errors", self.errors_warning, self.errors_critical),
        ]
        if self.idle_warning.percent == self.idle_critical.percent:
            pairs.append(("idle", self.idle_warning.value, self.idle_critical.value))
        for what, warning, critical in pairs:
            if warning < 0 or critical < 0:
                raise ConfigurationError(f"the {what} thresholds must not be negative")
            if warning > critical:
                raise ConfigurationError(
                    f"the {what} warning threshold ({warning:g}) is above its critical "
                    f"threshold ({critical:g}): lower the warning or raise the critical one"
                )


# Names of the checks, as in findings and in JSON.
IDLE_CONNECTIONS = "idle_connections"
IDLE_IN_TRANSACTION = "idle_in_transaction"
CONNECTION_ERRORS = "connection_errors"
VISIBILITY = "visibility"


@dataclass(frozen=True)
class Finding:
    """One thing wrong, with the backends and worker processes behind it."""

    check: str
    severity: Severity
    summary: str
    backends: tuple[Backend, ...] = ()
    gone: tuple[BackendRef, ...] = ()  # for connection errors: worker backends that vanished
    critical_pids: frozenset[int] = field(default_factory=frozenset)  # over the critical limit

    @property
    def workers(self) -> list[str]:
        """``host:pid`` of each worker process behind the finding, most backends first."""
        counts: dict[str, int] = {}
        for backend in self.backends:
            label = backend.worker_label
            if label is not None:
                counts[label] = counts.get(label, 0) + 1
        return sorted(counts, key=lambda label: (-counts[label], label))


def evaluate(
    snapshot: Snapshot, rates: SessionRates | None, thresholds: Thresholds
) -> list[Finding]:
    """Every finding of this snapshot, worst first; an empty list means OK."""
    findings = [
        finding
        for finding in (
            _visibility(snapshot),
            _idle_connections(snapshot, thresholds),
            _idle_in_transaction(snapshot, thresholds),
            _connection_errors(rates, thresholds),
        )
        if finding is not None
    ]
    return sorted(findings, key=lambda finding: -finding.severity.rank)


def status(findings: Iterable[Finding]) -> Severity:
    return Severity.worst(finding.severity for finding in findings)


def _visibility(snapshot: Snapshot) -> Finding | None:
    hidden = snapshot.hidden_backends
    if not hidden:
        return None
    return Finding(
        VISIBILITY,
        Severity.UNKNOWN,
        f"cannot see the state of {len(hidden)} backends of other roles: "
        f"GRANT pg_monitor TO {snapshot.role} (or pg_read_all_stats)",
        backends=tuple(hidden),
    )


def _idle_connections(snapshot: Snapshot, thresholds: Thresholds) -> Finding | None:
    idle = [backend for backend in snapshot.backends if backend.state == IDLE]
    slots = snapshot.usable_slots
    if len(idle) > thresholds.idle_critical.connections(slots):
        severity, limit = Severity.CRITICAL, thresholds.idle_critical
    elif len(idle) > thresholds.idle_warning.connections(slots):
        severity, limit = Severity.WARNING, thresholds.idle_warning
    else:
        return None
    share = 100.0 * len(idle) / slots if slots > 0 else 100.0
    workers = [backend for backend in idle if backend.worker is not None]
    return Finding(
        IDLE_CONNECTIONS,
        severity,
        f"{len(idle)} idle connections, {share:.0f}% of {slots} usable slots "
        f"(limit {limit}); {len(workers)} held by lifeguard workers",
        backends=tuple(sorted(idle, key=_by_worker)),
    )


def _idle_in_transaction(snapshot: Snapshot, thresholds: Thresholds) -> Finding | None:
    stale = [
        backend
        for backend in snapshot.backends
        if backend.idle_in_transaction
        and (backend.state_seconds or 0.0) > thresholds.idle_in_transaction_warning
    ]
    if not stale:
        return None
    stale.sort(key=lambda backend: -(backend.state_seconds or 0.0))
    critical = frozenset(
        backend.pid
        for backend in stale
        if (backend.state_seconds or 0.0) > thresholds.idle_in_transaction_critical
    )
    severity = Severity.CRITICAL if critical else Severity.WARNING
    limit = (
        thresholds.idle_in_transaction_critical
        if critical
        else thresholds.idle_in_transaction_warning
    )
    oldest = stale[0].state_seconds or 0.0
    return Finding(
        IDLE_IN_TRANSACTION,
        severity,
        f"{len(stale)} backends idle in transaction longer than {limit:g}s (oldest {oldest:.0f}s)",
        backends=tuple(stale),
        critical_pids=critical,
    )


def _connection_errors(rates: SessionRates | None, thresholds: Thresholds) -> Finding | None:
    if rates is None:
        return None
    per_minute = rates.errors_per_minute
    if per_minute > thresholds.errors_critical:
        severity, limit = Severity.CRITICAL, thresholds.errors_critical
    elif per_minute > thresholds.errors_warning:
        severity, limit = Severity.WARNING, thresholds.errors_warning
    else:
        return None
    delta = rates.delta
    return Finding(
        CONNECTION_ERRORS,
        severity,
        f"{per_minute:.1f} sessions per minute ended abnormally (limit {limit:g}/min): "
        f"{delta.abandoned} abandoned, {delta.fatal} fatal, {delta.killed} killed "
        f"in {rates.seconds:.0f}s; {len(rates.gone)} worker backends gone meanwhile",
        gone=rates.gone,
    )


def _by_worker(backend: Backend) -> tuple[str, int]:
    return backend.worker_label or "~", backend.pid
