"""``lifeguard demo``: stock Celery against lifeguard, on real servers, in about a minute.

Every scenario starts real ``celery worker`` processes (the sandbox Django project) against
a real PostgreSQL and Redis, and reads the answers from the database itself
(``pg_stat_database``, ``pg_stat_activity``), not from lifeguard.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import click

from ..redact import redact_url
from ..sandbox.django_project import TASKS


@dataclass
class Row:
    scenario: str
    stock: str
    lifeguard: str
    verdict: bool = True


@dataclass
class DemoRun:
    """The servers and database one demo run uses, and its results."""

    server: Any
    database: str
    broker: str
    rows: list[Row] = field(default_factory=list)

    @property
    def db_url(self) -> str:
        return str(self.server.url(self.database))

    @contextlib.contextmanager
    def worker(self, mode: str, concurrency: int = 2, **env: str) -> Iterator[Any]:
        from celery import Celery

        from ..sandbox.django_project import sandbox_worker

        queue = f"demo-{uuid.uuid4().hex[:8]}"
        worker = sandbox_worker(
            db_url=self.db_url,
            broker_url=self.broker,
            queue=queue,
            mode=mode,
            concurrency=concurrency,
            quiet=True,
            env=env,
        )
        client = Celery("demo", broker=self.broker, backend=self.broker)
        worker.start()
        try:
            yield _Client(client, queue, worker)
        finally:
            worker.stop()
            client.close()

    def sessions(self) -> int:
        return int(self.server.session_count(self.database))

    def activity(self) -> list[tuple[Any, ...]]:
        with self.server.admin() as conn:
            return list(
                conn.execute(
                    "SELECT pid, application_name, state, left(query, 40) FROM pg_stat_activity "
                    "WHERE datname = %s AND application_name LIKE 'lifeguard:%%' ORDER BY pid",
                    [self.database],
                ).fetchall()
            )


@dataclass
class _Client:
    app: Any
    queue: str
    worker: Any

    def send(self, name: str, *args: Any, **options: Any) -> Any:
        return self.app.send_task(f"{TASKS}.{name}", args=args, queue=self.queue, **options)

    def many(self, name: str, n: int) -> float:
        """Run n tasks; tasks per second."""
        from celery.result import ResultSet

        started = time.perf_counter()
        ResultSet([self.send(name) for _ in range(n)]).join_native(timeout=300)
        return n / (time.perf_counter() - started)

    def states(self, name: str, n: int, *args: Any) -> list[str]:
        results = [self.send(name, *args) for _ in range(n)]
        for result in results:
            result.get(timeout=60, propagate=False)
        return [result.state for result in results]


def _throughput(run: DemoRun, n: int, progress: Any) -> None:
    figures = {}
    for mode in ("stock", "lifeguard"):
        progress(f"{n} one-query tasks, {mode}")
        before = run.sessions()
        with run.worker(mode) as client:
            client.many("one_query", 10)
            rate = client.many("one_query", n)
        time.sleep(0.3)
        figures[mode] = (rate, run.sessions() - before)
    (s_rate, s_new), (l_rate, l_new) = figures["stock"], figures["lifeguard"]
    run.rows.append(
        Row(
            f"{n} one-query tasks, prefork -c 2",
            f"{s_rate:.0f} tasks/s, {s_new} new sessions",
            f"{l_rate:.0f} tasks/s, {l_new} new sessions ({l_rate / s_rate:.1f}x)",
            verdict=l_new <= 2,
        )
    )


def _soft_time_limit(run: DemoRun, progress: Any) -> None:
    outcome = {}
    for mode in ("reuse_max", "lifeguard"):
        progress(f"soft time limit mid-query, {mode}")
        with run.worker(mode, concurrency=1) as client:
            client.states("touch", 1)
            client.send("sleep_query", 3, soft_time_limit=1).get(timeout=30, propagate=False)
            states = client.states("touch", 3)
            running = [row for row in run.activity() if row[2] == "active"]
        outcome[mode] = (states.count("SUCCESS"), len(running))
    (s_ok, s_run), (l_ok, l_run) = outcome["reuse_max"], outcome["lifeguard"]
    run.rows.append(
        Row(
            "soft time limit mid-query, then 3 tasks",
            f"{3 - s_ok} of 3 later tasks failed; query still running: {s_run}",
            f"{l_ok} of 3 succeeded; query cancelled on the server",
            verdict=l_ok == 3 and l_run == 0,
        )
    )


def _open_transaction(run: DemoRun, progress: Any) -> None:
    found = {}
    for mode in ("reuse_max", "lifeguard"):
        progress(f"task leaves a transaction open, {mode}")
        with run.worker(mode, concurrency=1) as client:
            client.send("leave_transaction_open", "demo").get(timeout=30)
            time.sleep(0.2)
            found[mode] = [row for row in run.activity() if str(row[2]).startswith("idle in")]
    run.rows.append(
        Row(
            "task leaves a transaction open",
            f"{len(found['reuse_max'])} backend idle in transaction, holding locks",
            "rolled back at task end: 0 idle in transaction",
            verdict=not found["lifeguard"],
        )
    )


def _attribution(run: DemoRun, progress: Any) -> list[tuple[Any, ...]]:
    progress("who holds the backends?")
    with run.worker("lifeguard") as client:
        client.many("touch", 10)
        rows = run.activity()
        children = client.worker.children()
    run.rows.append(
        Row(
            "pg_stat_activity: which worker holds a backend?",
            "no per-process name: a backend can't be traced to a worker",
            f"{len(rows)} backends named lifeguard:<host>:<pid> (children {children})",
            verdict=bool(rows),
        )
    )
    return rows


@click.command()
@click.option("--tasks", default=300, show_default=True, help="Tasks in the throughput run.")
def demo(tasks: int) -> None:
    """Show the problems lifeguard fixes, side by side with stock Celery.

    Uses the local PostgreSQL and Redis when they answer (or LIFEGUARD_TEST_DATABASE_URL /
    LIFEGUARD_TEST_BROKER_URL), embedded ones otherwise; works in a database of its own,
    dropped at the end.
    """
    from rich.console import Console
    from rich.table import Table

    try:
        from ..sandbox.postgres import find_postgres
        from ..sandbox.redis import find_redis
    except ImportError as exc:  # pragma: no cover - depends on the installed extras
        raise click.ClickException(
            f"the demo needs the 'demo' extra: pip install 'celery-lifeguard[demo]' ({exc})"
        ) from exc

    console = Console()
    with console.status("finding PostgreSQL and Redis (starting embedded ones if needed)"):
        server = find_postgres()
        broker = f"{find_redis()}/12"
    database = f"lifeguard_demo_{uuid.uuid4().hex[:6]}"
    console.print(f"PostgreSQL: {redact_url(server.url(database))}")
    console.print(f"Redis:      {redact_url(broker)}")
    server.create_database(database)
    run = DemoRun(server=server, database=database, broker=broker)
    try:
        with server.admin(database) as conn:
            conn.execute(
                "CREATE TABLE lifeguard_sandbox_items (id serial PRIMARY KEY, value text NOT NULL)"
            )
        with console.status("") as status:

            def progress(text: str) -> None:
                status.update(f"running: {text}")

            _throughput(run, tasks, progress)
            _soft_time_limit(run, progress)
            _open_transaction(run, progress)
            rows = _attribution(run, progress)
    finally:
        server.drop_database(database)

    table = Table(title="stock Celery vs lifeguard (real workers, numbers from PostgreSQL)")
    table.add_column("scenario")
    table.add_column("stock Celery")
    table.add_column("with lifeguard.install(app)")
    table.add_column("")
    for row in run.rows:
        table.add_row(row.scenario, row.stock, row.lifeguard, "ok" if row.verdict else "FAILED")
    console.print(table)
    activity = Table(title="pg_stat_activity while a lifeguard worker ran")
    for column in ("backend pid", "application_name", "state", "query"):
        activity.add_column(column)
    for pid, name, state, query in rows:
        activity.add_row(str(pid), name, str(state), str(query))
    console.print(activity)
    console.print(
        "stock: Celery's Django fixup closes connections around every task; the soft time "
        "limit and open-transaction rows use CELERY_DB_REUSE_MAX, the reuse knob Celery offers."
    )
    if not all(row.verdict for row in run.rows):
        raise SystemExit(1)
