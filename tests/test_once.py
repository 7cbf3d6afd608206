"""Exactly-once effects and singleton locks: real prefork workers, real SIGKILLs, and
every count read from PostgreSQL (docs/once.md)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import psycopg
import pytest
from celery import Celery

from lifeguard.demo.postgres import free_port
from lifeguard.postgres import once_sql
from lifeguard.postgres.appname import parse_application_name
from lifeguard.postgres.once_sql import lock_id
from tests.harness.django_worker import TASKS as HARNESS_TASKS
from tests.harness.round_trips import count_round_trips
from tests.monitor_support import lifeguard as run_lifeguard
from tests.monitor_support import role as login_role
from tests.monitor_support import samples, scrape
from tests.pgbouncer_support import running_pgbouncer
from tests.support import Database, SandboxTasks


@pytest.fixture
def tasks(celery_client: Celery, prefix: str) -> SandboxTasks:
    """The harness's exactly-once, singleton and effect tasks (tests/harness/django_tasks.py)."""
    return SandboxTasks(celery_client, queue=f"q-{prefix}", module=HARNESS_TASKS)


@pytest.fixture(scope="module")
def once_db(test_db: Database) -> Database:
    """The key table as `lifeguard migrate` makes it, and the tests' effect tables."""
    command = [sys.executable, "-c", "from lifeguard.cli import main; main()", "migrate"]
    command += ["--database-url", test_db.url]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    again = subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)
    assert again.returncode == 0, again.stderr  # idempotent
    test_db.execute(
        "CREATE TABLE IF NOT EXISTS lifeguard_once_effects (key text, value text, pid int)"
    )
    test_db.execute(
        "CREATE TABLE IF NOT EXISTS lifeguard_singleton_runs (key text, during tstzrange, "
        "EXCLUDE USING gist (during WITH &&))"
    )
    test_db.execute(  # effect_call's remote API, as tests/test_effects.py makes it
        "CREATE TABLE IF NOT EXISTS lifeguard_effect_remote "
        "(idempotency_key text, key text, pid int, at timestamptz DEFAULT clock_timestamp())"
    )
    return test_db


@pytest.fixture
def clean(once_db: Database) -> Iterator[Database]:
    for table in ("lifeguard_once", "lifeguard_once_effects", "lifeguard_singleton_runs"):
        once_db.execute(f"TRUNCATE {table}")
    yield once_db


def wait_for(probe: Callable[[], Any], timeout: float = 20.0) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = probe()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"not seen within {timeout}s")


def effects(db: Database, key: str | None = None) -> list[tuple[Any, ...]]:
    if key is None:
        return db.execute("SELECT key, value FROM lifeguard_once_effects ORDER BY key")
    return db.execute("SELECT key, value FROM lifeguard_once_effects WHERE key = %s", [key])


def worker_pid_in_transaction(db: Database, prefix: str) -> int | None:
    """The worker process whose session is idle in transaction (inside the once block)."""
    for backend in db.backends(prefix):
        if backend.state == "idle in transaction":
            parsed = parse_application_name(backend.application_name, prefix)
            if parsed is not None:
                return parsed.pid
    return None


Harness = tuple[Callable[..., Any], SandboxTasks]


@pytest.fixture
def harness(
    request: pytest.FixtureRequest,
    sandbox_worker: Any,
    sqla_worker: Any,
    tasks: SandboxTasks,
    sqla_tasks: SandboxTasks,
) -> Harness:
    """(start a worker, send tasks) of the Django sandbox or of the SQLAlchemy app."""
    if request.param == "django":
        return sandbox_worker, tasks
    return sqla_worker, sqla_tasks


# --- the claim statement and the round trips, on two real sessions -----------------------


def _claim(conn: Any, key: str) -> tuple[bool, Any]:
    row = conn.execute(once_sql.CLAIM_OR_FETCH, [key, "t"]).fetchone()
    return bool(row[0]), row[1]


