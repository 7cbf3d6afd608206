"""An app with no mistake: lifeguard installed, prefetch 1, late acks decided."""

from celery import Celery

import lifeguard

app = Celery("clean", broker="memory://")
app.conf.worker_prefetch_multiplier = 1
app.conf.task_acks_late = True
app.conf.task_reject_on_worker_lost = False
guard = lifeguard.install(app, memory_growth_limit="300MiB")


@app.task(time_limit=600, soft_time_limit=540)
def export(batch: int) -> int:
    return batch
