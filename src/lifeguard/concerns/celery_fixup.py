"""Living with Celery's built-in Django fixup (``celery.fixups.django``).

Celery installs the fixup by itself when ``DJANGO_SETTINGS_MODULE`` is set. Its setup
duties stay as they are: ``django.setup()`` and system checks before tasks are imported,
``DjangoTask`` as the task class, closing the MainProcess's connections when the worker
starts, closing Django's caches. Its connection duties are taken over by lifeguard,
because they defeat reuse:

* Celery 5.6+ closes every connection before and after every task (and, with Django's
  native pool under prefork, closes the whole pool), ignoring ``CONN_MAX_AGE``;
* Celery 5.4/5.5 call ``close_if_unusable_or_obsolete()``, which keeps a connection a
  soft time limit interrupted mid-query (Django ticket #30646).

So its ``task_prerun``, ``task_postrun`` and ``worker_process_init`` receivers are
disconnected, and :class:`CeleryDjangoFixup` performs their non-connection parts (cache
closing, re-running ``django.setup()`` in spawned children) at the same moments.
"""

from __future__ import annotations

import logging
import os
from typing import Any

from celery import signals

logger = logging.getLogger("lifeguard.django")

# (signal, method of DjangoWorkerFixup) pairs whose work lifeguard takes over.
_TAKEN_OVER = (
    ("task_prerun", "on_task_prerun"),
    ("task_postrun", "on_task_postrun"),
    ("worker_process_init", "on_worker_process_init"),
)


class CeleryDjangoFixup:
    """The app's ``DjangoWorkerFixup``, with its per-task connection closing switched off."""

    def __init__(self, worker_fixup: Any) -> None:
        self.worker_fixup = worker_fixup
        self._taken_over = False

    @classmethod
    def of(cls, app: Any) -> CeleryDjangoFixup | None:
        """The fixup Celery installed on ``app``, or None (no Django, or ``fixups=[]``)."""
        for fixup in getattr(app, "_fixups", None) or ():
            if fixup is not None and hasattr(fixup, "worker_fixup"):
                return cls(fixup.worker_fixup)
        return None

    def take_over_connections(self) -> None:
        """Disconnect the fixup's per-task and after-fork connection handling.

        Celery connects those receivers in its own ``worker_init`` receiver, which was
        connected when the app was created, so before ours: they are connected by now.
        If a Celery version ever connects them later, the wrapped ``install`` catches it.
        """
        self._disconnect()
        original_install = self.worker_fixup.install

        def install_then_hand_over(*args: Any, **kwargs: Any) -> Any:
            result = original_install(*args, **kwargs)
            self._disconnect()
            return result

        self.worker_fixup.install = install_then_hand_over
        self._taken_over = True

    def _disconnect(self) -> None:
        for signal_name, method_name in _TAKEN_OVER:
            receiver = getattr(self.worker_fixup, method_name, None)
            if receiver is not None:
                getattr(signals, signal_name).disconnect(receiver)

    def after_fork(self) -> None:
        """The non-connection half of the fixup's ``worker_process_init`` receiver."""
        if os.environ.get("FORKED_BY_MULTIPROCESSING"):
            self.worker_fixup.validate_models()
        self.close_caches()

    def close_caches(self) -> None:
        """The fixup closes Django's caches after every task; keep doing it."""
        try:
            self.worker_fixup.close_cache()
        except Exception:
            logger.debug("closing Django caches failed", exc_info=True)
