"""Settings of the doctor's Django project, from the environment.

DOCTOR_DB_URL     postgresql://user@host:port/name of DATABASES['default']
DOCTOR_DATABASE   JSON merged into DATABASES['default'] (CONN_MAX_AGE, OPTIONS, ...);
                  CONN_MAX_AGE is 600 unless given
DOCTOR_SETTINGS   JSON of extra settings (CELERY_WORKER_POOL, CELERY_DB_REUSE_MAX, ...)
"""

import json
import os
from urllib.parse import urlsplit

SECRET_KEY = "doctor-tests-not-secret"
USE_TZ = True
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "lifeguard.contrib.django",
    "tests.doctor_apps.djproj",
]

_url = urlsplit(os.environ.get("DOCTOR_DB_URL", "postgresql://postgres@127.0.0.1:5432/postgres"))
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": _url.path.lstrip("/"),
        "USER": _url.username or "",
        "HOST": _url.hostname or "",
        "PORT": _url.port or "",
        "CONN_MAX_AGE": 600,
        **json.loads(os.environ.get("DOCTOR_DATABASE", "{}")),
    }
}

CELERY_BROKER_URL = "memory://"
CELERY_WORKER_PREFETCH_MULTIPLIER = 1
globals().update(json.loads(os.environ.get("DOCTOR_SETTINGS", "{}")))
