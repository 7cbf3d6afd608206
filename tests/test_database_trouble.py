"""Database trouble loses no task: restart, outage, exhausted slots, bad credentials.

Each scenario runs a stream of real tasks through real prefork/threads workers against a
PostgreSQL this module starts itself (it is stopped and restarted under the stream), and
counts in the database what ran: every task inserts a row keyed by a unique value, so a
lost task is a missing row and a duplicated one a second row. Stock Celery meets the same
fault in the same test, so each scenario is known to bite.
"""

from __future__ import annotations

import contextlib
import json
import re
import shutil
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from lifeguard.demo.postgres import EmbeddedPostgres, PostgresServer, free_port
from tests.monitor_support import samples, scrape
from tests.support import Database, SandboxTasks, few_slots_server, scratch_database

TABLE = "lifeguard_sandbox_items"


@pytest.fixture(scope="module")
def own_pg() -> Iterator[EmbeddedPostgres]:
    """A server of this module's own: the tests stop and restart it."""
    embedded = EmbeddedPostgres()
    embedded.start()
    try:
        yield embedded
    finally:
        embedded.destroy()


def ensure_running(embedded: EmbeddedPostgres) -> None:
    if not embedded._running:
        embedded.start()


@pytest.fixture
def own_db(own_pg: EmbeddedPostgres) -> Iterator[Database]:
    server = own_pg.server
    assert server is not None
    ensure_running(own_pg)  # a previous test may have left it stopped by failing
    name = f"lg_trouble_{uuid.uuid4().hex[:8]}"
    server.create_database(name)
    db = Database(server, name)
    db.execute(
        f"CREATE TABLE {TABLE} (id serial PRIMARY KEY, value text NOT NULL, "
        "inserted_at timestamptz NOT NULL DEFAULT clock_timestamp())"
    )
    try:
        yield db
    finally:
        ensure_running(own_pg)
        server.drop_database(name)


def stream(
    tasks: SandboxTasks,
    *,
    tag: str,
    count: int,
    rate: float,
    fault_at: float,
    fault: Callable[[], None],
) -> list[Any]:
    """Send ``count`` insert_row tasks at ``rate`` per second; run ``fault`` (in another
    thread) ``fault_at`` seconds in. Returns the AsyncResults once the fault is over."""
    done = threading.Event()

    def at_fault() -> None:
        time.sleep(fault_at)
        try:
            fault()
        finally:
            done.set()

    thread = threading.Thread(target=at_fault)
    thread.start()
    results = send_steadily(tasks, count, rate, "insert_row", tag=tag)
    thread.join()
    assert done.is_set()
    return results


def send_steadily(
    tasks: SandboxTasks, count: int, rate: float, name: str, *args: Any, tag: str = ""
) -> list[Any]:
    """Send ``count`` tasks at ``rate`` per second; their AsyncResults. With ``tag``,
    task i gets the one argument ``f"{tag}-{i}"`` (the unique value insert_row writes)."""
    results = []
    start = time.monotonic()
    for i in range(count):
        delay = start + i / rate - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        results.append(tasks.send(name, *((f"{tag}-{i}",) if tag else args)))
    return results


def final_states(results: list[Any], timeout: float = 120) -> dict[str, int]:
    """How many tasks ended in each state."""
    deadline = time.monotonic() + timeout
    counts: dict[str, int] = {}
    for result in results:
        with contextlib.suppress(Exception):
            result.get(timeout=max(0.1, deadline - time.monotonic()), propagate=False)
        counts[result.state] = counts.get(result.state, 0) + 1
    return counts


def outcome(results: list[Any], db: Database, tag: str, timeout: float = 90) -> dict[str, int]:
    """Failed, lost and duplicated tasks of a stream, read from results and from the rows."""
    deadline = time.monotonic() + timeout
    failed = 0
    for result in results:
        with contextlib.suppress(Exception):  # unfinished: counted as lost if no row came
            result.get(timeout=max(0.1, deadline - time.monotonic()), propagate=False)
        failed += result.state == "FAILURE"
    rows = db.execute(
        f"SELECT value, count(*) FROM {TABLE} WHERE value LIKE %s GROUP BY value", [tag + "-%"]
    )
    counts = {value: n for value, n in rows}
    return {
        "failed": failed,
        "lost": sum(1 for i in range(len(results)) if f"{tag}-{i}" not in counts)
        - failed,  # a failed task's row is missing too: not lost, failed
        "duplicated": sum(n - 1 for n in counts.values() if n > 1),
        "succeeded": sum(1 for r in results if r.state == "SUCCESS"),
    }