def test_claim_loser_waits_for_the_winners_commit_then_gets_its_result(clean: Database) -> None:
    """The one-statement claim: a second session's claim waits on the first's uncommitted
    key, then returns the committed result (not an empty snapshot read)."""
    with psycopg.connect(clean.url) as winner, psycopg.connect(clean.url) as loser:
        assert _claim(winner, "race") == (True, None)
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(_claim, loser, "race")
            time.sleep(0.3)
            assert not waiting.done()  # blocked on the unique index
            winner.execute(once_sql.STORE, ['{"n": 1}', "race"])
            winner.commit()
            assert waiting.result(timeout=5) == (False, '{"n": 1}')
        loser.rollback()
        assert _claim(loser, "race") == (False, '{"n": 1}')  # and without a race
        loser.rollback()


def test_claim_loser_of_a_rolled_back_winner_claims_the_key(clean: Database) -> None:
    with psycopg.connect(clean.url) as winner, psycopg.connect(clean.url) as loser:
        assert _claim(winner, "undone") == (True, None)
        with ThreadPoolExecutor(1) as pool:
            waiting = pool.submit(_claim, loser, "undone")
            time.sleep(0.3)
            winner.rollback()
            assert waiting.result(timeout=5) == (True, None)
        loser.commit()
    assert clean.execute("SELECT count(*) FROM lifeguard_once WHERE key = 'undone'") == [(1,)]


def test_once_block_costs_one_round_trip_and_its_commit_failure_keeps_nothing(
    clean: Database,
) -> None:
    """SQLAlchemy + psycopg 3, the block owning the transaction: the claim is the only
    extra round trip (the result goes out with the COMMIT). A COMMIT the server refuses
    (a deferred constraint) raises, and neither key nor writes are kept."""
    from sqlalchemy import create_engine, text
    from sqlalchemy.exc import IntegrityError
    from sqlalchemy.orm import Session

    import lifeguard

    clean.execute(
        "CREATE TABLE IF NOT EXISTS lifeguard_once_deferred (n int UNIQUE DEFERRABLE "
        "INITIALLY DEFERRED)"
    )
    clean.execute("TRUNCATE lifeguard_once_deferred")
    url = clean.url.replace("postgresql://", "postgresql+psycopg://", 1)
    engine = create_engine(url, pool_size=1, max_overflow=0)  # one connection to trace
    write = text("INSERT INTO lifeguard_once_effects (key, value) VALUES (:k, 'v')")
    with Session(engine) as session:
        raw = session.connection().connection.dbapi_connection
        session.commit()

        def unguarded() -> None:
            session.execute(write, {"k": "plain"})
            session.commit()

        def guarded(key: str) -> Callable[[], None]:
            def run() -> None:
                with lifeguard.once(key, session=session) as block:
                    if not block.done:
                        session.execute(write, {"k": key})
                        block.result = {"key": key}

            return run

        plain = count_round_trips(raw.pgconn, unguarded)
        assert count_round_trips(raw.pgconn, guarded("g1")) == plain + 1
        assert (
            count_round_trips(raw.pgconn, guarded("g1")) <= plain + 1
        )  # the skip path: claim, rollback
        refused = lifeguard.once("refused", session=session)
        with pytest.raises(IntegrityError), refused as block:
            session.execute(text("INSERT INTO lifeguard_once_deferred VALUES (1), (1)"))
            block.result = {"kept": True}
    engine.dispose()
    assert effects(clean) == [("g1", "v"), ("plain", "v")]
    assert clean.execute("SELECT key, result FROM lifeguard_once ORDER BY key") == [
        ("g1", {"key": "g1"})
    ]


# --- exactly-once effects -----------------------------------------------------------------


@pytest.mark.parametrize("harness", ["django", "sqlalchemy"], indirect=True)
def test_killed_after_commit_redelivery_skips_and_returns_the_stored_result(
    harness: Harness, clean: Database
) -> None:
    """The commit happened, the ack did not: the redelivered run must not write again."""
    start, send = harness
    start()
    result = send.send("once_effect", None, "v1", 0.0, 30.0)  # key: the task id
    row = wait_for(
        lambda: clean.execute("SELECT result FROM lifeguard_once WHERE key = %s", [result.id])
    )
    first = row[0][0]
    assert first["skipped"] is False
    os.kill(first["pid"], signal.SIGKILL)  # during the sleep after the commit
    again = result.get(timeout=30)
    assert again == {**first, "skipped": True}
    assert effects(clean, result.id) == [(result.id, "v1")]


