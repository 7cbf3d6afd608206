"""The app the plugin's worker loads: ``celery -A lifeguard.pytest.worker_app worker``.

It imports the user's app (``LIFEGUARD_PYTEST_APP``, e.g. ``proj.celery`` or
``proj.celery:app``), installs lifeguard on it when the app does not, points it at the
broker, result backend and test databases the plugin chose, and adds the
:class:`~lifeguard.pytest.recorder.Recorder`. The app itself is not changed on disk.
"""

from __future__ import annotations

import json
import os
from typing import Any

from celery.app.utils import find_app

import lifeguard
from lifeguard.pytest.recorder import (
    ENV_APP,
    ENV_BACKEND,
    ENV_BROKER,
    ENV_DATABASES,
    ENV_EVENTS,
    Recorder,
)


def _load() -> Any:
    if not os.environ.get(ENV_APP) or not os.environ.get(ENV_EVENTS):
        raise RuntimeError(
            "lifeguard.pytest.worker_app is the pytest plugin's worker app: the plugin "
            f"starts it with {ENV_APP} and {ENV_EVENTS} set"
        )
    app = find_app(os.environ[ENV_APP])
    if os.environ.get(ENV_BROKER):
        app.conf.broker_url = os.environ[ENV_BROKER]
    if os.environ.get(ENV_BACKEND):
        app.conf.result_backend = os.environ[ENV_BACKEND]
    names = json.loads(os.environ.get(ENV_DATABASES) or "{}")
    if names:
        from django.conf import settings

        for alias, name in names.items():
            settings.DATABASES[alias]["NAME"] = name
    guard = lifeguard.current_guard(app) or lifeguard.install(app)
    recorder = Recorder(os.environ[ENV_EVENTS])
    # First in the list: hooks leave in reverse order, so its after_task runs last and
    # its "done" line follows every count of the task.
    guard.hooks.insert(0, recorder)
    recorder.bind(guard)
    guard.lifecycle.hooks_changed()
    return app


app = _load()
