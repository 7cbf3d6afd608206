"""A small Django project and Celery app used by ``lifeguard demo``, the tests and benchmarks.

Everything is set from ``LIFEGUARD_SANDBOX_*`` environment variables, so one project
plays every configuration compared: stock Celery, Celery's ``CELERY_DB_REUSE_MAX``,
lifeguard, with or without Django's native pool, on psycopg 3 or psycopg2.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from ..worker import CeleryWorker

APP = "lifeguard.sandbox.django_project.celery_app"
TASKS = "lifeguard.sandbox.django_project.tasks"


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
    settings = {
        "LIFEGUARD_SANDBOX_DB_URL": db_url,
        "LIFEGUARD_SANDBOX_BROKER_URL": broker_url,
        "LIFEGUARD_SANDBOX_QUEUE": queue,
        "LIFEGUARD_SANDBOX_MODE": mode,
        "LIFEGUARD_SANDBOX_PREFIX": prefix,
        "LIFEGUARD_SANDBOX_CONN_MAX_AGE": conn_max_age,
        "LIFEGUARD_SANDBOX_POOL": native_pool,
        "LIFEGUARD_SANDBOX_DRIVER": driver,
        "LIFEGUARD_SANDBOX_OPTIONS": options,
        **({"LIFEGUARD_SANDBOX_QUIET": "1"} if quiet else {}),
        **(env or {}),
    }
    return CeleryWorker(
        APP, pool=pool, concurrency=concurrency, queue=queue, env=settings, args=args
    )
