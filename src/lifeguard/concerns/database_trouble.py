"""Database trouble loses no task: hand-backs, a paused worker, slots that circulate.

Three parts, one shared state (see docs/database-trouble.md):

* **Hand-back.** Every registered task's ``run`` is wrapped at worker start, as Celery's
  own ``autoretry_for`` does. A task that fails with a transient database failure
  (:func:`lifeguard.postgres.failures.classify`) before it reached the database in this
  run is re-published with a delay, like ``Task.retry`` but with ``retries`` unchanged
  and a ``lifeguard_hand_backs`` header counting the hand-backs; then ``Retry`` is
  raised, so the attempt ends as RETRY and its message is acknowledged after the new one
  is published. After ``hand_back_limit`` hand-backs the task fails with the real error.
* **Pause.** Every process reports its transient failures into an anonymous shared
  ``mmap`` made in the MainProcess before fork. A thread of the MainProcess watches it:
  after ``pause_after_failures`` "unavailable" failures within ``pause_window`` seconds it
  cancels the task consumer (on the consumer's own loop, ``consumer.call_soon``), probes
  the database at most once a second, and resumes consuming as soon as it answers.
* **Slots.** A refusal for lack of connection slots marks the worker "slots exhausted
  recently" for ``pause_window`` seconds; meanwhile the Django concern closes idle
  connections at task end (:meth:`DatabaseTrouble.slots_scarce`), so slots circulate.
"""

from __future__ import annotations

import functools
import inspect
import logging
import mmap
import multiprocessing
import random
import re
import struct
import sys
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from .. import stats as counters
from ..hooks import Hook, WorkerInfo
from ..postgres import failures
from ..postgres.conninfo import describe_django_database, describe_sqlalchemy_url
from ..postgres.slots import limits_on

logger = logging.getLogger("lifeguard.database")

#: Message header counting how many times lifeguard handed this task back.
HEADER = "lifeguard_hand_backs"
#: ``TaskRun.scratch`` key: the run reached the database (a statement, a checkout).
TOUCHED = "lifeguard_database_touched"

HANDED_BACK = counters.TASKS_HANDED_BACK
GAVE_UP = counters.HAND_BACKS_EXHAUSTED

BACKOFF_BASE = 1.0  # seconds: the first hand-back waits 0.5 to 1 s
BACKOFF_MAX = 30.0  # no single wait longer than this (before jitter)
# One probe a second per worker, the bound the pause promises. No growth beyond it: the
# wait between the server answering and the resume is at most one interval (plus one
# look), and throughput must be back within 2 s of the server answering.
PROBE_INTERVAL = 1.0
PROBE_TIMEOUT = 3  # seconds: connect_timeout of a probe
WATCH_EVERY = 0.2  # seconds between two looks of the MainProcess at the shared state

#: SQLSTATEs with which the server refuses or aborts a statement before it can commit:
#: a session terminated by a fast shutdown (admin_shutdown), one refused at start, or a
#: write refused by a read-only server (read_only_sql_transaction: a standby after a
#: failover, ``default_transaction_read_only``; the statement changed nothing).
_NOT_EXECUTED = {"57P01", "57P03", "53300", failures.READ_ONLY}
_DATABASE_MODULES = ("psycopg", "psycopg2", "asyncpg", "sqlalchemy", "django.db")


# --- the state every process of the worker shares --------------------------------------

_RING = 64
_FIELDS = (
    "ring_pos",
    "paused",
    "pauses",
    "unavailable",
    "slots_refusals",
    "handed_back",
    "gave_up",
    "last_unavailable",
    "last_slots_refusal",
    "slots_logged",
    "paused_since",
    "last_read_only",
)
_FLOATS = {
    "last_unavailable",
    "last_slots_refusal",
    "slots_logged",
    "paused_since",
    "last_read_only",
}
_OFFSET = {name: 8 * i for i, name in enumerate(_FIELDS)}
_RING_AT = 8 * len(_FIELDS)


