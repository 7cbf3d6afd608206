"""Django settings of the sandbox project, read from the environment.

LIFEGUARD_SANDBOX_DB_URL      postgresql://user:password@host:port/name?sslmode=...
LIFEGUARD_SANDBOX_BROKER_URL  broker and result backend (redis://...)
LIFEGUARD_SANDBOX_QUEUE       default queue
LIFEGUARD_SANDBOX_MODE        lifeguard (default) | stock | reuse_max
LIFEGUARD_SANDBOX_PREFIX      application_name prefix (lifeguard), or the whole name (stock)
LIFEGUARD_SANDBOX_CONN_MAX_AGE  seconds, or "none" (default 600)
LIFEGUARD_SANDBOX_POOL        JSON options of Django's native pool ("" = no pool)
LIFEGUARD_SANDBOX_DRIVER      psycopg (default) | psycopg2
LIFEGUARD_SANDBOX_OPTIONS     JSON of extra lifeguard options (CELERY_LIFEGUARD_*)
LIFEGUARD_SANDBOX_QUIET       set: no log line per task (benchmarks)
LIFEGUARD_SANDBOX_MAIN_USES_DB  set: the MainProcess queries once the worker is ready
LIFEGUARD_SANDBOX_RESULTS     "django-db": results in the database (django-celery-results)
"""

from __future__ import annotations

import json
import os
import sys
from typing import Any
from urllib.parse import parse_qsl, unquote, urlsplit

if os.environ.get("LIFEGUARD_SANDBOX_DRIVER") == "psycopg2":
    # Django picks psycopg 3 when it can import it; hide it to exercise psycopg2.
    sys.modules["psycopg"] = None  # type: ignore[assignment]

SECRET_KEY = "lifeguard-sandbox-not-secret"
DEBUG = False
USE_TZ = True
INSTALLED_APPS = ["django.contrib.contenttypes"]

MODE = os.environ.get("LIFEGUARD_SANDBOX_MODE", "lifeguard")
PREFIX = os.environ.get("LIFEGUARD_SANDBOX_PREFIX", "lifeguard")


def _database(url: str) -> dict[str, object]:
    parts = urlsplit(url)
    options: dict[str, object] = dict(parse_qsl(parts.query))
    pool = os.environ.get("LIFEGUARD_SANDBOX_POOL", "")
    if pool:
        options["pool"] = json.loads(pool)
    if MODE != "lifeguard":
        options["application_name"] = f"{PREFIX}:stock"
    max_age = os.environ.get("LIFEGUARD_SANDBOX_CONN_MAX_AGE", "600")
    return {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": parts.path.lstrip("/"),
        "USER": unquote(parts.username or ""),
        "PASSWORD": unquote(parts.password or ""),
        "HOST": parts.hostname or "",
        "PORT": parts.port or "",
        "CONN_MAX_AGE": None if max_age.lower() == "none" else int(max_age),
        "OPTIONS": options,
    }


DB_URL = os.environ.get("LIFEGUARD_SANDBOX_DB_URL", "postgresql://postgres@127.0.0.1:5432/test")
DATABASES = {"default": _database(DB_URL)}

_broker = os.environ.get("LIFEGUARD_SANDBOX_BROKER_URL", "redis://127.0.0.1:6379/0")
CELERY_BROKER_URL = _broker
CELERY_RESULT_BACKEND = _broker
CELERY_TASK_DEFAULT_QUEUE = os.environ.get("LIFEGUARD_SANDBOX_QUEUE", "lifeguard-sandbox")
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True
CELERY_RESULT_EXPIRES = 600
CELERY_WORKER_PREFETCH_MULTIPLIER = 4
CELERY_LIFEGUARD_APPLICATION_NAME_PREFIX = PREFIX
for _name, _value in json.loads(os.environ.get("LIFEGUARD_SANDBOX_OPTIONS", "{}")).items():
    globals()[f"CELERY_LIFEGUARD_{_name.upper()}"] = _value
if os.environ.get("LIFEGUARD_SANDBOX_RESULTS") == "django-db":
    INSTALLED_APPS.append("django_celery_results")
    CELERY_RESULT_BACKEND = "django-db"
if MODE == "reuse_max":
    CELERY_DB_REUSE_MAX = 1_000_000

LOGGING: dict[str, Any] = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    "loggers": {
        "psycopg.pool": {"handlers": ["console"], "level": "WARNING", "propagate": False},
    },
}
if os.environ.get("LIFEGUARD_SANDBOX_QUIET"):
    # Benchmarks: no log line per task (the same saving for every configuration).
    for _logger in ("celery.app.trace", "celery.worker.strategy"):
        LOGGING["loggers"][_logger] = {"level": "WARNING"}
