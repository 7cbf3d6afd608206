"""External side effects, claimed and completed: real prefork workers, a real SIGKILL
between the claim and the completion, and the redelivery (acks_late +
reject_on_worker_lost) doing what each ``on_orphan`` policy's docs promise (docs/once.md).

The "remote API" is the table lifeguard_effect_remote, written by the task on a
connection of its own in autocommit: every call it made is there, whatever became of the
task. An API with idempotency keys applies each key once, so "one effect" reads as "one
distinct idempotency key".
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import uuid
from typing import Any

import pytest
from celery import Celery

from lifeguard.postgres.once_sql import effect_lock_id
from tests.harness.django_worker import TASKS as HARNESS_TASKS
from tests.support import Database, SandboxTasks
from tests.test_once import wait_for


@pytest.fixture
def tasks(celery_client: Celery, prefix: str) -> SandboxTasks:
    """The harness's exactly-once, singleton and effect tasks (tests/harness/django_tasks.py)."""
    return SandboxTasks(celery_client, queue=f"q-{prefix}", module=HARNESS_TASKS)


TASK = "tests.harness.django_tasks.effect_call"


def lifeguard_cli(*args: str) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-c", "from lifeguard.cli import main; main()", *args]
    return subprocess.run(command, capture_output=True, text=True, timeout=60, check=False)


@pytest.fixture(scope="module")
def effects_db(test_db: Database) -> Database:
    """The key table as `lifeguard migrate` makes it, and the remote API's table."""
    done = lifeguard_cli("migrate", "--database-url", test_db.url)
    assert done.returncode == 0, done.stderr
    test_db.execute(
        "CREATE TABLE IF NOT EXISTS lifeguard_effect_remote "
        "(idempotency_key text, key text, pid int, at timestamptz DEFAULT clock_timestamp())"
    )
    test_db.execute(  # singleton_run's, as tests/test_once.py makes it
        "CREATE TABLE IF NOT EXISTS lifeguard_singleton_runs (key text, during tstzrange, "
        "EXCLUDE USING gist (during WITH &&))"
    )
    return test_db


def remote_calls(db: Database, key: str) -> list[tuple[str, int]]:
    """(idempotency key, pid) of every call the remote API got for ``key``, in order."""
    return db.execute(
        "SELECT idempotency_key, pid FROM lifeguard_effect_remote WHERE key = %s ORDER BY at",
        [key],
    )


def claim_row(db: Database, key: str) -> tuple[Any, ...]:
    rows = db.execute(
        "SELECT state, task_name, completed_at IS NOT NULL FROM lifeguard_once WHERE key = %s",
        [key],
    )
    assert len(rows) == 1, rows
    return rows[0]


def lock_sessions(db: Database, key: str, granted: bool) -> list[tuple[int, str]]:
    """(pid, state in pg_stat_activity) of the sessions holding or awaiting the key's lock."""
    big = effect_lock_id(key) & 0xFFFFFFFFFFFFFFFF
    return db.admin(
        "SELECT l.pid, a.state FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
        "WHERE l.locktype = 'advisory' AND l.classid = %s AND l.objid = %s AND l.granted = %s",
        [big >> 32, big & 0xFFFFFFFF, granted],
    )


