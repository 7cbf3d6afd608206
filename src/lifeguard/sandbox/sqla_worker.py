"""Workers of the SQLAlchemy sandbox app (:mod:`lifeguard.sandbox.sqla_app`).

Kept apart from the app module so tests and benchmarks can build workers without
importing SQLAlchemy or creating the app's engines themselves.
"""

from __future__ import annotations

from collections.abc import Mapping

from .worker import CeleryWorker

APP = "lifeguard.sandbox.sqla_app"


def sandbox_worker(
    *,
    db_url: str,
    broker_url: str,
    queue: str,
    mode: str = "lifeguard",
    prefix: str = "lifeguard",
    driver: str = "psycopg",
    async_driver: str = "asyncpg",
    pool_size: int = 1,
    use_before_fork: bool = False,
    async_tasks: bool = True,
    options: str = "{}",
    quiet: bool = False,
    pool: str = "prefork",
    concurrency: int = 2,
    env: Mapping[str, str] | None = None,
) -> CeleryWorker:
    """A (not yet started) worker of the sqla sandbox; see sqla_app.py for the knobs."""
    settings = {
        "LIFEGUARD_SANDBOX_DB_URL": db_url,
        "LIFEGUARD_SANDBOX_BROKER_URL": broker_url,
        "LIFEGUARD_SANDBOX_QUEUE": queue,
        "LIFEGUARD_SANDBOX_MODE": mode,
        "LIFEGUARD_SANDBOX_PREFIX": prefix,
        "LIFEGUARD_SANDBOX_DRIVER": driver,
        "LIFEGUARD_SANDBOX_ASYNC_DRIVER": async_driver,
        "LIFEGUARD_SANDBOX_POOL_SIZE": str(pool_size),
        "LIFEGUARD_SANDBOX_USE_BEFORE_FORK": "1" if use_before_fork else "0",
        "LIFEGUARD_SANDBOX_OPTIONS": options,
        "LIFEGUARD_SANDBOX_ASYNC_TASKS": "1" if async_tasks else "0",
        **({"LIFEGUARD_SANDBOX_QUIET": "1"} if quiet else {}),
        **(env or {}),
    }
    return CeleryWorker(APP, pool=pool, concurrency=concurrency, queue=queue, env=settings)
