"""Test side of the pytest plugin: the session's real worker and what it saw per task.

:class:`SessionWorker` starts ``celery worker`` for the user's app (through
:mod:`lifeguard.pytest.worker_app`) once and keeps it for the session, replacing it only
when a test asks for another pool. It notes the id of every task the test process
publishes (``before_task_publish``) and reads the events the worker's processes append
to the events directory (:mod:`lifeguard.pytest.recorder`), so a test's findings are the
events of the tasks that test sent.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import socket
import sys
import tempfile
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..demo.worker import CeleryWorker
from . import recorder as names
from .recorder import ENV_EVENTS

#: Check name (what ``allow=`` takes) -> the reason in words.
CHECKS = {
    "in_transaction": "left a transaction open (lifeguard rolled it back)",
    "interrupted": "had a statement interrupted mid-flight (lifeguard cancelled it on the server)",
    "leaked": "leaked a database connection or session from a thread, greenlet or "
    "checkout it did not give back (lifeguard closed it)",
    "database_fault": "failed because of a database fault",
    "idle_in_transaction": "left a backend idle in transaction after the test "
    "(seen in pg_stat_activity)",
    "sessions_abandoned": "left database sessions the server counts as abandoned or "
    "ended by a fatal error (seen in pg_stat_database)",
}

_DISCARD_CHECKS = {
    "in_transaction": "in_transaction",
    "failed_transaction": "in_transaction",
    "atomic_block": "in_transaction",
    "autocommit_changed": "in_transaction",
    "interrupted": "interrupted",
    "leaked": "leaked",
}
_COUNTER_CHECKS = {
    "transactions_rolled_back": "in_transaction",
    "queries_cancelled": "interrupted",
    "leaks_found": "leaked",
    "hand_backs_exhausted": "database_fault",
}


@dataclass
class Finding:
    """One problem lifeguard saw in one task run."""

    check: str
    task: str
    task_id: str | None
    pid: int | None
    where: list[str] = field(default_factory=list)

    def describe(self) -> str:
        task_id = f" [{self.task_id[:8]}]" if self.task_id else ""
        lines = [f"lifeguard: task {self.task}{task_id} {CHECKS[self.check]}"]
        place = f"worker process {self.pid}" if self.pid else "the database"
        lines += [f"    seen in {place}: {line}" for line in self.where]
        lines.append(f'    allow it on purpose: @pytest.mark.lifeguard(allow=["{self.check}"])')
        return "\n".join(lines)


@dataclass
class Event:
    pid: int
    seq: int  # order of reading: within a process, the order it wrote
    record: dict[str, Any]


class SessionWorker:
    """The real worker of one pytest session, and the events its processes write."""

    def __init__(
        self,
        app_path: str,
        *,
        pool: str,
        concurrency: int,
        broker_url: str | None,
        result_backend: str | None,
        databases: dict[str, str] | None = None,
        rootdir: str | None = None,
        queues: list[str] | None = None,
    ) -> None:
        self.app_path = app_path
        self.pool = pool
        self.events_dir = tempfile.mkdtemp(prefix="lifeguard-pytest-")
        self.offsets: dict[Path, int] = {}
        self.by_task: dict[str, list[Event]] = defaultdict(list)  # task id -> its events
        self.done: dict[str, Event] = {}
        self.started: dict[str, int] = {}  # task id -> pid of the process running it
        self.lost: dict[str, int] = {}  # task id -> pid of the process that died in it
        self.seq = 0
        self.published: list[tuple[str, str]] = []  # (task id, task name)
        # Called before the first task published since take_published() goes out.
        self.on_first_publish: Callable[[], None] | None = None
        self._lock = threading.Lock()
        self.nodename = f"lifeguard-pytest-{uuid.uuid4().hex[:8]}@{socket.gethostname()}"
        env = {
            ENV_EVENTS: self.events_dir,
            names.ENV_APP: app_path,
            "PYTHONPATH": os.pathsep.join(p for p in sys.path if p),
        }
        if broker_url:
            env[names.ENV_BROKER] = broker_url
        if result_backend:
            env[names.ENV_BACKEND] = result_backend
        if databases:
            env[names.ENV_DATABASES] = json.dumps(databases)
        self.worker = CeleryWorker(
            "lifeguard.pytest.worker_app",
            pool=pool,
            concurrency=concurrency,
            queue=",".join(queues) if queues else _default_queue(app_path),
            hostname=self.nodename,
            env=env,
            cwd=rootdir,
        )

    def start(self) -> SessionWorker:
        from celery.signals import before_task_publish

        before_task_publish.connect(self._published, weak=False)
        self.worker.start()
        return self

    def stop(self, app: Any = None) -> None:
        """Warm shutdown. Asked by remote control first when ``app`` is given: a gevent
        or eventlet worker acts on SIGTERM only when its event loop next wakes (4 to 5 s
        with a Redis broker), on the control message at once."""
        from celery.signals import before_task_publish

        before_task_publish.disconnect(self._published)
        process = self.worker.process
        if app is not None and process is not None and process.poll() is None:
            with contextlib.suppress(Exception):  # remote control off, broker gone: SIGTERM
                app.control.shutdown(destination=[self.nodename])
                process.wait(10)
        self.worker.stop()
        shutil.rmtree(self.events_dir, ignore_errors=True)

    @property
    def log(self) -> str:
        return self.worker.log

    def pids(self) -> list[int]:
        return [self.worker.pid, *self.worker.children()]

    def _published(self, headers: dict[str, Any] | None = None, **_: Any) -> None:
        task_id = (headers or {}).get("id")
        if task_id:
            with self._lock:
                first = not self.published
                self.published.append((str(task_id), str((headers or {}).get("task"))))
            if first and self.on_first_publish is not None:
                with contextlib.suppress(Exception):  # never in the way of a publish
                    self.on_first_publish()

    def take_published(self) -> list[tuple[str, str]]:
        """The (id, name) of the tasks published since the last call."""
        with self._lock:
            ids, self.published = self.published, []
        return ids

    def read(self) -> None:
        """Take in the complete lines the worker's processes have written since last read."""
        for path in sorted(Path(self.events_dir).glob("*.jsonl")):
            offset = self.offsets.get(path, 0)
            with path.open("rb") as handle:
                handle.seek(offset)
                data = handle.read()
            end = data.rfind(b"\n") + 1
            if not end:
                continue
            self.offsets[path] = offset + end
            pid = int(path.stem)
            for line in data[:end].splitlines():
                record = json.loads(line)
                task_id = record.get("task_id")
                if not task_id:
                    continue  # seen outside any task run this plugin can name
                self.seq += 1
                event = Event(pid, self.seq, record)
                self.by_task[task_id].append(event)
                if record.get("kind") == "done":
                    self.done[task_id] = event
                elif record.get("kind") == "start":
                    self.started[task_id] = pid

    def wait_done(self, ids: list[str], timeout: float) -> list[str]:
        """Wait until every task of ``ids`` has run its last phase; the ids still not done."""
        deadline = time.monotonic() + timeout
        pause = 0.0005  # the done line follows the stored result by microseconds
        while True:
            self.read()
            missing = [task_id for task_id in ids if task_id not in self.done]
            if missing and pause >= 0.008:  # ~8 ms late: did its process die in it?
                missing = self._not_lost(missing)
            if not missing or time.monotonic() > deadline:
                return missing
            if self.worker.process is not None and self.worker.process.poll() is not None:
                return missing
            time.sleep(pause)
            pause = min(pause * 2, 0.02)

    def _not_lost(self, missing: list[str]) -> list[str]:
        """``missing`` without the tasks whose process died while running them (an
        ``os._exit``, a signal, the OOM killer): no ``done`` line will come for those."""
        alive = set(self.pids())
        for task_id in missing:
            pid = self.started.get(task_id)
            if pid is not None and pid not in alive:
                self.lost[task_id] = pid
        return [task_id for task_id in missing if task_id not in self.lost]

    def settle(self, ids: list[str], timeout: float) -> list[str]:
        """Wait for ``ids`` and every task they sent, transitively (a chain's links);
        returns all those ids."""
        deadline = time.monotonic() + timeout
        every, pending = list(ids), list(ids)
        seen = set(ids)
        while pending:
            self.wait_done(pending, max(0.0, deadline - time.monotonic()))
            sent = [
                event.record["child"]
                for task_id in pending
                for event in self.by_task.get(task_id, ())
                if event.record.get("kind") == "sent"
            ]
            pending = [child for child in sent if child not in seen]
            seen.update(pending)
            every += pending
        return every

    def findings(self, ids: list[str]) -> list[Finding]:
        """What lifeguard saw in the runs of ``ids``: one finding per task run and check.

        The runs' events are forgotten: each test reads its own tasks' once."""
        found: dict[tuple[str, str], Finding] = {}
        warnings: dict[str, list[str]] = defaultdict(list)
        events = [event for task_id in ids for event in self.by_task.pop(task_id, ())]
        for task_id in ids:
            self.done.pop(task_id, None)
            self.started.pop(task_id, None)
            self.lost.pop(task_id, None)
        for event in events:
            record = event.record
            task_id = record["task_id"]
            kind = record.get("kind")
            if kind == "warning":
                warnings[task_id].append(record["message"])
                continue
            check = None
            if kind == "count":
                if record["counter"] == "connections_discarded":
                    check = _DISCARD_CHECKS.get(record.get("reason") or "")
                else:
                    check = _COUNTER_CHECKS.get(record["counter"])
            elif kind == "database_fault":
                check = "database_fault"
                code = record.get("sqlstate")
                warnings[task_id].append(
                    f"{record['message']} (SQLSTATE {code})" if code else record["message"]
                )
            if check is not None and (task_id, check) not in found:
                found[(task_id, check)] = Finding(
                    check, record.get("task") or "?", task_id, event.pid
                )
        for (task_id, _), finding in found.items():
            finding.where = warnings.get(task_id, [])
        return list(found.values())

    def runs(self, ids: list[str]) -> list[Event]:
        """The ``done`` events of ``ids``, in the order the worker finished them."""
        return sorted((self.done[i] for i in ids if i in self.done), key=lambda e: e.seq)