@pytest.mark.parametrize("harness", ["django", "sqlalchemy"], indirect=True)
def test_killed_before_commit_redelivery_runs_once(
    harness: Harness, clean: Database, prefix: str
) -> None:
    """Killed inside the transaction: nothing was kept, so the redelivery does the work."""
    start, send = harness
    start()
    key = f"order:{uuid.uuid4().hex[:6]}"
    result = send.send("once_effect", key, "v1", 2.0, 0.0)
    victim = wait_for(lambda: worker_pid_in_transaction(clean, prefix))
    os.kill(victim, signal.SIGKILL)
    out = result.get(timeout=30)
    assert out["skipped"] is False and out["pid"] != victim
    assert effects(clean, key) == [(key, "v1")]
    assert clean.execute("SELECT count(*) FROM lifeguard_once WHERE key = %s", [key]) == [(1,)]


@pytest.mark.parametrize(
    ("harness", "task"),
    [("django", "once_decorated"), ("sqlalchemy", "once_effect"), ("async", "async_once_effect")],
    indirect=["harness"],
)
def test_two_workers_racing_500_tasks_over_50_keys_make_50_effects(
    harness: Harness, task: str, clean: Database
) -> None:
    """Concurrent runs of a key serialise on its unique index: one effect per key, and
    every run of a key returns the committed run's result."""
    start, send = harness
    start(concurrency=2)
    start(concurrency=2)
    keys = [f"k{i:02d}" for i in range(50)]
    sent = [(keys[i % 50], send.send(task, keys[i % 50], f"v{i}")) for i in range(500)]
    results: dict[str, set[str]] = {}
    for key, result in sent:
        out = result.get(timeout=60)
        results.setdefault(key, set()).add(out["value"])
    rows = effects(clean)
    assert len(rows) == 50 and {key for key, _ in rows} == set(keys)
    for key, value in rows:
        assert results[key] == {value}, (key, results[key], value)


def test_django_result_sent_with_the_commit_still_runs_on_commit_callbacks(
    clean: Database, sandbox_worker: Any, tasks: SandboxTasks
) -> None:
    """Django's atomic() exit finds the connection already committed: its on_commit()
    callbacks run; a COMMIT the server refuses raises Django's IntegrityError, runs no
    callback and keeps neither the key nor the writes."""
    sandbox_worker()
    assert tasks.run("once_on_commit", "hooked") == {"on_commit_ran": True, "error": None}
    stored = clean.execute("SELECT result FROM lifeguard_once WHERE key = 'hooked'")
    assert stored == [({"stored": True},)]
    refused = tasks.run("once_on_commit", "refused", True)
    assert refused == {"on_commit_ran": False, "error": "IntegrityError"}
    assert clean.execute("SELECT count(*) FROM lifeguard_once WHERE key = 'refused'") == [(0,)]
    assert effects(clean) == [("hooked", "v")]


def test_missing_table_is_a_clear_error(
    test_db: Database, sandbox_worker: Any, tasks: SandboxTasks, pg: Any
) -> None:
    """Without the table the guarantee cannot hold: the task fails saying what to run."""
    from tests.support import scratch_database

    with scratch_database(pg, "once") as bare:
        bare.execute("CREATE TABLE lifeguard_once_effects (key text, value text, pid int)")
        sandbox_worker(db_url=bare.url)
        state, error = tasks.outcome("once_effect", "k", "v")
    assert state == "FAILURE"
    assert "lifeguard migrate" in str(error), error