class SharedState:
    """A few counters and timestamps in an anonymous shared ``mmap``.

    Made in the MainProcess before the pool forks, so every prefork child writes to the
    same pages; under the other pools it is simply this process's memory. Timestamps are
    ``time.monotonic()``, one clock for every process of the machine on Linux.
    """

    def __init__(self) -> None:
        self._map = mmap.mmap(-1, _RING_AT + 8 * _RING)
        self._lock = multiprocessing.get_context("fork").Lock()

    def _locked(self) -> bool:
        # A child killed while holding the lock must not freeze the others: give up.
        return bool(self._lock.acquire(timeout=0.5))

    def get(self, name: str) -> float:
        fmt = "d" if name in _FLOATS else "q"
        return float(struct.unpack_from(fmt, self._map, _OFFSET[name])[0])

    def set(self, name: str, value: float) -> None:
        if name in _FLOATS:
            struct.pack_into("d", self._map, _OFFSET[name], float(value))
        else:
            struct.pack_into("q", self._map, _OFFSET[name], int(value))

    def add(self, name: str, n: int = 1) -> None:
        if not self._locked():
            return
        try:
            self.set(name, self.get(name) + n)
        finally:
            self._lock.release()

    def record(self, failure: failures.Failure, read_only: bool = False) -> None:
        """A process met a transient failure: remember when, for the pause and slots
        (``read_only``: a write the server refused as read-only; its probe must write)."""
        now = time.monotonic()
        if not self._locked():
            return
        try:
            if failure is failures.Failure.SLOTS_EXHAUSTED:
                self.set("slots_refusals", self.get("slots_refusals") + 1)
                self.set("last_slots_refusal", now)
                return
            pos = int(self.get("ring_pos"))
            struct.pack_into("d", self._map, _RING_AT + 8 * (pos % _RING), now)
            self.set("ring_pos", pos + 1)
            self.set("unavailable", self.get("unavailable") + 1)
            self.set("last_unavailable", now)
            if read_only:
                self.set("last_read_only", now)
        finally:
            self._lock.release()

    def unavailable_since(self, since: float) -> int:
        """How many "unavailable" failures the ring holds at or after ``since``."""
        stamps = struct.unpack_from(f"{_RING}d", self._map, _RING_AT)
        return sum(1 for stamp in stamps if stamp >= since and stamp > 0)

    def claim_slots_log(self, window: float) -> bool:
        """True for the one process that logs the slots line of this episode."""
        if not self._locked():
            return False
        try:
            if self.get("last_slots_refusal") - self.get("slots_logged") < window and (
                self.get("slots_logged") > 0
            ):
                return False
            self.set("slots_logged", time.monotonic())
            return True
        finally:
            self._lock.release()


# --- probes: a plain connect, never through the app's pools ----------------------------


class ReadOnly(Exception):
    """A probe connected, but the server takes no writes yet."""


def _connect_and_close(connection: Any, writable: bool) -> None:
    """Close a probe's connection; first, if ``writable``, require the server to take
    writes (a server still read-only after a failover is not back for writing tasks)."""
    try:
        if writable:
            cursor = connection.cursor()
            cursor.execute("SHOW transaction_read_only")
            if cursor.fetchone()[0] == "on":
                raise ReadOnly("the server is read-only (transaction_read_only = on)")
    finally:
        connection.close()


class Probe:
    """One database the worker uses, and how to try a plain connect to it."""

    def __init__(self, label: str, connect: Callable[[bool], None]) -> None:
        self.label = label
        self.connect = connect  # connect(writable): raises while unavailable


def _django_probes(aliases: list[str]) -> Iterator[Probe]:
    from django.db import connections

    for alias in aliases:
        wrapper = connections[alias]
        label = describe_django_database(alias, wrapper.settings_dict)

        def connect(writable: bool, wrapper: Any = wrapper) -> None:
            params = dict(wrapper.get_connection_params())
            for key in ("cursor_factory", "context", "prepare_threshold", "server_side_binding"):
                params.pop(key, None)
            params.setdefault("connect_timeout", PROBE_TIMEOUT)
            _connect_and_close(wrapper.Database.connect(**params), writable)

        yield Probe(label, connect)


