"""The sandbox's Celery app: ``celery -A lifeguard.sandbox.django_project.celery_app worker``."""

from __future__ import annotations

import os

from celery import Celery

import lifeguard

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "lifeguard.sandbox.django_project.settings")

app = Celery("lifeguard_sandbox")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.conf.include = ["lifeguard.sandbox.django_project.tasks"]

guard = None
if os.environ.get("LIFEGUARD_SANDBOX_MODE", "lifeguard") == "lifeguard":
    guard = lifeguard.install(app)
