"""A SQLAlchemy app, one engine created at import; the mistakes come from the knobs.

DOCTOR_DB_URL        the engine's URL (default postgresql+psycopg://postgres@127.0.0.1/postgres)
DOCTOR_LIFEGUARD     0: lifeguard not installed (default 1)
DOCTOR_REGISTER      1: guard.add_engine(engine)
DOCTOR_ASYNC         1: create_async_engine (the URL names an async driver)
DOCTOR_CONNECT       1: run a query at import, so the pool holds a connection before fork
DOCTOR_ENGINE_ARGS   JSON keyword arguments of create_engine (pool_size, connect_args,
                     poolclass by name, ...)
DOCTOR_PROFILE       1: lifeguard option pgbouncer_transaction_mode
DOCTOR_SINGLETON     1: a singleton task locking on the engine's database
DOCTOR_SINGLETON_URL the lifeguard option singleton_database_url
"""

import json
import os

import sqlalchemy.pool
from celery import Celery
from sqlalchemy import create_engine, text
from sqlalchemy.ext.asyncio import create_async_engine

import lifeguard

URL = os.environ.get("DOCTOR_DB_URL", "postgresql+psycopg://postgres@127.0.0.1:5432/postgres")

app = Celery("sqla", broker="memory://")
app.conf.worker_prefetch_multiplier = 1
guard = None
if os.environ.get("DOCTOR_LIFEGUARD", "1") == "1":
    guard = lifeguard.install(
        app,
        pgbouncer_transaction_mode=bool(os.environ.get("DOCTOR_PROFILE")),
        singleton_database_url=os.environ.get("DOCTOR_SINGLETON_URL"),
    )

arguments = json.loads(os.environ.get("DOCTOR_ENGINE_ARGS", "{}"))
if "poolclass" in arguments:  # named in JSON: "NullPool"
    arguments["poolclass"] = getattr(sqlalchemy.pool, arguments["poolclass"])
if os.environ.get("DOCTOR_ASYNC"):
    engine = create_async_engine(URL, **arguments)
else:
    engine = create_engine(URL, **arguments)
    if os.environ.get("DOCTOR_CONNECT"):
        with engine.connect() as connection:
            connection.execute(text("SELECT 1"))
if guard is not None and os.environ.get("DOCTOR_REGISTER"):
    guard.add_engine(engine)


@app.task
def archive(order: int) -> int:
    return order


if os.environ.get("DOCTOR_SINGLETON"):

    @app.task
    @lifeguard.singleton_task(on_busy="skip", engine=engine)
    def nightly_export() -> None:
        pass
