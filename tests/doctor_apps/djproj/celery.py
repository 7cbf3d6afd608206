"""The project's Celery app. DOCTOR_LIFEGUARD=0: lifeguard not installed."""

import os

from celery import Celery

import lifeguard

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.doctor_apps.djproj.settings")

app = Celery("djproj")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()

guard = lifeguard.install(app) if os.environ.get("DOCTOR_LIFEGUARD", "1") == "1" else None