def kill_between_claim_and_completion(db: Database, tasks: SandboxTasks, key: str, policy: str):
    """Sends the task, waits for its remote call (the claim committed, the completion not
    yet), and SIGKILLs the prefork child there. Returns the task's result handle."""
    result = tasks.send("effect_call", key, policy, "wait", 30.0)
    [(first_key, victim)] = wait_for(lambda: remote_calls(db, key))
    assert claim_row(db, key) == ("claimed", TASK, False)  # committed before the effect
    # The owner holds the key's lock on a session that is idle, not idle in transaction.
    assert [state for _, state in wait_for(lambda: lock_sessions(db, key, True))] == ["idle"]
    os.kill(victim, signal.SIGKILL)
    return result, first_key, victim


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["rerun", "skip", "fail"])
def test_killed_between_claim_and_completion_redelivery_applies_the_policy(
    policy: str, effects_db: Database, sandbox_worker: Any, tasks: SandboxTasks
) -> None:
    """rerun: at least once, the same idempotency key again. skip: at most once, never
    called again. fail: every run fails naming the key, until an operator resolves it."""
    db = effects_db
    sandbox_worker()
    key = f"invoice:{uuid.uuid4().hex[:6]}:{policy}"
    result, first_key, victim = kill_between_claim_and_completion(db, tasks, key, policy)
    if policy == "rerun":
        out = result.get(timeout=30)
        assert out["status"] == "reclaimed" and out["orphaned"] is True
        calls = remote_calls(db, key)
        assert len(calls) == 2 and calls[1][1] != victim
        assert {idem for idem, _ in calls} == {first_key}  # the remote applies it once
        assert claim_row(db, key) == ("done", TASK, True)
    elif policy == "skip":
        out = result.get(timeout=30)
        assert out["status"] == "skipped" and out["orphaned"] is True
        assert out["result"] is None
        assert claim_row(db, key) == ("skipped", TASK, True)
        assert tasks.run("effect_call", key, policy)["status"] == "skipped"  # and stays so
        assert len(remote_calls(db, key)) == 1
    else:
        result.get(timeout=30, propagate=False)
        assert result.state == "FAILURE"
        message = str(result.result)
        assert key in message and TASK in message and "claimed at" in message, message
        assert "lifeguard effects resolve" in message
        assert tasks.outcome("effect_call", key, policy)[0] == "FAILURE"  # keeps failing
        assert claim_row(db, key) == ("claimed", TASK, False)
        # The operator: finds the orphan (exit 1), checks the remote side, resolves it.
        listed = lifeguard_cli("effects", "list", "--database-url", db.url)
        assert listed.returncode == 1, listed.stderr
        assert key in listed.stdout and "ORPHANED" in listed.stdout and first_key in listed.stdout
        resolved = lifeguard_cli(
            "effects", "resolve", key, "--done", "--result", '{"by": "operator"}',
            "--database-url", db.url,
        )  # fmt: skip
        assert resolved.returncode == 0, resolved.stderr
        out = tasks.run("effect_call", key, policy)
        assert out["status"] == "done" and out["result"] == {"by": "operator"}
        assert len(remote_calls(db, key)) == 1


@pytest.mark.slow
def test_a_live_owner_makes_reruns_wait_and_a_completed_key_is_not_called_again(
    effects_db: Database, sandbox_worker: Any, tasks: SandboxTasks
) -> None:
    """While the owner runs: on_busy="raise" fails at once, the operator may not resolve
    it, on_busy="wait" waits on the lock and then returns the owner's result. Once
    completed, every rerun (the decorator form too) returns the stored result uncalled."""
    db = effects_db
    sandbox_worker(concurrency=2)
    key = f"upload:{uuid.uuid4().hex[:6]}"
    owner = tasks.send("effect_call", key, "rerun", "wait", 4.0)
    wait_for(lambda: remote_calls(db, key))
    state, error = tasks.outcome("effect_call", key, "rerun", "raise")
    assert state == "FAILURE" and "owner is alive" in str(error), error
    listed = lifeguard_cli("effects", "list", "--database-url", db.url)
    assert key in listed.stdout and "owner alive" in listed.stdout, listed.stdout
    refused = lifeguard_cli("effects", "resolve", key, "--release", "--database-url", db.url)
    assert refused.returncode == 3 and "owner is alive" in refused.stderr, refused.stderr
    waiter = tasks.send("effect_call", key, "rerun", "wait")
    wait_for(lambda: lock_sessions(db, key, False))  # blocked on the lock, not polling
    first = owner.get(timeout=30)
    assert first["status"] == "claimed"
    second = waiter.get(timeout=30)
    assert second["status"] == "done" and second["waited"] is True
    assert second["result"] == first["result"]
    assert tasks.run("effect_decorated", key) == first["result"]
    assert len(remote_calls(db, key)) == 1
    assert claim_row(db, key) == ("done", TASK, True)


# --- in the test process: the other connections, a raising block, the async twin ---------


