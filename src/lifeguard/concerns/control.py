"""lifeguard's remote-control command: a worker's MainProcess reports its task processes.

Celery workers answer remote-control commands (``app.control.broadcast``, ``celery
inspect``) in their MainProcess, from any host that reaches the broker. lifeguard adds
one, ``lifeguard_processes``, registered at worker start by :class:`RemoteControl`::

    $ celery -A proj inspect lifeguard_processes
    -> celery@web-1: OK
        {'lifeguard': '0.1.0', 'pid': 4242, 'pool': 'prefork', 'concurrency': 2,
         'prefix': 'lifeguard', 'main_rss': 84213760,
         'processes': [{'pid': 4250, 'rss': 80125952}, {'pid': 4251, 'rss': 80257024}]}

``processes`` are the processes that run tasks (the prefork children, else the worker
itself), with their current RSS in bytes read by the MainProcess from
``/proc/<pid>/statm``: ``lifeguard validate`` samples every worker's memory this way,
wherever the worker runs. Asking a worker without lifeguard makes it log a
``pidbox command error``, so ask only workers whose app installs lifeguard.
"""

from __future__ import annotations

import os
from typing import Any

from ..hooks import Hook, WorkerInfo

COMMAND = "lifeguard_processes"


class RemoteControl(Hook):
    """Registers :data:`COMMAND` in the worker's MainProcess when it starts."""

    name = "control"

    def on_worker_start(self, worker: WorkerInfo) -> None:
        register()


def register() -> None:
    """Add the command to Celery's registry (process-wide; calling again does nothing)."""
    from celery.worker.control import Panel, inspect_command

    if COMMAND not in Panel.data:
        inspect_command(name=COMMAND)(lifeguard_processes)


def lifeguard_processes(state: Any) -> dict[str, Any]:
    """The worker's task processes with their RSS (the answer to :data:`COMMAND`)."""
    from ..procfs import process_rss
    from ..registry import lookup
    from ..version import __version__

    guard = lookup(state.app)
    worker = guard.lifecycle.worker if guard is not None else None
    pool = getattr(getattr(state, "consumer", None), "pool", None)
    info: dict[str, Any] = dict(getattr(pool, "info", None) or {})
    main = os.getpid()
    forks = worker.pool.forks if worker is not None else "processes" in info
    pids = [int(pid) for pid in info.get("processes", ())] if forks else [main]
    return {
        "lifeguard": __version__,
        "pid": main,
        "pool": worker.pool.value if worker is not None else None,
        "concurrency": (worker.concurrency if worker is not None else None)
        or info.get("max-concurrency"),
        "prefix": guard.options.application_name_prefix if guard is not None else None,
        "main_rss": process_rss(main),
        "processes": [{"pid": pid, "rss": process_rss(pid)} for pid in pids],
    }
