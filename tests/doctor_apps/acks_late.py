"""Mistake: late acknowledgement without a decision on reject_on_worker_lost (LG005).

DOCTOR_APP_ACKS_LATE=1: task_acks_late for the whole app (else one task sets it);
DOCTOR_DECIDED=1: the decision is written (task_reject_on_worker_lost=False, and the
task's own reject_on_worker_lost=True).
"""

import os

from celery import Celery

import lifeguard

app = Celery("acks_late", broker="memory://")
app.conf.worker_prefetch_multiplier = 1
decided = bool(os.environ.get("DOCTOR_DECIDED"))
if os.environ.get("DOCTOR_APP_ACKS_LATE"):
    app.conf.task_acks_late = True
if decided:
    app.conf.task_reject_on_worker_lost = False
guard = lifeguard.install(app)


@app.task(acks_late=True, **({"reject_on_worker_lost": True} if decided else {}))
def charge(order: int) -> int:
    return order


@app.task
def notify(order: int) -> int:
    return order