def _default_queue(app_path: str) -> str:
    """The app's default queue, which the worker consumes unless told otherwise."""
    from celery.app.utils import find_app

    app = find_app(app_path)
    return str(app.conf.task_default_queue or "celery")


@dataclass(frozen=True)
class SessionEnds:
    """``pg_stat_database``'s counts of one database's sessions that ended badly so far
    (cumulative since the server's stats were last reset)."""

    database: str
    abandoned: int  # the client went away without closing the session
    fatal: int  # the server ended the session with a FATAL error


#: pg_stat_database column -> what a session counted there went through.
_SESSION_ENDS = {
    "abandoned": "sessions_abandoned: the client went away without closing the session "
    "(a process that exited or was killed with a connection open, a cut connection)",
    "fatal": "sessions_fatal: the server ended the session with a FATAL error "
    "(idle_session_timeout, idle_in_transaction_session_timeout, a client lost mid-reply; "
    "the server's log has the error)",
}


def sessions_abandoned(before: SessionEnds, after: SessionEnds, tasks: str) -> list[Finding]:
    """A finding when sessions of the database ended badly between ``before`` and
    ``after`` (the test's tasks ran between them)."""
    where = []
    for figure, words in _SESSION_ENDS.items():
        grew = getattr(after, figure) - getattr(before, figure)
        if grew > 0:
            where.append(f"pg_stat_database of {after.database}: {grew} more in {words}")
    return [Finding("sessions_abandoned", tasks, None, None, where)] if where else []


