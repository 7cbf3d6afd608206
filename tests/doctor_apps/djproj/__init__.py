"""A Django project laid out as Celery's Django guide says: the package imports its
Celery app, so Django's start creates it (and installs lifeguard on it)."""

from tests.doctor_apps.djproj.celery import app as celery_app

__all__ = ["celery_app"]
