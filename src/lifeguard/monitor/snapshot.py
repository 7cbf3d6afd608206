"""One read of what PostgreSQL shows about a database's sessions, in one round trip.

A :class:`Snapshot` holds every client backend of the database (state, ages, wait event,
query cut short), the ones lifeguard's workers opened parsed into host and worker pid
(their ``application_name`` is ``<prefix>:<hostname>:<pid>``), the connection slots of
the server, the monitor's privileges, and the session counters of ``pg_stat_database``
(PostgreSQL 14+). Two snapshots give :class:`SessionRates`: sessions that ended
abandoned (the client vanished: an OOM kill), fatal (a server timeout) or killed
(``pg_terminate_backend``), and the worker backends gone in between.

A monitor without ``pg_read_all_stats`` (or ``pg_monitor``) sees the ``application_name``
of other roles' backends but not their state: those rows come back with ``state=None``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

from ..postgres.appname import WorkerProcessName, parse_application_name
from ..postgres.once_sql import lock_label

#: How much of each backend's query text a snapshot keeps.
QUERY_CHARS = 200

IDLE = "idle"
ACTIVE = "active"
IDLE_IN_TRANSACTION = "idle in transaction"
IDLE_IN_TRANSACTION_ABORTED = "idle in transaction (aborted)"
HIDDEN = "hidden"  # the state of a row the monitor may not see (no pg_read_all_stats)

_CLIENT = (
    "(a.backend_type = 'client backend'"
    " OR (a.backend_type IS NULL AND a.usename IS NOT NULL AND a.datname IS NOT NULL))"
)

_SQL = f"""
WITH header AS (
    SELECT
        current_database() AS database,
        current_user AS role,
        current_setting('server_version_num')::int AS server_version,
        current_setting('max_connections')::int AS max_connections,
        current_setting('superuser_reserved_connections')::int AS superuser_reserved,
        coalesce(current_setting('reserved_connections', true), '0')::int AS reserved,
        pg_has_role('pg_read_all_stats', 'USAGE') AS read_all_stats,
        pg_has_role('pg_signal_backend', 'USAGE') AS signal_backend,
        (SELECT rolsuper FROM pg_roles WHERE rolname = current_user) AS superuser,
        (SELECT count(*) FROM pg_stat_activity a WHERE {_CLIENT})::int AS server_backends,
        {{counters}}
    FROM pg_stat_database d
    WHERE d.datname = current_database()
), advisory AS (
    -- Advisory locks of the single-bigint form (lifeguard's singletons), per backend.
    SELECT
        l.pid,
        array_agg((l.classid::bigint << 32) | l.objid::bigint) FILTER (WHERE l.granted) AS held,
        min((l.classid::bigint << 32) | l.objid::bigint) FILTER (WHERE NOT l.granted) AS waiting
    FROM pg_locks l
    WHERE l.locktype = 'advisory' AND l.objsubid = 1
        AND l.database = (SELECT oid FROM pg_database WHERE datname = current_database())
    GROUP BY l.pid
), activity AS (
    SELECT
        a.pid,
        a.application_name,
        a.usename::text,
        a.state,
        extract(epoch FROM now() - a.state_change)::float8 AS state_seconds,
        extract(epoch FROM now() - a.xact_start)::float8 AS xact_seconds,
        extract(epoch FROM now() - a.query_start)::float8 AS query_seconds,
        a.wait_event_type || ':' || a.wait_event AS wait_event,
        left(a.query, %(query_chars)s) AS query,
        a.backend_start,
        host(a.client_addr) AS client_addr,
        a.client_port,
        adv.held AS advisory_held,
        adv.waiting AS advisory_waiting
    FROM pg_stat_activity a LEFT JOIN advisory adv ON adv.pid = a.pid
    WHERE a.datname = current_database() AND a.pid <> pg_backend_pid() AND {_CLIENT}
)
SELECT header.*, activity.* FROM header LEFT JOIN activity ON true
"""

_COUNTERS_14 = (
    "d.sessions, d.sessions_abandoned, d.sessions_fatal, d.sessions_killed, d.stats_reset"
)
_COUNTERS_OLD = "NULL::bigint, NULL::bigint, NULL::bigint, NULL::bigint, NULL::timestamptz"
_HEADER_COLUMNS = 15  # columns of the header part of each row


@dataclass(frozen=True)
class Backend:
    """One client backend of the database as ``pg_stat_activity`` shows it."""

    pid: int
    application_name: str
    worker: WorkerProcessName | None  # set for lifeguard workers' backends
    user: str | None
    state: str | None  # None: hidden from this monitor (no pg_read_all_stats)
    state_seconds: float | None  # time in the current state
    transaction_seconds: float | None  # age of the open transaction, if any
    query_seconds: float | None
    wait_event: str | None  # "Client:ClientRead"
    query: str | None  # cut to QUERY_CHARS
    backend_start: Any  # datetime; with the pid it names the session uniquely
    client_addr: str | None = None
    client_port: int | None = None  # the client's TCP port (-1: Unix socket)
    advisory_held: tuple[int, ...] = ()  # advisory lock ids held (singletons)
    advisory_waiting: int | None = None  # the advisory lock id it waits for

    @property
    def lock_label(self) -> tuple[str, str | None] | None:
        """(key, task) of the singleton lock statement it ran last, if it is one."""
        return lock_label(self.query)

    @property
    def state_label(self) -> str:
        return self.state if self.state is not None else HIDDEN

    @property
    def idle_in_transaction(self) -> bool:
        return self.state in (IDLE_IN_TRANSACTION, IDLE_IN_TRANSACTION_ABORTED)

    @property
    def worker_label(self) -> str | None:
        """``host:pid`` of the worker process behind the backend, if it is one."""
        if self.worker is None:
            return None
        return f"{self.worker.hostname}:{self.worker.pid}"

    @property
    def ref(self) -> BackendRef:
        return BackendRef(self.pid, self.application_name, self.backend_start)


@dataclass(frozen=True)
class BackendRef:
    """Just enough of a backend to recognise it in a later snapshot."""

    pid: int
    application_name: str
    backend_start: Any


@dataclass(frozen=True)
class SessionCounters:
    """``pg_stat_database`` session counters (PostgreSQL 14+), cumulative."""

    sessions: int
    abandoned: int  # the client went away without closing (killed worker, OOM)
    fatal: int  # ended by a server error, e.g. idle_in_transaction_session_timeout
    killed: int  # pg_terminate_backend
    stats_reset: Any = None

    @property
    def errors(self) -> int:
        """Sessions that did not end with the client closing them."""
        return self.abandoned + self.fatal + self.killed

    def as_dict(self) -> dict[str, int]:
        return {
            "sessions": self.sessions,
            "abandoned": self.abandoned,
            "fatal": self.fatal,
            "killed": self.killed,
        }


@dataclass(frozen=True)
class Privileges:
    read_all_stats: bool  # pg_read_all_stats (in pg_monitor): others' state is visible
    signal_backend: bool  # pg_signal_backend: may terminate others' backends
    superuser: bool


@dataclass(frozen=True)
class Snapshot:
    """A database's sessions at one moment."""

    taken_at: float  # time.time()
    duration: float  # seconds the query took, round trip included
    prefix: str
    database: str
    role: str
    server_version: int
    max_connections: int
    superuser_reserved: int
    reserved: int  # reserved_connections, PostgreSQL 16+
    server_backends: int  # client backends of the whole server, every database
    privileges: Privileges
    counters: SessionCounters | None  # None before PostgreSQL 14
    backends: tuple[Backend, ...]

    @property
    def usable_slots(self) -> int:
        """Connections ordinary roles may open: max_connections minus the reserved ones."""
        return self.max_connections - self.superuser_reserved - self.reserved

    @property
    def worker_backends(self) -> list[Backend]:
        return [backend for backend in self.backends if backend.worker is not None]

    @property
    def singleton_locks(self) -> list[SingletonHold]:
        """Each advisory lock held in the database: its holder and its waiters; the key
        and task when the holder (or a waiter) ran lifeguard's labelled lock statement."""
        holds = []
        for holder in self.backends:
            for lock_id in holder.advisory_held:
                waiters = tuple(b for b in self.backends if b.advisory_waiting == lock_id)
                label = next(
                    (b.lock_label for b in (holder, *waiters) if b.lock_label is not None), None
                )
                holds.append(SingletonHold(lock_id, label, holder, waiters))
        return sorted(holds, key=lambda hold: -(hold.holder.state_seconds or 0.0))

    @property
    def hidden_backends(self) -> list[Backend]:
        return [backend for backend in self.backends if backend.state is None]

    def by_state(self, backends: Iterable[Backend] | None = None) -> dict[str, int]:
        counts: dict[str, int] = {}
        for backend in self.backends if backends is None else backends:
            counts[backend.state_label] = counts.get(backend.state_label, 0) + 1
        return dict(sorted(counts.items()))

    def baseline(self) -> Baseline:
        return Baseline(
            taken_at=self.taken_at,
            counters=self.counters,
            workers=tuple(backend.ref for backend in self.worker_backends),
        )


@dataclass(frozen=True)
class SingletonHold:
    """An advisory lock (a singleton) and the backend that holds it."""

    lock_id: int
    label: tuple[str, str | None] | None  # (key, task name), if known
    holder: Backend
    waiters: tuple[Backend, ...]

    @property
    def key(self) -> str | None:
        return self.label[0] if self.label else None

    @property
    def task(self) -> str | None:
        return self.label[1] if self.label else None

    @property
    def held_seconds(self) -> float | None:
        """Since the lock session's last statement (the lock) ended: idle since then."""
        return self.holder.state_seconds if self.holder.state == IDLE else None


@dataclass(frozen=True)
class Baseline:
    """What a later snapshot needs from an earlier one to compute rates."""

    taken_at: float
    counters: SessionCounters | None
    workers: tuple[BackendRef, ...]


@dataclass(frozen=True)
class SessionRates:
    """What happened to sessions between a baseline and a snapshot."""

    seconds: float
    delta: SessionCounters
    gone: tuple[BackendRef, ...]  # worker backends of the baseline no longer there

    @property
    def errors_per_minute(self) -> float:
        """Abnormal session ends per minute, averaged over at least one minute.

        A shorter window counts the errors as they are, so that a single kill seen two
        seconds after the previous snapshot is 1/min, not 30/min.
        """
        return self.delta.errors / max(self.seconds / 60.0, 1.0)


def server_version(conn: Any) -> int:
    """``server_version_num`` of a psycopg 3 or psycopg2 connection."""
    info = getattr(conn, "info", None)
    version = getattr(info, "server_version", None) or getattr(conn, "server_version", None)
    return int(version or 0)


def take_snapshot(conn: Any, prefix: str, query_chars: int = QUERY_CHARS) -> Snapshot:
    """Read the database ``conn`` is connected to, in one query."""
    counters_sql = _COUNTERS_14 if server_version(conn) >= 140000 else _COUNTERS_OLD
    sql = _SQL.replace("{counters}", counters_sql)
    started = time.monotonic()
    taken_at = time.time()
    with conn.cursor() as cur:
        cur.execute(sql, {"query_chars": query_chars})
        rows = cur.fetchall()
    duration = time.monotonic() - started
    if not rows:
        raise RuntimeError("pg_stat_database has no row for the current database")
    head = rows[0][:_HEADER_COLUMNS]
    sessions, abandoned, fatal, killed, stats_reset = head[10:15]
    counters = (
        SessionCounters(int(sessions), int(abandoned), int(fatal), int(killed), stats_reset)
        if sessions is not None
        else None
    )
    return Snapshot(
        taken_at=taken_at,
        duration=duration,
        prefix=prefix,
        database=head[0],
        role=head[1],
        server_version=head[2],
        max_connections=head[3],
        superuser_reserved=head[4],
        reserved=head[5],
        privileges=Privileges(
            read_all_stats=bool(head[6]), signal_backend=bool(head[7]), superuser=bool(head[8])
        ),
        server_backends=head[9],
        counters=counters,
        backends=tuple(
            _backend(row[_HEADER_COLUMNS:], prefix) for row in rows if row[_HEADER_COLUMNS]
        ),
    )


def _backend(row: tuple[Any, ...], prefix: str) -> Backend:
    pid, app_name, user, state, state_s, xact_s, query_s, wait, query, started = row[:10]
    addr, port, held, waiting = row[10:14]
    return Backend(
        pid=pid,
        application_name=app_name or "",
        worker=parse_application_name(app_name, prefix),
        user=user,
        state=state,
        state_seconds=_age(state_s),
        transaction_seconds=_age(xact_s),
        query_seconds=_age(query_s),
        wait_event=wait,
        query=query,
        backend_start=started,
        client_addr=addr,
        client_port=port,
        advisory_held=tuple(held or ()),
        advisory_waiting=waiting,
    )


def _age(seconds: float | None) -> float | None:
    # now() is when the snapshot's statement started: a backend may change state after.
    return None if seconds is None else max(seconds, 0.0)


def session_rates(baseline: Baseline, snapshot: Snapshot) -> SessionRates | None:
    """Rates since ``baseline``; None without counters or after a statistics reset."""
    before, after = baseline.counters, snapshot.counters
    if before is None or after is None or before.stats_reset != after.stats_reset:
        return None
    delta = SessionCounters(
        sessions=after.sessions - before.sessions,
        abandoned=after.abandoned - before.abandoned,
        fatal=after.fatal - before.fatal,
        killed=after.killed - before.killed,
    )
    if min(delta.as_dict().values()) < 0:
        return None  # counters went back: reset without stats_reset (a crash restart)
    now = {backend.ref for backend in snapshot.worker_backends}
    gone = tuple(ref for ref in baseline.workers if ref not in now)
    return SessionRates(
        seconds=max(snapshot.taken_at - baseline.taken_at, 0.0), delta=delta, gone=gone
    )


def baseline_to_json(baseline: Baseline) -> dict[str, Any]:
    """A baseline as JSON, for ``lifeguard check``'s state file between runs."""
    counters = baseline.counters
    return {
        "taken_at": baseline.taken_at,
        "counters": None
        if counters is None
        else {**counters.as_dict(), "stats_reset": _iso(counters.stats_reset)},
        "workers": [
            [ref.pid, ref.application_name, _iso(ref.backend_start)] for ref in baseline.workers
        ],
    }


def baseline_from_json(data: Mapping[str, Any]) -> Baseline:
    counters = data.get("counters")
    return Baseline(
        taken_at=float(data["taken_at"]),
        counters=None
        if counters is None
        else SessionCounters(
            sessions=int(counters["sessions"]),
            abandoned=int(counters["abandoned"]),
            fatal=int(counters["fatal"]),
            killed=int(counters["killed"]),
            stats_reset=_from_iso(counters.get("stats_reset")),
        ),
        workers=tuple(
            BackendRef(int(pid), str(name), _from_iso(started))
            for pid, name, started in data.get("workers", [])
        ),
    )


def _iso(value: Any) -> str | None:
    return value.isoformat() if value is not None else None


def _from_iso(value: str | None) -> Any:
    from datetime import datetime

    return datetime.fromisoformat(value) if value else None
