"""Mistake: a lifeguard option in app.conf the worker refuses (LG002)."""

from celery import Celery

import lifeguard

app = Celery("bad_option", broker="memory://")
app.conf.worker_prefetch_multiplier = 1
app.conf.lifeguard_memory_limit = "lots"
guard = lifeguard.install(app)
