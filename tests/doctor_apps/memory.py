"""Mistake: memory limits below the RSS a worker process starts with (LG004).

DOCTOR_CELERY_LIMIT: worker_max_memory_per_child in KiB (default 512, i.e. 0.5 MiB);
DOCTOR_LIFEGUARD_LIMIT: lifeguard's memory_limit (default unset).
"""

import os

from celery import Celery

import lifeguard

app = Celery("memory", broker="memory://")
app.conf.worker_prefetch_multiplier = 1
app.conf.worker_max_memory_per_child = int(os.environ.get("DOCTOR_CELERY_LIMIT", "512"))
options = {}
if os.environ.get("DOCTOR_LIFEGUARD_LIMIT"):
    options["memory_limit"] = os.environ["DOCTOR_LIFEGUARD_LIMIT"]
guard = lifeguard.install(app, **options)