@pytest.mark.parametrize("pool", ["prefork", "threads", "gevent"])
def test_restart_under_a_stream_fails_no_task(
    sandbox_worker, tasks: SandboxTasks, own_pg: EmbeddedPostgres, own_db: Database, pool
):
    """``pg_ctl restart -m fast`` at 50 tasks/s: stock Celery fails the tasks that
    connect meanwhile; lifeguard hands them back and every one succeeds, once."""
    url = own_db.url

    stock = sandbox_worker(pool=pool, concurrency=2, db_url=url, mode="stock", quiet=True)
    stock_results = stream(
        tasks, tag="stock", count=200, rate=50, fault_at=1.5, fault=own_pg.restart
    )
    stock_outcome = outcome(stock_results, own_db, "stock")
    stock.stop()
    assert stock_outcome["failed"] > 0, stock_outcome  # the fault bites without lifeguard

    worker = sandbox_worker(pool=pool, concurrency=2, db_url=url)
    results = stream(tasks, tag="lg", count=200, rate=50, fault_at=1.5, fault=own_pg.restart)
    got = outcome(results, own_db, "lg")
    assert got == {"failed": 0, "lost": 0, "duplicated": 0, "succeeded": 200}, (got, stock_outcome)
    assert "lifeguard: handed task" in worker.log


def recovery_seconds(db: Database, tag: str, stopped: float, answered: float) -> float:
    """How long after ``answered`` (wall clock) the rows of a stream came in again at
    0.9x the rate of the second before ``stopped``: the start of the first 1-second
    window, in steps of 0.1 s, holding that many rows (``inf`` if none does)."""
    rows = db.execute(
        f"SELECT extract(epoch FROM inserted_at)::float FROM {TABLE} WHERE value LIKE %s",
        [tag + "-%"],
    )
    stamps = sorted(row[0] for row in rows)
    after = [t for t in stamps if t >= answered]
    print(f"first row {after[0] - answered if after else float('inf'):.2f}s after answering")
    before = sum(1 for t in stamps if stopped - 1.0 <= t < stopped)
    assert before >= 20, (before, stamps[:5])  # the stream ran at full rate before
    for step in range(100):
        start = answered + step / 10
        if sum(1 for t in stamps if start <= t < start + 1.0) >= 0.9 * before:
            return step / 10
    return float("inf")


@pytest.mark.parametrize("pool", ["prefork", "gevent"])
def test_outage_pauses_consuming_and_resumes(
    sandbox_worker, tasks: SandboxTasks, own_pg: EmbeddedPostgres, own_db: Database, pool
):
    """The server stops for 5 s under a stream: the worker pauses, probes about once a
    second, resumes when the server answers; no task fails or is lost, and within 2 s
    of the server answering tasks complete at least as fast as before the outage."""
    port = free_port()
    options = json.dumps({"metrics_port": port, "metrics_address": "127.0.0.1"})
    worker = sandbox_worker(pool=pool, concurrency=2, db_url=own_db.url, options=options)
    outage = {"start": 0.0, "end": 0.0, "stopped": 0.0, "answered": 0.0}

    def fault() -> None:
        outage["stopped"] = time.time()  # wall clock: compared with the rows' inserted_at
        own_pg.stop()
        outage["start"] = time.monotonic()
        time.sleep(5)
        own_pg.start()  # pg_ctl start -w: returns once the server accepts connections
        outage["end"] = time.monotonic()
        outage["answered"] = time.time()

    results = stream(tasks, tag="out", count=240, rate=30, fault_at=1.5, fault=fault)
    got = outcome(results, own_db, "out")
    assert got == {"failed": 0, "lost": 0, "duplicated": 0, "succeeded": 240}, got
    recovery = recovery_seconds(own_db, "out", outage["stopped"], outage["answered"])
    print(f"{pool}: throughput back to 0.9x after {recovery:.1f}s")
    assert recovery <= 2.0, recovery

    log = worker.log
    assert "lifeguard: paused consuming tasks" in log
    assert "lifeguard: resumed consuming tasks" in log
    paused, resumed = log.index("paused consuming tasks"), log.index("resumed consuming tasks")
    assert paused < resumed
    # About 150 tasks were sent while it was paused: it took (almost) none of them.
    assert log[paused:resumed].count("] received") <= 5, log[paused:resumed][-3000:]
    probes = re.findall(r"lifeguard: probe (\d+) of", log)
    # The pause lasts at most the outage plus a probe interval: about one probe a second.
    assert 0 < len(probes) <= (outage["end"] - outage["start"]) + 3, probes
    stats = tasks.run("guard_stats")["database_trouble"]
    assert stats["pauses"] >= 1 and stats["paused"] is False, stats
    assert stats["handed_back"] > 0, stats
    assert {r.result["retries"] for r in results} == {0}  # hand-backs are not retries
    families = scrape(port)
    assert max(samples(families, "lifeguard_database_pauses").values()) >= 1
    assert max(samples(families, "lifeguard_database_paused").values()) == 0
    handed = samples(families, "lifeguard_tasks_handed_back_total")
    assert sum(handed.values()) > 0, handed


