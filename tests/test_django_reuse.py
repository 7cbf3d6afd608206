"""Scenario: a prefork worker runs one-query tasks; connections must be reused, not rebuilt."""

from __future__ import annotations

import celery
import pytest

from tests.support import Database, SandboxTasks

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


@pytest.mark.compat
def test_celery_fixup_keeps_its_setup_duties(sandbox_worker, tasks: SandboxTasks):
    """lifeguard takes over connections only: Django is set up, tasks are DjangoTasks."""
    worker = sandbox_worker(pool="prefork", concurrency=1)
    assert "DjangoTask" in tasks.run("task_class")
    assert tasks.run("touch")["backend"]
    assert "Signal handler" not in worker.log  # no receiver of Celery's or ours failed


def test_install_rejects_unknown_options():
    from celery import Celery

    import lifeguard

    with pytest.raises(lifeguard.ConfigurationError, match="Did you mean 'cancel_timeout'"):
        lifeguard.install(Celery("t"), cancel_timout=3)
