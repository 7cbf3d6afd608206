"""The sandbox's Celery app: ``celery -A lifeguard.demo.project.celery_app worker``."""

from __future__ import annotations

import os

from celery import Celery

import lifeguard

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "lifeguard.demo.project.settings")

app = Celery("lifeguard_sandbox")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.include = ["lifeguard.demo.project.tasks"]

guard = None
if os.environ.get("LIFEGUARD_SANDBOX_MODE", "lifeguard") == "lifeguard":
    guard = lifeguard.install(app)

if os.environ.get("LIFEGUARD_SANDBOX_MAIN_USES_DB"):
    # Simulates user code that queries from the MainProcess once the worker is up (a
    # worker_ready handler, a result backend writing from the parent): children forked
    # later inherit that connection, and its pool when Django's pool is on.
    from celery.signals import worker_ready

    @worker_ready.connect(weak=False)
    def _main_process_query(**_: object) -> None:
        from django.db import connection

        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
