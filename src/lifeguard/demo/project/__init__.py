"""A small Django project and Celery app used by ``lifeguard demo``, the tests and benchmarks.

Everything is set from ``LIFEGUARD_SANDBOX_*`` environment variables, so one project
plays every configuration compared: stock Celery, Celery's ``CELERY_DB_REUSE_MAX``,
lifeguard, with or without Django's native pool, on psycopg 3 or psycopg2.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..worker import CeleryWorker, sandbox_settings

APP = "lifeguard.demo.project.celery_app"
TASKS = "lifeguard.demo.project.tasks"


def sandbox_worker(
    *,
    db_url: str,
    broker_url: str,
    queue: str,
    mode: str = "lifeguard",
    prefix: str = "lifeguard",
    conn_max_age: str = "600",
    native_pool: str = "",
    driver: str = "psycopg",
    options: str = "{}",
    quiet: bool = False,
    pool: str = "prefork",
    concurrency: int = 2,
    args: Sequence[str] = (),
    env: Mapping[str, str] | None = None,
) -> CeleryWorker:
    """A (not yet started) worker of the sandbox project; see settings.py for the knobs."""
    settings = sandbox_settings(
        db_url=db_url,
        broker_url=broker_url,
        queue=queue,
        mode=mode,
        prefix=prefix,
        options=options,
        quiet=quiet,
        conn_max_age=conn_max_age,
        pool=native_pool,
        driver=driver,
    )
    settings.update(env or {})
    return CeleryWorker(
        APP, pool=pool, concurrency=concurrency, queue=queue, env=settings, args=args
    )
