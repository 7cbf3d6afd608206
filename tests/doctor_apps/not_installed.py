"""Mistake: lifeguard is not installed (LG001)."""

from celery import Celery

app = Celery("not_installed", broker="memory://")
app.conf.worker_prefetch_multiplier = 1


@app.task
def add(x: int, y: int) -> int:
    return x + y
