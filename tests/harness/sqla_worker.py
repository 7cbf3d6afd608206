"""Workers of the SQLAlchemy sandbox app (:mod:`tests.harness.sqla_app`).

Kept apart from the app module so tests and benchmarks can build workers without
importing SQLAlchemy or creating the app's engines themselves.
"""

from __future__ import annotations

from collections.abc import Mapping

from lifeguard.demo.worker import CeleryWorker, sandbox_settings

APP = "tests.harness.sqla_app"


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
    settings = sandbox_settings(
        db_url=db_url,
        broker_url=broker_url,
        queue=queue,
        mode=mode,
        prefix=prefix,
        options=options,
        quiet=quiet,
        driver=driver,
        async_driver=async_driver,
        pool_size=str(pool_size),
        use_before_fork="1" if use_before_fork else "0",
        async_tasks="1" if async_tasks else "0",
    )
    settings.update(env or {})
    return CeleryWorker(APP, pool=pool, concurrency=concurrency, queue=queue, env=settings)