@pytest.mark.compat
def test_a_raising_block_leaves_its_claim_for_the_next_runs_policy(effects_db: Database) -> None:
    """Whether the effect happened before the exception is unknown, as after a kill: the
    claim stays, and the next run applies on_orphan (here through a SQLAlchemy engine and
    a plain URL, the other two ways to name the lock's connection)."""
    from sqlalchemy import create_engine

    import lifeguard

    engine = create_engine(effects_db.url.replace("postgresql://", "postgresql+psycopg://", 1))
    key = f"raise:{uuid.uuid4().hex[:6]}"
    with pytest.raises(TimeoutError), lifeguard.effect(key, engine=engine) as effect:
        assert effect.status == "claimed"
        raise TimeoutError("the remote did not answer")
    orphaned = pytest.raises(lifeguard.EffectOrphaned, match="never completed")
    with orphaned, lifeguard.effect(key, on_orphan="fail", url=effects_db.url):
        pass
    with lifeguard.effect(key, on_orphan="rerun", url=effects_db.url) as effect:
        assert effect.status == "reclaimed" and effect.orphaned
        effect.result = {"sent": 1}
    with lifeguard.effect(key, url=effects_db.url) as effect:
        assert effect.done and effect.result == {"sent": 1}
    assert claim_row(effects_db, key) == ("done", None, True)
    engine.dispose()


@pytest.mark.compat
def test_the_async_twin_claims_and_completes(effects_db: Database) -> None:
    import asyncio

    import lifeguard

    key = f"async:{uuid.uuid4().hex[:6]}"

    async def run() -> list[str]:
        seen = []
        for _ in range(2):
            async with lifeguard.effect_async(key, url=effects_db.url) as effect:
                seen.append(effect.status)
                if not effect.done:
                    assert lifeguard.current_effect() is effect
                    effect.result = {"uploaded": True}
        return seen

    assert asyncio.run(run()) == ["claimed", "done"]


@pytest.mark.compat
def test_a_table_made_before_effects_is_a_clear_error_then_migrates_keeping_its_keys(
    pg: Any,
) -> None:
    """The columns come with ALTER TABLE ... ADD COLUMN IF NOT EXISTS: an older table keeps
    its once keys, which read as done."""
    import lifeguard
    from lifeguard.postgres import once_sql
    from lifeguard.postgres.once_sql import OnceStorageError
    from tests.support import scratch_database

    with scratch_database(pg, "effold") as old:
        old.execute(once_sql.CREATE_TABLE)
        old.execute("INSERT INTO lifeguard_once (key, result) VALUES ('k', '{\"n\": 1}')")
        refused = pytest.raises(OnceStorageError, match="lifeguard migrate")
        with refused, lifeguard.effect("k", url=old.url):
            pass
        assert lifeguard_cli("migrate", "--database-url", old.url).returncode == 0
        with lifeguard.effect("k", url=old.url) as effect:
            assert effect.done and effect.result == {"n": 1}


@pytest.mark.slow
def test_the_lock_session_never_comes_from_djangos_native_pool(
    effects_db: Database, sandbox_worker: Any, tasks: SandboxTasks
) -> None:
    """The effect's (and the singleton's) session is opened and closed by lifeguard: one
    lent by a pool of two would never go back, and the third run would wait for a slot."""
    import django

    if django.VERSION < (5, 1):
        pytest.skip("Django's native pool came with 5.1")
    sandbox_worker(conn_max_age="0", native_pool='{"min_size": 1, "max_size": 2, "timeout": 3}')
    for run in range(4):
        key = f"pool:{uuid.uuid4().hex[:6]}"
        assert tasks.run("effect_call", key, timeout=20)["status"] == "claimed", run
        assert tasks.run("singleton_run", key, 0.0, timeout=20)["acquired"] is True, run


@pytest.mark.compat
def test_waiting_for_a_live_owner_is_bounded_by_the_timeout(effects_db: Database) -> None:
    """The owner (another session, still running) keeps the lock: a waiter with a timeout
    gives up with EffectBusy naming the key instead of running the effect a second time."""
    import time

    import lifeguard

    key = f"slow:{uuid.uuid4().hex[:6]}"
    with lifeguard.effect(key, url=effects_db.url) as owner:
        assert owner.status == "claimed"
        started = time.monotonic()
        waiting = pytest.raises(lifeguard.EffectBusy, match=key)
        with waiting, lifeguard.effect(key, url=effects_db.url, timeout=0.5):
            pass
        assert 0.4 < time.monotonic() - started < 5
        with pytest.raises(lifeguard.ConfigurationError, match="on_orphan"):
            lifeguard.effect_task(on_orphan="retry")  # type: ignore[typeddict-item]
    assert claim_row(effects_db, key)[0] == "done"
