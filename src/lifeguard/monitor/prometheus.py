"""The figures of ``lifeguard monitor``'s latest report, for Prometheus.

``lifeguard monitor --prometheus-port N`` serves them; a scrape never queries the
database: it reads the report the monitor took at its last refresh. Metric names
(all gauges unless said otherwise):

* ``lifeguard_db_up``: 1 when the last snapshot succeeded;
* ``lifeguard_db_snapshot_seconds``: how long that snapshot took;
* ``lifeguard_db_max_connections``, ``lifeguard_db_usable_connections`` (max minus
  reserved), ``lifeguard_db_server_backends`` (client backends of the whole server);
* ``lifeguard_db_backends{state}``: this database's client backends by state;
* ``lifeguard_db_worker_backends{host,state}``: those of lifeguard workers;
* ``lifeguard_db_oldest_idle_in_transaction_seconds``,
  ``lifeguard_db_oldest_transaction_seconds``;
* ``lifeguard_db_idle_in_transaction_seconds{backend_pid,host,worker_pid,task}``: each
  worker backend idle in transaction longer than the warning threshold;
* ``lifeguard_db_sessions_total``, ``lifeguard_db_sessions_abandoned_total``,
  ``lifeguard_db_sessions_fatal_total``, ``lifeguard_db_sessions_killed_total``
  (counters, from ``pg_stat_database``, PostgreSQL 14+);
* ``lifeguard_db_connection_errors_per_minute``: as the threshold sees it;
* ``lifeguard_check_status{check}``: 0 OK, 1 warning, 2 critical, 3 unknown per check,
  and ``check="overall"``;
* ``lifeguard_db_terminated_backends_total`` (counter): backends this monitor terminated.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

from .report import Report
from .thresholds import (
    CONNECTION_ERRORS,
    IDLE_CONNECTIONS,
    IDLE_IN_TRANSACTION,
    VISIBILITY,
    Severity,
)

CHECKS = (VISIBILITY, IDLE_CONNECTIONS, IDLE_IN_TRANSACTION, CONNECTION_ERRORS)


class ReportCollector:
    """A prometheus_client collector over the latest report of a monitor."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._report: Report | None = None
        self._up = False
        self._terminated = 0

    def update(self, report: Report) -> None:
        with self._lock:
            self._report = report
            self._up = True
            self._terminated += sum(1 for action in report.actions if action.terminated)

    def failed(self) -> None:
        """The last snapshot failed: the database is down (figures of before are kept)."""
        with self._lock:
            self._up = False

    def describe(self) -> list[Any]:
        return []  # no collect() at registration time

    def collect(self) -> Iterator[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        with self._lock:
            report, up, terminated = self._report, self._up, self._terminated
        yield GaugeMetricFamily(
            "lifeguard_db_up", "1 when the last snapshot of the database succeeded", int(up)
        )
        yield CounterMetricFamily(
            "lifeguard_db_terminated_backends",
            "Worker backends this monitor terminated",
            terminated,
        )
        if report is None:
            return
        yield from _snapshot_families(report, GaugeMetricFamily, CounterMetricFamily)


def _snapshot_families(report: Report, gauge: Any, counter: Any) -> Iterator[Any]:
    snap = report.snapshot
    yield gauge("lifeguard_db_snapshot_seconds", "Duration of the last snapshot", snap.duration)
    yield gauge("lifeguard_db_max_connections", "max_connections", snap.max_connections)
    yield gauge(
        "lifeguard_db_usable_connections",
        "max_connections minus superuser_reserved_connections and reserved_connections",
        snap.usable_slots,
    )
    yield gauge(
        "lifeguard_db_server_backends",
        "Client backends of the whole server",
        snap.server_backends,
    )
    backends = gauge(
        "lifeguard_db_backends", "Client backends of the database by state", labels=["state"]
    )
    for state, count in snap.by_state().items():
        backends.add_metric([state], count)
    yield backends
    workers = gauge(
        "lifeguard_db_worker_backends",
        "Backends of lifeguard workers by host and state",
        labels=["host", "state"],
    )
    by_host: dict[tuple[str, str], int] = {}
    for backend in snap.worker_backends:
        assert backend.worker is not None
        key = (backend.worker.hostname, backend.state_label)
        by_host[key] = by_host.get(key, 0) + 1
    for (host, state), count in sorted(by_host.items()):
        workers.add_metric([host, state], count)
    yield workers
    yield from _ages(report, gauge)
    yield from _sessions(report, gauge, counter)
    yield from _statuses(report, gauge)


def _ages(report: Report, gauge: Any) -> Iterator[Any]:
    snap = report.snapshot
    idle_tx = [b.state_seconds or 0.0 for b in snap.backends if b.idle_in_transaction]
    yield gauge(
        "lifeguard_db_oldest_idle_in_transaction_seconds",
        "Longest time a backend of the database has been idle in transaction",
        max(idle_tx, default=0.0),
    )
    yield gauge(
        "lifeguard_db_oldest_transaction_seconds",
        "Age of the oldest open transaction in the database",
        max((b.transaction_seconds or 0.0 for b in snap.backends), default=0.0),
    )
    stale = gauge(
        "lifeguard_db_idle_in_transaction_seconds",
        "Worker backends idle in transaction longer than the warning threshold",
        labels=["backend_pid", "host", "worker_pid", "task"],
    )
    limit = report.thresholds.idle_in_transaction_warning
    for backend in snap.worker_backends:
        if backend.idle_in_transaction and (backend.state_seconds or 0.0) > limit:
            assert backend.worker is not None
            running = report.tasks_of(backend) or ()
            task = ",".join(sorted({t.name for t in running}))
            stale.add_metric(
                [str(backend.pid), backend.worker.hostname, str(backend.worker.pid), task],
                backend.state_seconds or 0.0,
            )
    yield stale


def _sessions(report: Report, gauge: Any, counter: Any) -> Iterator[Any]:
    counters = report.snapshot.counters
    if counters is None:
        return
    for name, value, text in (
        ("sessions", counters.sessions, "Sessions opened on the database"),
        ("sessions_abandoned", counters.abandoned, "Sessions whose client vanished"),
        ("sessions_fatal", counters.fatal, "Sessions ended by a server error or timeout"),
        ("sessions_killed", counters.killed, "Sessions ended by pg_terminate_backend"),
    ):
        yield counter(f"lifeguard_db_{name}", text, value)
    if report.rates is not None:
        yield gauge(
            "lifeguard_db_connection_errors_per_minute",
            "Sessions ended abandoned, fatal or killed, per minute",
            report.rates.errors_per_minute,
        )


def _statuses(report: Report, gauge: Any) -> Iterator[Any]:
    statuses = gauge(
        "lifeguard_check_status",
        "0 OK, 1 warning, 2 critical, 3 unknown, per check",
        labels=["check"],
    )
    found = {finding.check: finding.severity for finding in report.findings}
    for check in CHECKS:
        statuses.add_metric([check], found.get(check, Severity.OK).exit_code)
    statuses.add_metric(["overall"], report.status.exit_code)
    yield statuses


def serve(collector: ReportCollector, port: int, address: str = "0.0.0.0") -> Any:
    """Serve ``collector`` over HTTP from a daemon thread; returns the server."""
    from prometheus_client import CollectorRegistry, start_http_server

    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    server, _thread = start_http_server(port, address, registry=registry)
    return server
