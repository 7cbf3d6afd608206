"""Mistake: recycling settings on the threads pool, which ignores them (LG003)."""

from celery import Celery

import lifeguard

app = Celery("recycling", broker="memory://")
app.conf.worker_prefetch_multiplier = 1
app.conf.worker_pool = "threads"
app.conf.worker_concurrency = 8
app.conf.worker_max_tasks_per_child = 100
app.conf.worker_max_memory_per_child = 400_000  # KiB
guard = lifeguard.install(app)
