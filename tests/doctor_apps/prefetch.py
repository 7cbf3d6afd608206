"""Mistake: Celery's default prefetch (4) with a long task (LG006).

DOCTOR_PREFETCH: worker_prefetch_multiplier (default: unset, Celery's 4).
"""

import os

from celery import Celery

import lifeguard

app = Celery("prefetch", broker="memory://")
if os.environ.get("DOCTOR_PREFETCH"):
    app.conf.worker_prefetch_multiplier = int(os.environ["DOCTOR_PREFETCH"])
guard = lifeguard.install(app)


@app.task(time_limit=3600)
def rebuild_index() -> None:
    pass


@app.task(time_limit=5)
def ping() -> str:
    return "pong"