def test_exhausted_slots_fail_no_task(
    sandbox_worker, tasks: SandboxTasks, test_db: Database, prefix
):
    """The role may hold 2 connections, the worker has 4 processes: processes give idle
    connections back while slots are scarce, refused tasks are handed back."""
    role = f"{prefix}_slots"
    test_db.server.ensure_role(role, "slots-pw")
    test_db.admin(f'ALTER ROLE "{role}" CONNECTION LIMIT 2')
    url = test_db.server.url(test_db.name, user=role, password="slots-pw")
    worker = sandbox_worker(pool="prefork", concurrency=4, db_url=url, quiet=True)
    # One query, then 50 ms more: all four processes are needed.
    states = final_states(send_steadily(tasks, 300, 80, "hold", 0.05))
    assert states == {"SUCCESS": 300}, states
    log = worker.log
    assert "lifeguard: slots exhausted" in log
    line = next(line for line in log.splitlines() if "lifeguard: slots exhausted" in line)
    assert "prefork -c 4" in line and "CONNECTION LIMIT 2" in line, line


def test_authentication_failure_is_never_handed_back(
    sandbox_worker, tasks: SandboxTasks, test_db: Database, prefix
):
    """A role that does not exist: retrying cannot help, the task fails with the error."""
    url = test_db.server.url(test_db.name, user=f"{prefix}_nobody", password="x")
    worker = sandbox_worker(pool="prefork", concurrency=1, db_url=url)
    state, error = tasks.outcome("one_query")
    assert state == "FAILURE"
    assert "does not exist" in str(error) or "authentication" in str(error), error
    assert "lifeguard: handed task" not in worker.log
    assert "retry:" not in worker.log


def test_hand_back_off_lets_the_task_fail(
    sandbox_worker, tasks: SandboxTasks, own_pg: EmbeddedPostgres, own_db: Database
):
    """``hand_back_unreachable=False``: a task meeting a stopped server fails as stock."""
    sandbox_worker(
        pool="solo", concurrency=1, db_url=own_db.url, options='{"hand_back_unreachable": false}'
    )
    own_pg.stop()
    try:
        state, _ = tasks.outcome("insert_row", "off-0", timeout=30)
    finally:
        ensure_running(own_pg)
    assert state == "FAILURE"


def test_sqlalchemy_tasks_meeting_a_stopped_server_are_handed_back(
    sqla_worker, sqla_tasks: SandboxTasks, own_pg: EmbeddedPostgres, own_db: Database
):
    """Sync (psycopg) and async (asyncpg) engines: a checkout that fails while the server
    is down hands the task back; once it is up, each task runs once."""
    worker = sqla_worker(pool="prefork", concurrency=2, db_url=own_db.url)
    own_pg.stop()
    try:
        writes = [sqla_tasks.send("write", f"sqla-{i}") for i in range(8)]
        reads = [sqla_tasks.send("async_touch") for _ in range(4)]
        time.sleep(3)
    finally:
        ensure_running(own_pg)
    for result in [*writes, *reads]:
        result.get(timeout=60, propagate=False)
    assert [r.state for r in writes + reads] == ["SUCCESS"] * 12, [
        str(r.result)[:300] for r in reads
    ] or [(r.state, r.result) for r in writes + reads]
    rows = own_db.execute(f"SELECT value, count(*) FROM {TABLE} GROUP BY value")
    assert dict(rows) == {f"sqla-{i}": 1 for i in range(8)}
    assert "lifeguard: handed task tests.harness.sqla_app.write" in worker.log
    assert "lifeguard: handed task tests.harness.sqla_app.async_touch" in worker.log