def test_role_without_privileges_fails_naming_the_table_and_the_grant(
    once_db: Database, sandbox_worker: Any, tasks: SandboxTasks
) -> None:
    """42501: the workers' role may write the effect table but not lifeguard_once. The
    task fails saying which GRANT to run, and its body did not run unguarded."""
    role_name = f"lg_once_{uuid.uuid4().hex[:6]}"
    with login_role(once_db.server, role_name) as role:
        once_db.execute(f'GRANT INSERT ON lifeguard_once_effects TO "{role}"')
        try:
            sandbox_worker(db_url=once_db.server.url(once_db.name, user=role))
            key = f"denied:{uuid.uuid4().hex[:6]}"
            state, error = tasks.outcome("once_effect", key, "v")
        finally:
            once_db.execute(f'REVOKE ALL ON lifeguard_once_effects FROM "{role}"')
    assert state == "FAILURE"
    assert "permission denied on table lifeguard_once" in str(error), error
    assert f"GRANT SELECT, INSERT, UPDATE, DELETE ON lifeguard_once TO {role}" in str(error)
    assert effects(once_db, key) == []


# --- singleton ------------------------------------------------------------------------------


def advisory_holders(db: Database, key: str, granted: bool) -> list[int]:
    big = lock_id(key) & 0xFFFFFFFFFFFFFFFF
    rows = db.admin(
        "SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND classid = %s AND objid = %s "
        "AND granted = %s",
        [big >> 32, big & 0xFFFFFFFF, granted],
    )
    return [row[0] for row in rows]


def test_singleton_holder_sigkilled_next_run_acquires_within_a_second(
    clean: Database, sandbox_worker: Any, tasks: SandboxTasks, prefix: str
) -> None:
    key = f"nightly:{uuid.uuid4().hex[:6]}"
    sandbox_worker(concurrency=2)
    holder = tasks.send("singleton_run", key, 30.0)
    backend = wait_for(lambda: advisory_holders(clean, key, True))[0]
    waiter = tasks.send("singleton_run", key, 0.0)
    wait_for(lambda: advisory_holders(clean, key, False))
    # No transaction is open while the lock is held: the lock session is idle.
    state = clean.admin(
        "SELECT state, application_name FROM pg_stat_activity WHERE pid = %s", [backend]
    )
    assert state[0][0] == "idle", state
    holder_pid = parse_application_name(state[0][1], prefix)
    assert holder_pid is not None
    os.kill(holder_pid.pid, signal.SIGKILL)
    killed_at = time.time()
    out = waiter.get(timeout=20)
    assert out["acquired"] is True
    assert out["started"] - killed_at < 1.0, out["started"] - killed_at
    holder.get(timeout=20, propagate=False)


@pytest.mark.slow
def test_1000_contended_singleton_runs_never_overlap(
    clean: Database, sandbox_worker: Any, tasks: SandboxTasks
) -> None:
    """1,000 runs of one key on 4 processes of 2 workers: the exclusion constraint would
    refuse an overlapping interval, and the self-join finds none; skip mode skips while
    held."""
    sandbox_worker(concurrency=2)
    sandbox_worker(concurrency=2)
    runs = [tasks.send("singleton_run", "shared", 0.001) for _ in range(1000)]
    assert all(run.get(timeout=120)["acquired"] for run in runs)
    overlaps = clean.execute(
        "SELECT count(*) FROM lifeguard_singleton_runs a JOIN lifeguard_singleton_runs b "
        "ON a.ctid < b.ctid AND a.during && b.during"
    )
    assert overlaps == [(0,)]
    assert clean.execute("SELECT count(*) FROM lifeguard_singleton_runs") == [(1000,)]
    held = tasks.send("singleton_run", "shared", 3.0)
    wait_for(lambda: advisory_holders(clean, "shared", True))
    assert tasks.run("singleton_run", "shared", 0.0, "skip") == {"acquired": False}
    assert held.get(timeout=20)["acquired"] is True


# --- visibility: counters per task name, the holder in `lifeguard monitor` ---------------

SINGLETON_TASK = "tests.harness.django_tasks.singleton_run"
ONCE_TASK = "tests.harness.django_tasks.once_effect"
EFFECT_TASK = "tests.harness.django_tasks.effect_call"


