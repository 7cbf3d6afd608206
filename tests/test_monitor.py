"""The database side: what ``lifeguard check`` and ``lifeguard monitor`` see, judge and do.

Every scenario works on real sessions of a real PostgreSQL, named the way lifeguard's
workers name theirs (``<prefix>:<host>:<pid>``), left idle, active, idle in
transaction or aborted; the thresholds are set low so each status is reached on purpose.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from typing import Any

import pytest
from click.testing import CliRunner

from lifeguard.cli import main
from lifeguard.demo.postgres import EmbeddedPostgres, PostgresServer, free_port
from lifeguard.monitor.report import Monitor
from lifeguard.monitor.snapshot import QUERY_CHARS
from lifeguard.monitor.target import connect, from_url, time_limited
from lifeguard.monitor.thresholds import Thresholds
from tests.monitor_support import (
    ABORTED,
    ACTIVE,
    HOST,
    IDLE,
    IDLE_IN_TRANSACTION,
    Sessions,
    backend_pids,
    lifeguard,
    role,
    samples,
    scrape,
    session_counters,
    start_lifeguard,
    wait_for,
)
from tests.pgbouncer_support import running_pgbouncer
from tests.support import Database, scratch_database

OK, WARNING, CRITICAL, UNKNOWN = 0, 1, 2, 3


@pytest.fixture(scope="module")
def monitor_db(pg: PostgresServer) -> Iterator[Database]:
    """A database of this module's own: only the scenario's sessions are in it."""
    with scratch_database(pg, "m") as db:
        yield db


@pytest.fixture
def sessions(pg: PostgresServer, monitor_db: Database, prefix: str) -> Iterator[Sessions]:
    opened = Sessions(pg, monitor_db.name, prefix)
    yield opened
    pids = {session.pid for session in opened.opened}
    opened.close_all()
    wait_for(lambda: not (backend_pids(monitor_db) & pids), what="sessions to close")


def check(url: str, *args: str) -> Any:
    """``lifeguard check`` in-process, without a state file unless one is given."""
    state = [] if "--state-file" in args else ["--no-state"]
    return CliRunner().invoke(main, ["check", "--database-url", url, *state, *args])


def idle_for(db: Database, pids: set[int], seconds: float) -> None:
    """Wait until each backend has been in its state longer than ``seconds``."""
    query = (
        "SELECT count(*) FROM pg_stat_activity WHERE pid = ANY(%s) "
        "AND now() - state_change > make_interval(secs => %s)"
    )
    wait_for(lambda: db.admin(query, [list(pids), seconds])[0][0] == len(pids))


# --- what a snapshot shows -------------------------------------------------------------


def test_snapshot_shows_every_state_and_the_worker_behind_each_backend(
    sessions: Sessions, monitor_db: Database, prefix: str
):
    idle = sessions.open(IDLE, worker_pid=101)
    active = sessions.open(ACTIVE, worker_pid=102)
    in_transaction = sessions.open(IDLE_IN_TRANSACTION, worker_pid=103)
    aborted = sessions.open(ABORTED, worker_pid=104)
    web = sessions.open(IDLE, application_name="web-frontend")
    monitor = Monitor(from_url(monitor_db.url, "test"), prefix, Thresholds())

    def snapshot_with_sleep_running() -> Any:
        snapshot = monitor.report().snapshot
        states = {b.pid: b.state for b in snapshot.backends}
        return snapshot if states.get(active.pid) == "active" else None

    snapshot = wait_for(snapshot_with_sleep_running)
    monitor.close()
    seen = {backend.pid: backend for backend in snapshot.backends}
    assert seen[idle.pid].state == "idle"
    assert seen[in_transaction.pid].state == "idle in transaction"
    assert seen[aborted.pid].state == "idle in transaction (aborted)"
    assert seen[active.pid].wait_event == "Timeout:PgSleep"
    assert seen[active.pid].query == "SELECT pg_sleep(60)"
    for session, worker_pid in ((idle, 101), (active, 102), (in_transaction, 103)):
        worker = seen[session.pid].worker
        assert worker is not None
        assert (worker.hostname, worker.pid) == (HOST, worker_pid)
    assert seen[web.pid].worker is None  # counted, never attributed
    assert seen[in_transaction.pid].transaction_seconds is not None
    assert seen[idle.pid].transaction_seconds is None
    assert snapshot.by_state(snapshot.worker_backends) == {
        "active": 1,
        "idle": 1,
        "idle in transaction": 1,
        "idle in transaction (aborted)": 1,
    }
    assert snapshot.by_state()["idle"] == 2
    assert snapshot.usable_slots == (
        snapshot.max_connections - snapshot.superuser_reserved - snapshot.reserved
    )
    assert snapshot.counters is not None and snapshot.counters.sessions >= 5


def test_check_json_lists_worker_backends_with_query_cut_short(
    sessions: Sessions, monitor_db: Database, prefix: str
):
    long_query = "SELECT 1 /* " + "x" * 400 + " */"
    session = sessions.open(IDLE, worker_pid=111)
    session.conn.execute(long_query)
    result = check(monitor_db.url, "--prefix", prefix, "--json")
    assert result.exit_code == OK, result.output
    report = json.loads(result.stdout)
    [backend] = report["worker_backends"]
    assert backend["pid"] == session.pid
    assert (backend["host"], backend["worker_pid"], backend["state"]) == (HOST, 111, "idle")
    assert backend["query"] == long_query[:QUERY_CHARS]
    assert report["worker_backends_by_state"] == {"idle": 1}
    assert report["database"]["usable_slots"] > 0
    assert report["status"] == "OK"


# --- thresholds and exit codes ---------------------------------------------------------


def test_idle_connections_warn_then_turn_critical(
    sessions: Sessions, monitor_db: Database, prefix: str
):
    for worker_pid in (201, 202, 203):
        sessions.open(IDLE, worker_pid=worker_pid)
    url = monitor_db.url

    warning = check(url, "--prefix", prefix, "--idle-warning", "2", "--idle-critical", "5")
    assert warning.exit_code == WARNING, warning.output
    first, *details = warning.stdout.splitlines()
    assert first.startswith("LIFEGUARD WARNING - 3 idle connections")
    assert f"worker processes: {HOST}:201, {HOST}:202, {HOST}:203" in details[1]

    critical = check(url, "--prefix", prefix, "--idle-warning", "1", "--idle-critical", "2")
    assert critical.exit_code == CRITICAL
    assert check(url, "--idle-warning", "3", "--idle-critical", "5").exit_code == OK
    # Percentages are of the usable slots: 2.5 connections' worth warns about 3.
    usable = json.loads(check(url, "--json").stdout)["database"]["usable_slots"]
    assert check(url, "--idle-warning", f"{250 / usable}%").exit_code == WARNING
    assert check(url).exit_code == OK  # the guide's 60% / 85%


@pytest.mark.compat
def test_idle_in_transaction_warns_then_turns_critical(
    sessions: Sessions, monitor_db: Database, prefix: str
):
    stuck = sessions.open(IDLE_IN_TRANSACTION, worker_pid=301)
    failed = sessions.open(ABORTED, worker_pid=302)
    sessions.open(IDLE, worker_pid=303)
    idle_for(monitor_db, {stuck.pid, failed.pid}, 1.0)
    url = monitor_db.url

    warning = check(url, "--prefix", prefix, "--idle-in-transaction-warning", "0.5")
    assert warning.exit_code == WARNING, warning.output
    assert "2 backends idle in transaction longer than 0.5s" in warning.stdout
    assert f"backend {stuck.pid} (worker {HOST}:301), idle in transaction " in warning.stdout
    assert f"backend {failed.pid} (worker {HOST}:302), idle in transaction (aborted)" in (
        warning.stdout
    )

    critical = check(
        url, "--prefix", prefix, "--idle-in-transaction-warning", "0.5",
        "--idle-in-transaction-critical", "1",
    )  # fmt: skip
    assert critical.exit_code == CRITICAL
    assert "over the critical limit" in critical.stdout
    assert check(url, "--prefix", prefix).exit_code == OK  # 30 s / 120 s by default


def test_connection_errors_per_minute_from_session_counters(
    sessions: Sessions, monitor_db: Database, prefix: str, tmp_path
):
    url, state = monitor_db.url, str(tmp_path / "check.state")
    limits = ("--prefix", prefix, "--state-file", state, "--errors-warning", "1",
              "--errors-critical", "4")  # fmt: skip
    doomed = [sessions.open(IDLE, worker_pid=400 + n) for n in range(3)]
    assert check(url, *limits).exit_code == OK  # first run: remembers the counters
    killed_before = session_counters(monitor_db)[3]
    monitor_db.admin(
        "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid",
        [[s.pid for s in doomed]],
    )
    wait_for(lambda: session_counters(monitor_db)[3] >= killed_before + 3)

    warning = check(url, *limits)
    assert warning.exit_code == WARNING, warning.output
    assert "3.0 sessions per minute ended abnormally" in warning.stdout
    assert "0 abandoned, 0 fatal, 3 killed" in warning.stdout
    for session in doomed:  # the backends that vanished are named
        assert f"gone: backend {session.pid} ({session.application_name})" in warning.stdout

    assert check(url, *limits).exit_code == OK  # nothing new since the last run

    more = [sessions.open(IDLE, worker_pid=410 + n) for n in range(5)]
    killed_before = session_counters(monitor_db)[3]
    monitor_db.admin(
        "SELECT pg_terminate_backend(pid) FROM unnest(%s::int[]) AS pid", [[s.pid for s in more]]
    )
    wait_for(lambda: session_counters(monitor_db)[3] >= killed_before + 5)
    assert check(url, *limits).exit_code == CRITICAL


def test_killed_client_shows_as_abandoned_session(monitor_db: Database, prefix: str, tmp_path):
    """A worker process SIGKILLed (an OOM kill) with a transaction open: 'abandoned'."""
    url, state = monitor_db.url, str(tmp_path / "check.state")
    name = f"{prefix}:{HOST}:777"
    script = textwrap.dedent(
        f"""
        import sys, time, psycopg
        conn = psycopg.connect({monitor_db.url!r}, application_name={name!r})
        conn.execute("SELECT 1")  # a transaction stays open
        print(conn.info.backend_pid, flush=True)
        time.sleep(60)
        """
    )
    client = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    assert client.stdout is not None
    backend = int(client.stdout.readline())
    assert check(url, "--prefix", prefix, "--state-file", state).exit_code == OK
    abandoned_before = session_counters(monitor_db)[1]
    os.kill(client.pid, signal.SIGKILL)
    client.wait()
    wait_for(lambda: session_counters(monitor_db)[1] > abandoned_before)

    result = check(url, "--prefix", prefix, "--state-file", state, "--errors-warning", "0.5")
    assert result.exit_code == WARNING, result.output
    assert "1 abandoned, 0 fatal, 0 killed" in result.stdout
    assert f"gone: backend {backend} ({name})" in result.stdout


def test_contradictory_thresholds_are_refused(monitor_db: Database):
    result = check(monitor_db.url, "--idle-in-transaction-warning", "200")
    assert result.exit_code == UNKNOWN
    assert "warning threshold (200) is above its critical threshold (120)" in result.stdout
    assert check(monitor_db.url, "--idle-warning", "lots").exit_code == UNKNOWN
    assert check(monitor_db.url, "--no-such-option").exit_code == UNKNOWN  # not click's 2


# --- privileges ------------------------------------------------------------------------


def test_monitor_without_pg_monitor_is_told_which_grant_is_missing(
    sessions: Sessions, monitor_db: Database, pg: PostgresServer, prefix: str
):
    stuck = sessions.open(IDLE_IN_TRANSACTION, worker_pid=501)  # as the superuser
    with role(pg, f"{prefix}_watch") as watcher:
        url = pg.url(monitor_db.name, user=watcher)
        blind = check(url, "--prefix", prefix, "--json")
        assert blind.exit_code == UNKNOWN, blind.output
        report = json.loads(blind.stdout)
        assert report["findings"][0]["check"] == "visibility"
        assert f"GRANT pg_monitor TO {watcher}" in report["findings"][0]["summary"]
        # The application_name is visible to everyone: the worker is still named.
        [backend] = report["worker_backends"]
        assert (backend["pid"], backend["worker_pid"], backend["state"]) == (stuck.pid, 501, None)
        assert "Traceback" not in blind.output

        monitor_db.admin(f'GRANT pg_monitor TO "{watcher}"')
        seeing = check(url, "--prefix", prefix, "--json")
        assert seeing.exit_code == OK, seeing.output
        [backend] = json.loads(seeing.stdout)["worker_backends"]
        assert backend["state"] == "idle in transaction"


def test_terminate_is_a_dry_run_first_and_touches_only_the_prefix(
    sessions: Sessions,
    monitor_db: Database,
    test_db: Database,
    pg: PostgresServer,
    prefix: str,
):
    with (
        role(pg, f"{prefix}_app") as app,
        role(pg, f"{prefix}_ops", "pg_monitor", "pg_signal_backend") as ops,
    ):
        stale = sessions.open(IDLE_IN_TRANSACTION, worker_pid=601, user=app)
        outsider = sessions.open(IDLE_IN_TRANSACTION, application_name="nightly-report", user=app)
        lookalike = sessions.open(
            IDLE_IN_TRANSACTION, application_name=f"{prefix}x:{HOST}:602", user=app
        )
        elsewhere = sessions.open(
            IDLE_IN_TRANSACTION, worker_pid=603, user=app, database=test_db.name
        )
        idle_for(monitor_db, {stale.pid, outsider.pid, lookalike.pid}, 1.5)
        idle_for(test_db, {elsewhere.pid}, 1.5)
        young = sessions.open(IDLE_IN_TRANSACTION, worker_pid=604, user=app)
        url = pg.url(monitor_db.name, user=ops)
        limits = ("--prefix", prefix, "--idle-in-transaction-warning", "0.5",
                  "--idle-in-transaction-critical", "1.5", "--terminate")  # fmt: skip

        dry = check(url, *limits)
        assert dry.exit_code == CRITICAL, dry.output
        assert f"DRY RUN would terminate backend {stale.pid} ({stale.application_name})" in (
            dry.stdout
        )
        assert "dry run: would terminate" in dry.output  # logged too
        everyone = {stale.pid, outsider.pid, lookalike.pid, young.pid}
        assert everyone <= backend_pids(monitor_db)

        done = check(url, *limits, "--no-dry-run")
        assert done.exit_code == CRITICAL, done.output
        assert f"TERMINATED backend {stale.pid}" in done.stdout
        assert "lifeguard monitor: terminated backend" in done.output  # the log line
        wait_for(lambda: stale.pid not in backend_pids(monitor_db))
        assert {outsider.pid, lookalike.pid, young.pid} <= backend_pids(monitor_db)
        assert elsewhere.pid in backend_pids(test_db)
        assert done.stdout.count("TERMINATED") == 1


def test_terminate_without_pg_signal_backend_says_which_grant(
    sessions: Sessions, monitor_db: Database, pg: PostgresServer, prefix: str
):
    with (
        role(pg, f"{prefix}_app") as app,
        role(pg, f"{prefix}_ro", "pg_monitor") as read_only,
        role(pg, f"{prefix}_ops", "pg_monitor", "pg_signal_backend") as ops,
    ):
        stale = sessions.open(IDLE_IN_TRANSACTION, worker_pid=701, user=app)
        superusers = sessions.open(IDLE_IN_TRANSACTION, worker_pid=702)  # as postgres
        idle_for(monitor_db, {stale.pid, superusers.pid}, 1.0)
        limits = ("--prefix", prefix, "--idle-in-transaction-warning", "0.5",
                  "--idle-in-transaction-critical", "1", "--terminate", "--no-dry-run")  # fmt: skip

        refused = check(pg.url(monitor_db.name, user=read_only), *limits)
        assert refused.exit_code == CRITICAL
        assert f"permission denied: GRANT pg_signal_backend TO {read_only}" in refused.stdout
        assert "Traceback" not in refused.output

        allowed = check(pg.url(monitor_db.name, user=ops), *limits)
        assert f"TERMINATED backend {stale.pid}" in allowed.stdout
        assert f"NOT TERMINATED backend {superusers.pid}" in allowed.stdout
        assert "only a superuser may terminate it" in allowed.stdout
        assert superusers.pid in backend_pids(monitor_db)


# --- an unreachable database -----------------------------------------------------------


def test_unreachable_database_is_one_line_without_the_password():
    url = f"postgresql://ops:s3cret-pw@127.0.0.1:{free_port()}/app"
    result = lifeguard("check", "--database-url", url)
    assert result.returncode == UNKNOWN
    assert result.stdout.startswith("LIFEGUARD UNKNOWN - cannot connect to postgresql://ops:***@")
    assert len(result.stdout.strip().splitlines()) == 1
    assert "s3cret-pw" not in result.stdout + result.stderr

    live = lifeguard("monitor", "--database-url", url, "--count", "1")
    assert live.returncode == UNKNOWN  # could not run: 3, as check
    assert "lifeguard monitor: cannot connect to" in live.stderr
    assert "s3cret-pw" not in live.stdout + live.stderr
    assert "Traceback" not in live.stderr


def test_the_database_must_be_named():
    result = lifeguard("check")
    assert result.returncode == UNKNOWN
    assert "pass --database-url, set LIFEGUARD_DATABASE_URL, or give the Celery app" in (
        result.stdout
    )
    wrong = lifeguard("check", "--database-url", "mysql://root@db/app")
    assert wrong.returncode == UNKNOWN
    assert "lifeguard monitors PostgreSQL" in wrong.stdout


def test_database_url_from_the_environment(monitor_db: Database):
    result = lifeguard(
        "check", "--json", "--no-state", env={"LIFEGUARD_DATABASE_URL": monitor_db.url}
    )
    assert result.returncode == OK, result.stdout + result.stderr
    assert "(from LIFEGUARD_DATABASE_URL)" in json.loads(result.stdout)["target"]


# --- the monitor's own footprint ----------------------------------------------------------


def test_a_monitor_query_that_overruns_is_cancelled_and_leaves_nothing_set(
    monitor_db: Database,
):
    conn = connect(from_url(monitor_db.url, "test"), timeout=0.2)
    try:
        with (
            pytest.raises(Exception, match="statement timeout"),
            time_limited(conn, 0.2),
            conn.cursor() as cur,
        ):
            cur.execute("SELECT pg_sleep(30)")
        with conn.cursor() as cur:
            cur.execute("SHOW statement_timeout")
            assert cur.fetchone()[0] == "0"
            cur.execute("SELECT 1")  # the connection is usable, out of any transaction
            assert cur.fetchone()[0] == 1
    finally:
        conn.close()


def test_monitor_behind_a_transaction_pooler_leaves_no_setting_for_the_next_client(
    monitor_db: Database,
):
    # One server connection behind PgBouncer: whatever the monitor leaves set on it,
    # the next client gets.
    with running_pgbouncer(monitor_db.server, monitor_db.name, pool_size=1) as url:
        for _ in range(2):
            assert check(url).exit_code == OK
        live = lifeguard(
            "monitor", "--database-url", url, "--count", "7", "--interval", "0.2", "--json"
        )
        assert live.returncode == 0, live.stderr  # seven snapshots: psycopg never prepared

        import psycopg

        with psycopg.connect(url, autocommit=True) as client:
            timeout = client.execute("SHOW statement_timeout").fetchone()
            assert timeout is not None and timeout[0] == "0"


# --- lifeguard monitor -----------------------------------------------------------------


def test_monitor_prints_one_json_report_per_refresh(
    sessions: Sessions, monitor_db: Database, prefix: str
):
    sessions.open(IDLE_IN_TRANSACTION, worker_pid=801)
    result = CliRunner().invoke(
        main,
        ["monitor", "--database-url", monitor_db.url, "--prefix", prefix, "--json",
         "--count", "2", "--interval", "0.2"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    first, second = (json.loads(line) for line in result.stdout.splitlines())
    assert first["worker_backends_by_state"] == {"idle in transaction": 1}
    assert "window_seconds" not in first["sessions"]
    assert second["sessions"]["window_seconds"] > 0  # rates from the second refresh on
    assert second["sessions"]["delta"]["killed"] == 0


def test_monitor_text_view_names_the_stale_backend(
    sessions: Sessions, monitor_db: Database, prefix: str
):
    stuck = sessions.open(IDLE_IN_TRANSACTION, worker_pid=811)
    idle_for(monitor_db, {stuck.pid}, 0.6)
    result = CliRunner().invoke(
        main,
        ["monitor", "--database-url", monitor_db.url, "--prefix", prefix, "--count", "1",
         "--idle-in-transaction-warning", "0.5"],
    )  # fmt: skip
    assert result.exit_code == WARNING, result.output  # --count: the last report's status
    assert result.stdout.startswith("LIFEGUARD WARNING - 1 backends idle in transaction")
    assert f"backend {stuck.pid} (worker {HOST}:811)" in result.stdout


def test_prometheus_exporter_serves_the_snapshot(
    sessions: Sessions, monitor_db: Database, prefix: str
):
    stuck = sessions.open(IDLE_IN_TRANSACTION, worker_pid=901)
    sessions.open(IDLE, worker_pid=902)
    idle_for(monitor_db, {stuck.pid}, 0.6)
    port = free_port()
    exporter = start_lifeguard(
        "monitor", "--database-url", monitor_db.url, "--prefix", prefix, "--quiet",
        "--interval", "0.5", "--prometheus-port", str(port), "--prometheus-address", "127.0.0.1",
        "--idle-in-transaction-warning", "0.5",
    )  # fmt: skip
    try:
        families = scrape(port)
    finally:
        exporter.terminate()
        exporter.wait(10)
    assert samples(families, "lifeguard_db_up") == {(): 1.0}
    by_state = samples(families, "lifeguard_db_backends")
    assert by_state[(("state", "idle in transaction"),)] == 1
    assert by_state[(("state", "idle"),)] == 1
    workers = samples(families, "lifeguard_db_worker_backends")
    assert workers[(("host", HOST), ("state", "idle in transaction"))] == 1
    [(labels, age)] = samples(families, "lifeguard_db_idle_in_transaction_seconds").items()
    assert dict(labels) == {
        "backend_pid": str(stuck.pid), "host": HOST, "worker_pid": "901", "task": "",
    }  # fmt: skip
    assert age > 0.5
    statuses = samples(families, "lifeguard_check_status")
    assert statuses[(("check", "idle_in_transaction"),)] == WARNING
    assert statuses[(("check", "overall"),)] == WARNING
    assert samples(families, "lifeguard_db_sessions_total")[()] >= 2
    assert () in samples(families, "lifeguard_db_sessions_killed_total")
    assert samples(families, "lifeguard_db_usable_connections")[()] > 0


def test_monitor_keeps_watching_through_a_database_restart(prefix: str):
    """On a server this test starts itself: stop it under the monitor, start it again."""
    embedded = EmbeddedPostgres()
    server = embedded.start()
    try:
        server.create_database("watched")
        watcher = start_lifeguard(
            "monitor", "--database-url", server.url("watched"), "--prefix", prefix,
            "--json", "--interval", "0.3",
        )  # fmt: skip
        assert watcher.stdout is not None and watcher.stderr is not None
        assert json.loads(watcher.stdout.readline())["status"] == "OK"
        embedded.stop()
        assert "retrying in 0.3s" in watcher.stderr.readline()
        embedded.start()
        assert json.loads(watcher.stdout.readline())["status"] == "OK"  # back by itself
        watcher.terminate()
        watcher.wait(10)
    finally:
        embedded.destroy()


# --- a real worker: attribution and the inspect join -----------------------------------


@pytest.mark.compat
def test_stale_transaction_is_shown_with_the_task_holding_it(
    sandbox_worker, tasks, test_db: Database, prefix: str
):
    worker = sandbox_worker(pool="prefork", concurrency=2)
    tasks.run_many("touch", 6)  # both children hold a kept connection
    running = tasks.send("hold_transaction", 6)
    in_transaction = (
        "SELECT pid FROM pg_stat_activity WHERE datname = %s AND application_name LIKE %s "
        "AND state = 'idle in transaction' AND now() - state_change > interval '0.6 s'"
    )
    [(backend,)] = wait_for(lambda: test_db.admin(in_transaction, [test_db.name, prefix + ":%"]))

    # The operator's view: the app's settings name the database and the prefix.
    sandbox_env = {k: v for k, v in worker.env.items() if k.startswith("LIFEGUARD_SANDBOX_")}
    result = lifeguard(
        "check", "-A", "lifeguard.demo.project.celery_app", "--json", "--no-state",
        "--idle-in-transaction-warning", "0.5", env=sandbox_env,
    )  # fmt: skip
    assert result.returncode == WARNING, result.stdout + result.stderr
    report = json.loads(result.stdout)
    assert report["target"].endswith("(from Django DATABASES)")
    assert report["prefix"] == prefix
    [finding] = report["findings"]
    [stale] = finding["backends"]
    assert stale["pid"] == backend
    assert stale["task"] == f"lifeguard.demo.project.tasks.hold_transaction[{running.id}]"
    held = {b["pid"]: b for b in report["worker_backends"]}
    assert held[backend]["tasks"][0]["id"] == running.id
    assert held[backend]["worker_pid"] in worker.children()
    others = [b for pid, b in held.items() if pid != backend]
    assert others and all(b["tasks"] == [] for b in others)  # idle children: no task
    assert running.get(timeout=30)["backend"] == backend  # the task was left alone