def test_hand_backs_are_bounded(
    sandbox_worker, tasks: SandboxTasks, own_pg: EmbeddedPostgres, own_db: Database
):
    """After ``hand_back_limit`` hand-backs the task fails with the real error, and
    its own ``retries`` were never consumed."""
    worker = sandbox_worker(
        pool="solo", concurrency=1, db_url=own_db.url, options='{"hand_back_limit": 2}'
    )
    own_pg.stop()
    try:
        result = tasks.send("insert_row", "bounded-0")
        result.get(timeout=30, propagate=False)
    finally:
        ensure_running(own_pg)
    assert result.state == "FAILURE"
    assert "OperationalError" in type(result.result).__name__, result.result
    assert worker.log.count("lifeguard: handed task") == 2
    assert "failed after 2 hand-backs (hand_back_limit)" in worker.log


def read_only_for(server: PostgresServer, seconds: float) -> None:
    """A failover, as the clients see it: every session is cut, and the server that
    answers next takes no writes (25006) for ``seconds``; then it is writable again."""
    with server.admin() as conn:
        conn.execute("ALTER SYSTEM SET default_transaction_read_only = on")
        conn.execute("SELECT pg_reload_conf()")
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE backend_type = 'client backend' AND pid <> pg_backend_pid()"
        )
    try:
        time.sleep(seconds)
    finally:
        with server.admin() as conn:
            conn.execute("SET default_transaction_read_only = off")
            conn.execute("ALTER SYSTEM RESET default_transaction_read_only")
            conn.execute("SELECT pg_reload_conf()")


class HotStandby:
    """A hot standby of an embedded server (``pg_basebackup -R``, streaming), and a real
    failover to it: the primary stops, the standby restarts on the primary's address
    (a hot standby there: sessions are read-only), and is promoted a while later."""

    def __init__(self, primary: EmbeddedPostgres) -> None:
        self.primary = primary
        self.data = primary.root / "standby"
        self.running = False

    def _pg_ctl(self, *args: str) -> None:
        self.primary._cmd(str(self.primary.bin / "pg_ctl"), "-D", str(self.data), "-w", *args)

    def start(self) -> None:
        hba = self.primary.data / "pg_hba.conf"
        if "local replication all trust" not in hba.read_text():
            with hba.open("a") as f:
                f.write("local replication all trust\n")
            assert self.primary.server is not None
            with self.primary.server.admin() as conn:
                conn.execute("SELECT pg_reload_conf()")
        shutil.rmtree(self.data, ignore_errors=True)
        self.primary._cmd(
            str(self.primary.bin / "pg_basebackup"),
            *("-D", str(self.data), "-h", str(self.primary.root), "-p", str(self.primary.port)),
            *("-U", "postgres", "-R", "-c", "fast", "-X", "stream", "--no-sync"),
        )
        log = str(self.primary.root / "standby.log")
        self._pg_ctl("-l", log, "-o", f"-p {free_port()}", "start")
        self.running = True

    def take_over(self, read_only_for: float) -> None:
        self.primary.stop()  # fast: every session cut, all WAL sent to the standby first
        self._pg_ctl("-m", "fast", "stop")
        auto = self.data / "postgresql.auto.conf"  # no primary to follow any more
        lines = auto.read_text().splitlines(keepends=True)
        auto.write_text("".join(line for line in lines if not line.startswith("primary_")))
        # The copied postgresql.conf has the primary's port: the standby answers there.
        self._pg_ctl("-l", str(self.primary.root / "standby.log"), "start")
        time.sleep(read_only_for)
        self._pg_ctl("promote")

    def fail_back(self) -> None:
        if self.running:
            self._pg_ctl("-m", "fast", "stop")
            self.running = False
        ensure_running(self.primary)
        shutil.rmtree(self.data, ignore_errors=True)


