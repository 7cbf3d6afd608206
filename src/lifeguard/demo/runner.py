"""The scenarios of ``lifeguard demo``: stock Celery and lifeguard side by side.

Every scenario starts real ``celery worker`` processes of the sandbox Django project
against a real PostgreSQL and Redis, and reads its answer from the database itself
(``pg_stat_database``, ``pg_stat_activity``) or from the operating system (RSS from
``/proc``), never from lifeguard's own counters.
"""

from __future__ import annotations

import contextlib
import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ..errors import LifeguardError
from ..postgres.conninfo import is_uri, redact_url
from ..procfs import process_rss
from .postgres import EmbeddedPostgres, PostgresServer, server_from_url
from .project import TASKS, sandbox_worker
from .redis import EmbeddedRedis
from .worker import CeleryWorker

Progress = Callable[[str], None]
MIB = 1024 * 1024
ANSWER_TIMEOUT = 5  # seconds for a given server to answer before the demo starts


class ServiceUnavailable(LifeguardError):
    """A server given to the demo is malformed or does not answer: nothing was started."""


def _first_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def check_database(url: str, timeout: float = ANSWER_TIMEOUT) -> PostgresServer:
    """The server of a ``--database-url`` once it answered ``SELECT 1`` as its user;
    raises :class:`ServiceUnavailable` with a one-line reason (password masked)."""
    shown = redact_url(url)
    if not is_uri(url):
        raise ServiceUnavailable(
            f"--database-url {shown} is not a PostgreSQL URL: give "
            "postgresql://user:password@host:port/database (a superuser)"
        )
    try:
        server = server_from_url(url)
    except ValueError as exc:  # ConninfoError: libpq's reading; names no value of the URL
        raise ServiceUnavailable(f"--database-url {shown}: {exc}") from None
    try:
        import psycopg

        with psycopg.connect(
            **server.connect_kwargs("postgres"), connect_timeout=int(timeout), autocommit=True
        ) as conn:
            conn.execute("SELECT 1")
    except Exception as exc:
        raise ServiceUnavailable(
            f"cannot connect to {shown} (from --database-url): {_first_line(exc)}"
        ) from None
    return server


def check_broker(url: str, timeout: float = ANSWER_TIMEOUT) -> str:
    """A ``--broker-url`` once the broker answered; raises :class:`ServiceUnavailable`."""
    url = url.rstrip("/")
    shown = redact_url(url)
    if urlsplit(url).scheme not in ("redis", "rediss"):
        raise ServiceUnavailable(
            f"--broker-url {shown} is not a Redis URL: give redis://host:port (the demo's "
            "workers use it as broker and result backend)"
        )
    from kombu.connection import Connection

    try:
        with Connection(url, connect_timeout=timeout) as connection:  # type: ignore[no-untyped-call]
            connection.ensure_connection(max_retries=1, timeout=timeout)
    except Exception as exc:
        raise ServiceUnavailable(
            f"cannot connect to {shown} (from --broker-url): {_first_line(exc)}"
        ) from None
    return url


@dataclass
class Row:
    """One line of the demo's table."""

    scenario: str
    stock: str
    lifeguard: str
    ok: bool = True


@dataclass
class Services:
    """The PostgreSQL and Redis a demo uses; embedded ones are stopped by ``close``."""

    server: PostgresServer
    broker: str
    admin_url_given: bool
    owned: list[Any] = field(default_factory=list)

    @classmethod
    def start(cls, database_url: str | None = None, broker_url: str | None = None) -> Services:
        """The servers given, else embedded ones: a PostgreSQL configured like production
        (scram-sha-256 password authentication, TLS when the binaries have it) and a Redis."""
        # The servers given must answer before anything is started: nothing left behind.
        server = check_database(database_url) if database_url else None
        broker = check_broker(broker_url) if broker_url else None
        owned: list[Any] = []
        if server is None:
            postgres = EmbeddedPostgres(tls=None, password=uuid.uuid4().hex)
            try:
                server = postgres.start()
            except Exception as exc:
                with contextlib.suppress(Exception):
                    postgres.destroy()
                raise ServiceUnavailable(
                    f"cannot start an embedded PostgreSQL: {_first_line(exc)} "
                    "(or give --database-url)"
                ) from None
            owned.append(postgres)
        if broker is None:
            try:
                redis = EmbeddedRedis()
            except RuntimeError as exc:
                cls(server, "", admin_url_given=bool(database_url), owned=owned).close()
                raise ServiceUnavailable(str(exc)) from None
            owned.append(redis)
            broker = f"{redis.url}/0"
        return cls(server, broker, admin_url_given=bool(database_url), owned=owned)

    def close(self) -> None:
        for owned in self.owned:
            with contextlib.suppress(Exception):
                if isinstance(owned, EmbeddedPostgres):
                    owned.destroy()
                else:
                    owned.stop()