_IDLE_COLUMNS = "a.pid, a.xact_start, a.application_name, a.datname, a.state, left(a.query, 200)"
# The worker's backends (lifeguard's application_name ends in ":<pid>").
_IDLE_WHERE = "a.state LIKE 'idle in transaction%%' AND a.application_name LIKE ANY(%s)"


class ActivityReader:
    """One autocommit session of the test process that reads pg_stat_activity and
    pg_stat_database around each test (a new session per test would cost more than the
    checks)."""

    def __init__(self, conninfo: dict[str, Any]) -> None:
        self.conninfo = conninfo
        self.conn: Any = None
        self.reported: set[tuple[Any, ...]] = set()  # idle transactions already reported

    def connection(self) -> Any:
        import psycopg

        if self.conn is None or self.conn.closed:
            self.conn = psycopg.connect(
                **self.conninfo, autocommit=True, application_name="lifeguard-pytest"
            )
        return self.conn

    def session_ends(self) -> SessionEnds:
        """The database's abandoned and fatal session counts now.

        A backend writes its session's end to the statistics as it exits, before its
        slot is free: the figures are current within a millisecond of a client's exit,
        and each autocommit statement reads them afresh (its own stats snapshot)."""
        row = (
            self.connection()
            .execute(
                "SELECT datname, sessions_abandoned, sessions_fatal FROM pg_stat_database "
                "WHERE datname = current_database()"
            )
            .fetchone()
        )
        return SessionEnds(str(row[0]), int(row[1]), int(row[2]))

    def rows(self, pids: list[int]) -> list[tuple[Any, ...]]:
        suffixes = [f"%:{pid}" for pid in pids]
        return list(
            self.connection()
            .execute(
                f"SELECT {_IDLE_COLUMNS} FROM pg_stat_activity a WHERE {_IDLE_WHERE}",
                [suffixes],
            )
            .fetchall()
        )

    def after_test(self, pids: list[int]) -> tuple[list[tuple[Any, ...]], SessionEnds]:
        """pg_stat_activity's idle-in-transaction rows of ``pids`` and the session
        figures, in one round trip (the database's row, joined to the idle backends)."""
        suffixes = [f"%:{pid}" for pid in pids]
        rows = (
            self.connection()
            .execute(
                "SELECT d.datname, d.sessions_abandoned, d.sessions_fatal, "
                f"{_IDLE_COLUMNS} FROM pg_stat_database d "
                f"LEFT JOIN pg_stat_activity a ON {_IDLE_WHERE} "
                "WHERE d.datname = current_database()",
                [suffixes],
            )
            .fetchall()
        )
        ends = SessionEnds(str(rows[0][0]), int(rows[0][1]), int(rows[0][2]))
        return [row[3:] for row in rows if row[3] is not None], ends

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()
            self.conn = None

    def idle_in_transaction(
        self, pids: list[int], tasks: str, rows: list[tuple[Any, ...]] | None = None
    ) -> list[Finding]:
        """Backends of the worker's processes idle in transaction now (``rows`` when
        read already); ``tasks`` names the tasks the test sent (the backend's own task
        is not known). Each transaction is reported once, in the first test after it
        began, not again in every later test while it lasts."""
        if rows is None:
            rows = self.rows(pids) if pids else []
        return idle_in_transaction(rows, tasks, self.reported)


def idle_in_transaction(
    rows: list[tuple[Any, ...]], tasks: str, reported: set[tuple[Any, ...]]
) -> list[Finding]:
    """Findings for the pg_stat_activity ``rows`` not in ``reported`` (then added)."""
    found = []
    for pid, began, app, db, state, query in rows:
        if (pid, began) in reported:
            continue
        reported.add((pid, began))
        where = f"backend {pid} ({app}) on {db}: {state}, last statement {query!r}"
        found.append(Finding("idle_in_transaction", tasks, None, None, [where]))
    return found