@contextlib.contextmanager
def read_only_switch(kind: str, embedded: EmbeddedPostgres) -> Iterator[Callable[[], None]]:
    """The fault of a read-only switch of 3 s: ``setting`` (default_transaction_read_only
    on the same server) or ``standby`` (a real failover to a hot standby, promoted)."""
    server = embedded.server
    assert server is not None
    if kind == "setting":
        yield lambda: read_only_for(server, 3)
        return
    standby = HotStandby(embedded)
    standby.start()
    try:
        yield lambda: standby.take_over(read_only_for=3)
    finally:
        standby.fail_back()


@pytest.mark.parametrize("kind", ["setting", "standby"])
def test_read_only_switch_fails_no_task(
    sandbox_worker, tasks: SandboxTasks, own_pg: EmbeddedPostgres, own_db: Database, kind
):
    """The server goes read-only for 3 s under a stream of one-INSERT tasks, then takes
    writes again: stock Celery fails the writes refused; lifeguard hands them back (the
    refused INSERT was the run's first statement: nothing committed), pauses, probes
    until the server takes writes, and every task succeeds once."""

    def run(mode: str, tag: str) -> tuple[Any, dict[str, int]]:
        worker = sandbox_worker(pool="prefork", concurrency=2, db_url=own_db.url, mode=mode)
        with read_only_switch(kind, own_pg) as fault:
            results = stream(tasks, tag=tag, count=200, rate=50, fault_at=1.0, fault=fault)
            got = outcome(results, own_db, tag)  # read where the rows are: the new primary
            worker.stop()
        return worker, got

    stock, stock_outcome = run("stock", "stock")
    assert stock_outcome["failed"] > 0, stock_outcome
    assert "read-only transaction" in stock.log
    worker, got = run("lifeguard", "lg")
    print(f"read-only switch ({kind}): stock {stock_outcome}, lifeguard {got}")
    assert got == {"failed": 0, "lost": 0, "duplicated": 0, "succeeded": 200}, (got, stock_outcome)
    log = worker.log
    assert "lifeguard: handed task" in log
    assert "in a read-only transaction" in log  # the hand-backs name the refusal
    assert "paused consuming tasks" in log and "resumed consuming tasks" in log
    paused_read_only = "read-only (writes refused" in log  # the pause's reason
    probed_read_only = "the server is read-only (transaction_read_only = on)" in log
    if kind == "setting":  # read-only from the first failure on
        assert paused_read_only and probed_read_only, log[-3000:]
    else:  # refused connects first (the primary gone): the pause may start as an outage
        assert paused_read_only or probed_read_only, log[-3000:]


FEW_SLOTS = 10
SUPERUSER_RESERVED = 3


@pytest.fixture(scope="module")
def few_slots_pg() -> Iterator[PostgresServer]:
    """max_connections 10, 3 of them reserved for superusers: 7 for the app's role."""
    with few_slots_server(FEW_SLOTS, SUPERUSER_RESERVED) as server:
        yield server


def test_twelve_processes_on_seven_slots_fail_no_task(
    sandbox_worker, tasks: SandboxTasks, few_slots_pg: PostgresServer, prefix
):
    """prefork -c 12 against the 7 slots an ordinary role may use: stock Celery fails
    tasks refused a slot; lifeguard lets slots circulate, hands refused tasks back, and
    says what is wrong with the server's numbers."""
    few_slots_pg.ensure_role("app", "app-pw")
    with scratch_database(few_slots_pg, "slots") as db:
        url = few_slots_pg.url(db.name, user="app", password="app-pw")
        # One query, then 0.2 s more: at 60/s about twelve tasks run at any moment.
        stock = sandbox_worker(pool="prefork", concurrency=12, db_url=url, mode="stock", quiet=True)
        stock_states = final_states(send_steadily(tasks, 250, 60, "hold", 0.2))
        stock.stop()
        assert stock_states.get("FAILURE", 0) > 0, stock_states

        worker = sandbox_worker(pool="prefork", concurrency=12, db_url=url, quiet=True)
        states = final_states(send_steadily(tasks, 250, 60, "hold", 0.2))
        worker.stop()
    print(f"-c 12 on 7 slots: stock {stock_states}, lifeguard {states}")
    assert states == {"SUCCESS": 250}, (states, stock_states)
    line = next(line for line in worker.log.splitlines() if "lifeguard: slots exhausted" in line)
    assert "remaining connection slots are reserved" in line, line
    assert "prefork -c 12" in line and "max_connections=10" in line, line
    assert "7 usable by other roles" in line, line