def _sqlalchemy_probes(hooks: list[Hook]) -> Iterator[Probe]:
    for hook in hooks:
        if hook.name != "sqlalchemy":
            continue
        for managed in list(getattr(hook, "engines", None) or []):
            engine = managed.engine
            if managed.is_async or not managed.is_postgresql:
                continue
            if engine.dialect.driver not in ("psycopg", "psycopg2"):
                continue

            def connect(writable: bool, engine: Any = engine) -> None:
                cargs, cparams = engine.dialect.create_connect_args(engine.url)
                cparams = dict(cparams)
                cparams.setdefault("connect_timeout", PROBE_TIMEOUT)
                connection = engine.dialect.loaded_dbapi.connect(*cargs, **cparams)
                _connect_and_close(connection, writable)

            yield Probe(describe_sqlalchemy_url(engine.url), connect)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return (text[0] if text else type(exc).__name__)[:200]


def _from_database_code(exc: BaseException) -> bool:
    """The exception was raised through a database library (not, say, an HTTP client)."""
    seen: set[int] = set()
    current: BaseException | None = exc
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        tb = current.__traceback__
        while tb is not None:
            module = str(tb.tb_frame.f_globals.get("__name__", ""))
            if module.startswith(_DATABASE_MODULES):
                return True
            tb = tb.tb_next
        current = current.__cause__ or current.__context__
    return False


def _not_executed(exc: BaseException) -> bool:
    """A statement's error that proves it did not commit (the session was terminated by
    a fast shutdown before or while it ran: the server rolls back what it was doing)."""
    current: BaseException | None = exc
    for _ in range(4):
        if current is None:
            return False
        code = failures.sqlstate(current)
        if code is not None:
            return code in _NOT_EXECUTED
        current = current.__cause__
    return False


_ROLE_LIMIT = re.compile(r'too many connections for role "([^"]+)"')


