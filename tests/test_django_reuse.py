"""Scenario: a prefork worker runs one-query tasks; connections must be reused, not rebuilt."""

from __future__ import annotations

import celery
import pytest

from .support import Database, SandboxTasks

CELERY_56_PLUS = tuple(int(x) for x in celery.__version__.split(".")[:2]) >= (5, 6)


@pytest.mark.compat
def test_prefork_reuses_one_session_per_child(
    sandbox_worker, tasks: SandboxTasks, test_db: Database, prefix: str
):
    worker = sandbox_worker(pool="prefork", concurrency=2)
    sessions_before = test_db.sessions()
    results = tasks.run_many("touch", 60)
    sessions = {(r["backend"], r["backend_start"]) for r in results}
    children = set(worker.children())

    assert {r["worker_pid"] for r in results} <= children
    assert len(sessions) <= 2, f"{len(sessions)} server sessions for 60 tasks"
    stats = [tasks.run("guard_stats") for _ in range(4)]
    assert all(s["process"].get("connections_reused", 0) >= 1 for s in stats)

    backends = test_db.backends(prefix)
    assert len(backends) <= 2
    assert {b.application_name.rsplit(":", 1)[1] for b in backends} <= {str(p) for p in children}
    worker.stop()
    assert test_db.sessions() - sessions_before <= 2