class _Client:
    """Sends the sandbox's tasks to one worker's queue."""

    def __init__(self, app: Any, worker: CeleryWorker) -> None:
        self.app = app
        self.worker = worker

    def send(self, name: str, *args: Any, **options: Any) -> Any:
        return self.app.send_task(f"{TASKS}.{name}", args=args, queue=self.worker.queue, **options)

    def rate(self, name: str, n: int, *args: Any) -> float:
        """Run n tasks; tasks per second."""
        from celery.result import ResultSet

        started = time.perf_counter()
        ResultSet([self.send(name, *args) for _ in range(n)]).join_native(timeout=300)
        return n / (time.perf_counter() - started)

    def states(self, name: str, n: int, *args: Any) -> list[str]:
        results = [self.send(name, *args) for _ in range(n)]
        for result in results:
            result.get(timeout=60, propagate=False)
        return [result.state for result in results]


class Demo:
    """One demo run: its own database on the services, and the rows it found."""

    PREFIX = "lifeguard"

    def __init__(self, services: Services) -> None:
        self.services = services
        self.database = f"lifeguard_demo_{uuid.uuid4().hex[:6]}"
        self.rows: list[Row] = []
        self.activity: list[tuple[Any, ...]] = []

    @property
    def server(self) -> PostgresServer:
        return self.services.server

    def create(self) -> None:
        server = self.server
        server.create_database(self.database)
        with server.admin(self.database) as conn:
            conn.execute(
                "CREATE TABLE lifeguard_sandbox_items (id serial PRIMARY KEY, value text NOT NULL)"
            )
        if not self.services.admin_url_given:
            # Workers log in as an ordinary role with a password, as in production.
            server.ensure_role("demo", "demo-password")
            with server.admin(self.database) as conn:
                conn.execute("GRANT ALL ON SCHEMA public TO demo")
                conn.execute("GRANT ALL ON ALL TABLES IN SCHEMA public TO demo")
                conn.execute("GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO demo")

    def drop(self) -> None:
        with contextlib.suppress(Exception):
            self.server.drop_database(self.database)

    @property
    def db_url(self) -> str:
        if self.services.admin_url_given:
            return self.server.url(self.database)
        return self.server.url(self.database, user="demo", password="demo-password")

    @contextlib.contextmanager
    def worker(self, mode: str, concurrency: int = 2, **knobs: Any) -> Iterator[_Client]:
        from celery import Celery

        worker = sandbox_worker(
            db_url=self.db_url,
            broker_url=self.services.broker,
            queue=f"demo-{uuid.uuid4().hex[:8]}",
            mode=mode,
            prefix=self.PREFIX,
            concurrency=concurrency,
            quiet=True,
            **knobs,
        )
        app = Celery("demo", broker=self.services.broker, backend=self.services.broker)
        try:
            worker.start()
            yield _Client(app, worker)
        finally:
            worker.stop()
            app.close()
            worker.log_path.unlink(missing_ok=True)  # nothing left behind in /tmp

    @property
    def can_restart(self) -> bool:
        """The server is the demo's own: it may be restarted mid-run."""
        return any(isinstance(owned, EmbeddedPostgres) for owned in self.services.owned)

    def restart_server(self) -> None:
        for owned in self.services.owned:
            if isinstance(owned, EmbeddedPostgres):
                owned.restart()

    def sessions(self) -> int:
        return self.server.session_count(self.database)

    def backends(self) -> list[tuple[Any, ...]]:
        with self.server.admin() as conn:
            return list(
                conn.execute(
                    "SELECT pid, application_name, state, left(query, 40) FROM pg_stat_activity "
                    "WHERE datname = %s AND application_name LIKE %s ORDER BY pid",
                    [self.database, self.PREFIX + ":%"],
                ).fetchall()
            )

    # --- the scenarios ------------------------------------------------------------------

    def run(self, tasks: int, progress: Progress) -> list[Row]:
        self.throughput(tasks, progress)
        self.soft_time_limit(progress)
        self.open_transaction(progress)
        self.memory_leak(progress)
        self.attribution(progress)
        return self.rows

    def throughput(self, n: int, progress: Progress) -> None:
        figures = {}
        for mode in ("stock", "lifeguard"):
            progress(f"{n} one-query tasks, {mode}")
            before = self.sessions()
            with self.worker(mode) as client:
                client.rate("one_query", 10)
                rate = client.rate("one_query", n)
            time.sleep(0.3)  # the sessions' statistics are flushed when they end
            figures[mode] = (rate, self.sessions() - before)
        (s_rate, s_new), (l_rate, l_new) = figures["stock"], figures["lifeguard"]
        self.rows.append(
            Row(
                f"{n} one-query tasks, prefork -c 2",
                f"{s_rate:.0f} tasks/s, {s_new} new sessions",
                f"{l_rate:.0f} tasks/s, {l_new} new sessions ({l_rate / s_rate:.1f}x)",
                ok=l_new <= 2,
            )
        )

    def soft_time_limit(self, progress: Progress) -> None:
        outcome = {}
        for mode in ("reuse_max", "lifeguard"):
            progress(f"soft time limit mid-query, {mode}")
            with self.worker(mode, concurrency=1) as client:
                client.states("touch", 1)
                client.send("sleep_query", 3, soft_time_limit=1).get(timeout=30, propagate=False)
                states = client.states("touch", 3)
                running = [row for row in self.backends() if row[2] == "active"]
            outcome[mode] = (states.count("SUCCESS"), len(running))
        (s_ok, s_running), (l_ok, l_running) = outcome["reuse_max"], outcome["lifeguard"]
        self.rows.append(
            Row(
                "soft time limit mid-query, then 3 tasks",
                f"{3 - s_ok} of 3 later tasks failed; the query ran on: {s_running}",
                f"{l_ok} of 3 succeeded; the query was cancelled on the server",
                ok=l_ok == 3 and l_running == 0,
            )
        )

    def open_transaction(self, progress: Progress) -> None:
        found = {}
        for mode in ("reuse_max", "lifeguard"):
            progress(f"a task leaves a transaction open, {mode}")
            with self.worker(mode, concurrency=1) as client:
                client.send("leave_transaction_open", "demo").get(timeout=30)
                time.sleep(0.2)
                found[mode] = [r for r in self.backends() if str(r[2]).startswith("idle in")]
        self.rows.append(
            Row(
                "a task leaves a transaction open",
                f"{len(found['reuse_max'])} backend idle in transaction, holding its locks",
                "rolled back at task end: 0 idle in transaction",
                ok=not found["lifeguard"],
            )
        )

    def memory_leak(self, progress: Progress, leaks: int = 24, mib: float = 2.0) -> None:
        """A task that keeps 2 MiB per run: stock grows, lifeguard recycles and names it."""
        grown = {}
        limit = "16MiB"
        for mode in ("stock", "lifeguard"):
            progress(f"a task that leaks {mib:g} MiB per run, {mode}")
            options = json.dumps({"memory_growth_limit": limit} if mode == "lifeguard" else {})
            with self.worker(mode, concurrency=1, options=options) as client:
                client.states("touch", 1)
                births = {pid: _rss(pid) for pid in client.worker.children()}
                client.states("leak", leaks, mib)
                time.sleep(0.5)
                now = {pid: _rss(pid) for pid in client.worker.children()}
                log = client.worker.log
            recycles = log.count("lifeguard: recycling process")
            growth = sum(rss - births.get(pid, rss) for pid, rss in now.items())
            # The last recycle: that child ran nothing but the leaking task.
            named = (re.findall(r"Grew most: (\S+) \+[\d.]+ MiB \((\d+)%\)", log) or [None])[-1]
            grown[mode] = (growth, recycles, named)
        (s_growth, _, _), (_, l_recycles, l_named) = grown["stock"], grown["lifeguard"]
        who = f"{l_named[0].rsplit('.', 1)[-1]} ({l_named[1]}%)" if l_named else "?"
        self.rows.append(
            Row(
                f"a task keeps {mib:g} MiB per run, {leaks} runs",
                f"child RSS +{s_growth / MIB:.0f} MiB, nothing says which task",
                f"child recycled {l_recycles}x between tasks (memory_growth_limit {limit}); "
                f"grew most: {who}",
                ok=l_recycles >= 1 and l_named is not None,
            )
        )

    def attribution(self, progress: Progress) -> None:
        progress("who holds the backends?")
        with self.worker("lifeguard") as client:
            client.rate("touch", 10)
            self.activity = self.backends()
            children = client.worker.children()
        self.rows.append(
            Row(
                "pg_stat_activity: which worker holds a backend?",
                "no per-process name: a backend can't be traced to a worker",
                f"{len(self.activity)} backends named lifeguard:<host>:<pid> (children "
                f"{', '.join(map(str, children))})",
                ok=bool(self.activity),
            )
        )


def _rss(pid: int) -> int:
    return process_rss(pid) or 0
