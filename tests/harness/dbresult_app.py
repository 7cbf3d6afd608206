"""A Celery app whose results go to Celery's SQLAlchemy backend (``db+postgresql+psycopg``).

``celery -A tests.harness.dbresult_app worker``; tests/test_result_backends.py builds them.
Configured by environment variables:

LIFEGUARD_SANDBOX_DB_URL        postgresql://user:password@host:port/name (the results)
LIFEGUARD_SANDBOX_BROKER_URL    the broker (redis://...)
LIFEGUARD_SANDBOX_QUEUE         default queue
LIFEGUARD_SANDBOX_MODE          lifeguard (default) | stock
LIFEGUARD_SANDBOX_PREFIX        application_name prefix; stock names its sessions
                                ``<prefix>:stock`` itself, so tests can find them
"""

from __future__ import annotations

import os

from celery import Celery

import lifeguard

APP = "tests.harness.dbresult_app"

MODE = os.environ.get("LIFEGUARD_SANDBOX_MODE", "lifeguard")
PREFIX = os.environ.get("LIFEGUARD_SANDBOX_PREFIX", "lifeguard")
DB_URL = os.environ.get("LIFEGUARD_SANDBOX_DB_URL", "postgresql://postgres@127.0.0.1:5432/test")


def result_backend_url(db_url: str) -> str:
    """Celery's spelling of a SQLAlchemy result backend on psycopg 3."""
    return "db+postgresql+psycopg://" + db_url.split("://", 1)[1]


app = Celery(
    "lifeguard_dbresult_sandbox",
    broker=os.environ.get("LIFEGUARD_SANDBOX_BROKER_URL", "redis://127.0.0.1:6379/0"),
    backend=result_backend_url(DB_URL),
)
app.conf.task_default_queue = os.environ.get("LIFEGUARD_SANDBOX_QUEUE", "lifeguard-dbresult")
app.conf.broker_connection_retry_on_startup = True
if MODE == "stock":
    app.conf.database_engine_options = {
        **(app.conf.database_engine_options or {}),  # Celery 5.5 has no defaults
        "connect_args": {"application_name": f"{PREFIX}:stock"},
    }
else:
    lifeguard.install(app, application_name_prefix=PREFIX)


@app.task
def add(x: int, y: int) -> int:
    return x + y