class DatabaseTrouble(Hook):
    """The database-trouble concern: one instance per guard."""

    name = "database_trouble"

    def __init__(self) -> None:
        self.state: SharedState | None = None
        self.worker: WorkerInfo | None = None
        self.consumer: Any = None
        self._wrapped = 0
        self._stop = threading.Event()
        self._watcher: threading.Thread | None = None
        self._probes: list[Probe] | None = None
        self._paused_at: float | None = None
        self._probe_count = 0
        self._probe_writable = False  # the pause began with writes refused as read-only
        self.last_pause: dict[str, Any] | None = None
        # (refusal message, role): logged with the server's numbers at the next connect.
        self._slots_line: tuple[str, str | None] | None = None

    # --- worker start: shared state, task wrappers ----------------------------------

    def on_worker_start(self, worker: WorkerInfo) -> None:
        self.worker = worker
        self.state = SharedState()
        options = self.guard.options
        # The wrapper also reports failures (for the pause and the slots condition), so it
        # is installed unless both the hand-back and the pause are off.
        if options.hand_back_unreachable or options.pause_after_failures:
            for task in list(self.guard.app.tasks.values()):
                self._wrap(task)

    def _wrap(self, task: Any) -> None:
        if task.name.startswith("celery.") or hasattr(task, "_lifeguard_unwrapped_run"):
            return
        original = task.run
        hook = self

        async def guarded(coroutine: Any, request: Any) -> Any:
            # An async task's body runs later, on the event loop's thread, where Celery's
            # request is not current: the worker thread's request is passed in.
            try:
                return await coroutine
            except Exception as exc:
                hook._hand_back_or_raise(task, exc, request)
                raise

        @functools.wraps(original)
        def run(*args: Any, **kwargs: Any) -> Any:
            try:
                result = original(*args, **kwargs)
            except Exception as exc:
                hook._hand_back_or_raise(task, exc)
                raise
            if inspect.iscoroutine(result):
                return guarded(result, task.request)
            return result

        task._lifeguard_unwrapped_run = original
        task.run = run
        self._wrapped += 1

    def on_process_start(self, worker: WorkerInfo, forked: bool) -> None:
        self.worker = worker
        if "django" in sys.modules:
            try:
                from django.conf import settings

                if settings.configured:
                    from django.db.backends.signals import connection_created

                    connection_created.connect(
                        self._on_django_connection,
                        weak=False,
                        dispatch_uid=f"lifeguard-trouble-{id(self)}",
                    )
            except ImportError:
                pass
        if "sqlalchemy" in sys.modules:
            from sqlalchemy import event
            from sqlalchemy.pool import Pool

            if not event.contains(Pool, "checkout", self._on_pool_checkout):
                event.listen(Pool, "checkout", self._on_pool_checkout)

    # --- did this run reach the database? -------------------------------------------

    def _touch(self) -> None:
        run = self.guard.lifecycle.current_run()
        if run is not None:
            run.scratch[TOUCHED] = True

    def _on_django_connection(self, sender: Any = None, connection: Any = None, **_: Any) -> None:
        if connection is None:
            return
        if self._count_statement not in connection.execute_wrappers:
            connection.execute_wrappers.append(self._count_statement)
        pending, self._slots_line = self._slots_line, None
        if pending is not None and connection.vendor == "postgresql":
            self._log_slots(pending, self._server_limits(connection))

    def _count_statement(
        self, execute: Callable[..., Any], sql: Any, params: Any, many: bool, context: Any
    ) -> Any:
        """Django execute wrapper: a statement that ran, or may have, marks the run."""
        try:
            result = execute(sql, params, many, context)
        except BaseException as exc:
            if not _not_executed(exc):
                self._touch()
            raise
        self._touch()
        return result

    def _on_pool_checkout(self, dbapi_connection: Any, record: Any, proxy: Any) -> None:
        self._touch()

    # --- hand-back --------------------------------------------------------------------

    def _hand_back_or_raise(self, task: Any, exc: Exception, request: Any = None) -> None:
        """Raise ``Retry`` after re-publishing the task, or return to let ``exc`` go.

        Whatever goes wrong in here is logged, and the task fails with its own error."""
        from celery.exceptions import Retry, TaskPredicate

        if isinstance(exc, TaskPredicate):
            return  # the task's own retry (or Ignore/Reject): Celery's business
        try:
            handed = self._hand_back(task, exc, request if request is not None else task.request)
        except Exception:
            logger.exception("lifeguard: handing a task back failed; it fails with its own error")
            return
        if handed is not None:
            delay, signature = handed
            raise Retry(exc=exc, when=delay, sig=signature) from exc

    def _hand_back(self, task: Any, exc: Exception, request: Any) -> tuple[float, Any] | None:
        """Report a transient failure; re-publish the task if it never reached the
        database in this run. Returns (delay, signature) once published."""
        failure = failures.classify(exc)
        if not failure.transient or not _from_database_code(exc):
            return None
        if self.state is not None:
            self.state.record(failure, read_only=failures.read_only(exc))
        if failure is failures.Failure.SLOTS_EXHAUSTED:
            self._log_slots_refusal(exc)
        run = self.guard.lifecycle.current_run()
        if not self.guard.options.hand_back_unreachable or run is None:
            return None
        if run.scratch.get(TOUCHED) or request.called_directly or request.is_eager:
            return None
        headers = dict(request.headers or {})
        done = int(headers.get(HEADER) or getattr(request, HEADER, 0) or 0)
        limit = self.guard.options.hand_back_limit
        if done >= limit:
            self.guard.counters.incr(GAVE_UP, task=task.name)
            if self.state is not None:
                self.state.add("gave_up")
            logger.warning(
                "lifeguard: task %s[%s] failed after %d hand-backs (hand_back_limit): %s",
                task.name,
                request.id,
                done,
                _first_line(exc),
            )
            return None
        delay = random.uniform(0.5, 1.0) * min(BACKOFF_MAX, BACKOFF_BASE * 2**done)
        headers.pop("x-death", None)
        headers[HEADER] = done + 1
        signature = task.signature_from_request(
            request, None, None, countdown=delay, retries=request.retries, headers=headers
        )
        signature.apply_async()  # published before the attempt ends: then acknowledged
        self.guard.counters.incr(HANDED_BACK, task=task.name, reason=failure.value)
        if self.state is not None:
            self.state.add("handed_back")
        logger.info(
            "lifeguard: handed task %s[%s] back (%d of at most %d), again in %.1fs: "
            "it never reached the database (%s: %s)",
            task.name,
            request.id,
            done + 1,
            limit,
            delay,
            failure.value,
            _first_line(exc),
        )
        return delay, signature

    # --- slots ------------------------------------------------------------------------

    def slots_scarce(self) -> bool:
        """A connect was refused for lack of slots within the last ``pause_window`` s:
        processes should give idle connections back at task end."""
        if self.state is None:
            return False
        last = self.state.get("last_slots_refusal")
        return last > 0 and time.monotonic() - last < self.guard.options.pause_window

    def _log_slots_refusal(self, exc: Exception) -> None:
        """Claim this episode's log line; it is written once this process connects again,
        on that connection, which can read max_connections and the role's limit."""
        if self.state is None or not self.state.claim_slots_log(self.guard.options.pause_window):
            return
        role = _ROLE_LIMIT.search(str(exc))
        line = (_first_line(exc), role.group(1) if role else None)
        django_hook = next((h for h in self.guard.hooks if h.name == "django"), None)
        if django_hook is not None and getattr(django_hook, "enabled", False):
            self._slots_line = line
        else:  # no Django connection to read the numbers on later: say what is known
            self._log_slots(line, "max_connections and the role's limit need a connection")

    def _log_slots(self, line: tuple[str, str | None], limits: str) -> None:
        worker = self.worker
        pool = f"{worker.pool.value} -c {worker.concurrency}" if worker else "?"
        logger.warning(
            "lifeguard: slots exhausted: PostgreSQL refused a connection for lack of slots "
            "(%s). This worker runs %s, one connection per process and database; %s. For "
            "the next %.0fs processes close idle connections at task end so slots circulate, "
            "and refused tasks are handed back. Fix: raise the limit to at least the total "
            "concurrency of the workers on this database (ALTER ROLE ... CONNECTION LIMIT, "
            "max_connections), lower --concurrency, or put PgBouncer in front.",
            line[0],
            pool,
            limits,
            self.guard.options.pause_window,
        )

    @staticmethod
    def _server_limits(wrapper: Any) -> str:
        """max_connections and the role's limit, read on the driver's connection (not
        through Django's cursor: this is lifeguard's query, not the task's)."""
        limits = limits_on(wrapper.connection)
        if limits is None:
            return "max_connections and the role's limit could not be read"
        return limits.summary()

    # --- the pause, in the MainProcess ------------------------------------------------

    def on_consumer_ready(self, consumer: Any) -> None:
        self.consumer = consumer
        options = self.guard.options
        if options.pause_after_failures == 0 or self.state is None:
            return
        if self._watcher is None:
            self._watcher = threading.Thread(
                target=self._watch, name="lifeguard-database-watch", daemon=True
            )
            self._watcher.start()

    def _probe_targets(self) -> list[Probe]:
        if self._probes is None:
            probes: list[Probe] = []
            django_hook = next((h for h in self.guard.hooks if h.name == "django"), None)
            if django_hook is not None and getattr(django_hook, "enabled", False):
                probes += _django_probes(list(getattr(django_hook, "aliases", {})))
            probes += _sqlalchemy_probes(self.guard.hooks)
            self._probes = probes
        return self._probes

    def _watch(self) -> None:
        options = self.guard.options
        assert self.state is not None
        next_probe = 0.0
        resumed_at = 0.0  # failures from before a resume do not count again
        while not self._stop.wait(WATCH_EVERY):
            try:
                now = time.monotonic()
                if self._paused_at is None:
                    since = max(now - options.pause_window, resumed_at)
                    recent = self.state.unavailable_since(since)
                    if recent >= options.pause_after_failures and self._probe_targets():
                        self._pause(recent)
                        next_probe = now + PROBE_INTERVAL
                elif now >= next_probe:
                    if self._probe():
                        self._resume()
                        resumed_at = time.monotonic()
                    else:
                        next_probe = time.monotonic() + PROBE_INTERVAL
            except Exception:
                logger.exception("lifeguard: the database watch failed; tasks are not affected")

    def _pause(self, recent: int) -> None:
        assert self.state is not None
        self._paused_at = time.monotonic()
        self._probe_count = 0
        last_read_only = self.state.get("last_read_only")
        window = self.guard.options.pause_window
        self._probe_writable = last_read_only > 0 and self._paused_at - last_read_only < window
        self.state.set("paused", 1)
        self.state.set("paused_since", self._paused_at)
        self.state.add("pauses")
        names = ", ".join(p.label for p in self._probe_targets())
        logger.warning(
            "lifeguard: paused consuming tasks: %d connection failures in %.0fs show the "
            "database %s %s; tasks already received are handed back if they meet "
            "the outage. Probing it about once a second%s.",
            recent,
            window,
            names,
            "read-only (writes refused, as after a failover)"
            if self._probe_writable
            else "unavailable",
            " until it takes writes" if self._probe_writable else "",
        )
        self._on_consumer_loop(lambda consumer: consumer.task_consumer.cancel())

    def _probe(self) -> bool:
        self._probe_count += 1
        if not self._probe_writable and self.state is not None and self._paused_at is not None:
            # Refused connections first (the primary gone), read-only writes next (its
            # standby answering): from then on, the server must take writes.
            self._probe_writable = self.state.get("last_read_only") >= self._paused_at
        for probe in self._probe_targets():
            try:
                probe.connect(self._probe_writable)
            except Exception as exc:
                logger.info(
                    "lifeguard: probe %d of %s: still unavailable (%s)",
                    self._probe_count,
                    probe.label,
                    _first_line(exc),
                )
                return False
        return True

    def _resume(self) -> None:
        assert self.state is not None and self._paused_at is not None
        paused_for = time.monotonic() - self._paused_at
        self.last_pause = {"seconds": round(paused_for, 3), "probes": self._probe_count}
        self._paused_at = None
        self.state.set("paused", 0)
        names = ", ".join(p.label for p in self._probe_targets())
        logger.warning(
            "lifeguard: resumed consuming tasks: the database %s answers again (paused "
            "%.1fs, %d probes)",
            names,
            paused_for,
            self._probe_count,
        )

        def consume(consumer: Any) -> None:
            consumer.task_consumer.consume()

        self._on_consumer_loop(consume)

    def _on_consumer_loop(self, action: Callable[[Any], None]) -> None:
        """Run ``action(consumer)`` where the consumer runs: its event loop (hub), or
        the synloop's pending operations on pools without one."""
        consumer = self.consumer
        if consumer is None:
            return

        def call() -> None:
            try:
                if consumer.task_consumer is not None:
                    action(consumer)
            except Exception:
                logger.exception("lifeguard: pausing or resuming the task consumer failed")

        consumer.call_soon(call)

    def on_worker_stop(self, worker: WorkerInfo) -> None:
        self._stop.set()

    # --- figures ----------------------------------------------------------------------

    def stats(self) -> dict[str, Any] | None:
        state = self.state
        if state is None:
            return None
        figures: dict[str, Any] = {
            "paused": bool(state.get("paused")),
            "pauses": int(state.get("pauses")),
            "unavailable_failures": int(state.get("unavailable")),
            "slots_refusals": int(state.get("slots_refusals")),
            "slots_scarce": self.slots_scarce(),
            "handed_back": int(state.get("handed_back")),
            "hand_backs_exhausted": int(state.get("gave_up")),
            "tasks_wrapped": self._wrapped,
        }
        if self.last_pause is not None:
            figures["last_pause"] = self.last_pause
        return figures

    def metric_samples(self) -> list[Any]:
        """The worker-wide figures of the shared state, reported by every process that
        writes metrics (the same values: ``livemax`` keeps one)."""
        from .metrics import Sample

        state = self.state
        if state is None:
            return []
        figures = (
            ("database_paused", state.get("paused"), "1 while the worker has paused consuming"),
            ("database_pauses", state.get("pauses"), "Pauses of consuming during outages"),
            ("database_slots_refusals", state.get("slots_refusals"), "Connects refused: no slot"),
            ("database_unavailable_failures", state.get("unavailable"), "Connects failed"),
        )
        return [Sample(name, value, mode="livemax", help=text) for name, value, text in figures]