def test_monitor_names_the_singleton_holder_and_the_counters_reach_the_metrics(
    clean: Database, sandbox_worker: Any, tasks: SandboxTasks, prefix: str
) -> None:
    """A real held lock: `lifeguard check --json` and its text name the key, the task,
    the worker process holding it and who waits; the waits, skips, skipped duplicates
    and orphaned effect claims are counted per task name on the worker's metrics
    endpoint."""
    port = free_port()
    options = json.dumps({"metrics_port": port, "metrics_address": "127.0.0.1"})
    sandbox_worker(concurrency=3, options=options)
    key = f"report:{uuid.uuid4().hex[:6]}"
    holder = tasks.send("singleton_run", key, 4.0)
    wait_for(lambda: advisory_holders(clean, key, True))
    waiter = tasks.send("singleton_run", key, 0.0)
    wait_for(lambda: advisory_holders(clean, key, False))
    assert tasks.run("singleton_run", key, 0.0, "skip") == {"acquired": False}

    checked = run_lifeguard("check", "--database-url", clean.url, "--prefix", prefix, "--json")
    [hold] = json.loads(checked.stdout)["singleton_locks"]
    assert (hold["key"], hold["task"], hold["lock_id"]) == (key, SINGLETON_TASK, lock_id(key))
    worker_pid = int(hold["worker"].rpartition(":")[2])
    assert len(hold["waiting"]) == 1 and hold["held_seconds"] is not None
    text = run_lifeguard("check", "--database-url", clean.url, "--prefix", prefix).stdout
    assert f"singleton {key!r} (task {SINGLETON_TASK}) held by worker " in text, text

    assert holder.get(timeout=20)["pid"] == worker_pid
    assert waiter.get(timeout=20)["acquired"] is True
    first = tasks.run("once_effect", "dup-key", "v1")
    assert tasks.run("once_effect", "dup-key", "v2") == {**first, "skipped": True}
    effect_key = f"mail:{uuid.uuid4().hex[:6]}"  # a block that raised leaves its claim...
    assert tasks.outcome("effect_call", effect_key, "skip", "wait", 0.0, True)[0] == "FAILURE"
    assert tasks.run("effect_call", effect_key, "skip")["orphaned"] is True  # ...orphaned

    def counted() -> dict[str, float]:
        families = scrape(port)
        return {
            name: samples(families, f"lifeguard_{name}_total").get(
                (("reason", ""), ("task", task)), 0.0
            )
            for name, task in [
                ("singleton_waited", SINGLETON_TASK),
                ("singleton_skipped", SINGLETON_TASK),
                ("once_skipped", ONCE_TASK),
            ]
        } | {
            "orphaned_claims": samples(families, "lifeguard_orphaned_claims_total").get(
                (("reason", "skip"), ("task", EFFECT_TASK)), 0.0
            )
        }

    expected = {
        "singleton_waited": 1.0,
        "singleton_skipped": 1.0,
        "once_skipped": 1.0,
        "orphaned_claims": 1.0,
    }
    wait_for(lambda: counted() == expected)


# --- behind PgBouncer in transaction mode -------------------------------------------------


def test_behind_transaction_pooling_the_lock_goes_direct_and_the_key_through_the_pooler(
    clean: Database, sandbox_worker: Any, tasks: SandboxTasks, prefix: str
) -> None:
    """The workers' connections go through a real PgBouncer in transaction mode; the
    singleton's lock sessions go straight to PostgreSQL (singleton_database_url), so the
    lock is held while the holder runs. The once key lives in the task's transaction,
    which transaction pooling keeps on one server session."""
    with running_pgbouncer(clean.server, clean.name) as pooler:
        options = json.dumps({"singleton_database_url": clean.url})
        sandbox_worker(concurrency=2, db_url=pooler, options=options)
        key = f"pooled:{uuid.uuid4().hex[:6]}"
        holder = tasks.send("singleton_run", key, 3.0)
        [backend] = wait_for(lambda: advisory_holders(clean, key, True))
        assert tasks.run("singleton_run", key, 0.0, "skip") == {"acquired": False}
        name = clean.admin(
            "SELECT application_name FROM pg_stat_activity WHERE pid = %s", [backend]
        )
        assert parse_application_name(name[0][0], prefix) is not None  # the worker's, direct
        assert holder.get(timeout=20)["acquired"] is True
        first = tasks.run("once_effect", key, "v1")
        assert tasks.run("once_effect", key, "v2") == {**first, "skipped": True}
    assert effects(clean, key) == [(key, "v1")]
