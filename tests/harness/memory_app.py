"""A plain Celery app (no Django, no database) whose tasks leak, spike or do nothing.

``celery -A tests.harness.memory_app worker``; configured by the environment:

LIFEGUARD_SANDBOX_BROKER_URL  broker and result backend (redis://...)
LIFEGUARD_SANDBOX_QUEUE       default queue
LIFEGUARD_SANDBOX_MODE        lifeguard (default) | stock (lifeguard not installed)
LIFEGUARD_SANDBOX_OPTIONS     JSON of lifeguard options (lifeguard_* configuration keys)
LIFEGUARD_SANDBOX_ACKS_LATE   1 to acknowledge tasks after they ran
"""

from __future__ import annotations

import json
import os
import time
from typing import Any

from celery import Celery, current_task

import lifeguard

MIB = 1024 * 1024

app = Celery("lifeguard_memory_sandbox")
_broker = os.environ.get("LIFEGUARD_SANDBOX_BROKER_URL", "redis://127.0.0.1:6379/0")
app.conf.update(
    broker_url=_broker,
    result_backend=_broker,
    task_default_queue=os.environ.get("LIFEGUARD_SANDBOX_QUEUE", "lifeguard-memory"),
    task_acks_late=os.environ.get("LIFEGUARD_SANDBOX_ACKS_LATE", "") == "1",
    broker_connection_retry_on_startup=True,
    result_expires=600,
    worker_prefetch_multiplier=4,
)
for _name, _value in json.loads(os.environ.get("LIFEGUARD_SANDBOX_OPTIONS", "{}")).items():
    app.conf[f"lifeguard_{_name}"] = _value

guard = None
if os.environ.get("LIFEGUARD_SANDBOX_MODE", "lifeguard") == "lifeguard":
    guard = lifeguard.install(app)

# What the leaking task keeps forever, like a cache that never forgets.
LEAKED: list[bytes] = []


def executions_key(queue: str) -> str:
    """Redis hash counting how many times each task id ran (on the result backend)."""
    return f"lifeguard:executions:{queue}"


def _count_execution() -> None:
    key = executions_key(app.conf.task_default_queue)
    app.backend.client.hincrby(key, current_task.request.id, 1)


def _touched(size: int) -> bytes:
    """``size`` bytes that are really resident (every page written)."""
    return b"\x01" * size


@app.task
def leak(mib: float, seconds: float = 0.0) -> dict[str, Any]:
    """Keeps ``mib`` MiB for the life of the process."""
    _count_execution()
    LEAKED.append(_touched(int(mib * MIB)))
    time.sleep(seconds)
    return {"pid": os.getpid(), "leaked_mib": len(LEAKED) * mib}


@app.task
def spike(mib: float) -> dict[str, Any]:
    """Allocates ``mib`` MiB and frees it before returning: no growth, a high peak."""
    _count_execution()
    buffer = _touched(int(mib * MIB))
    size = len(buffer)
    del buffer
    return {"pid": os.getpid(), "size": size}


@app.task
def steady() -> dict[str, Any]:
    """Allocates a little and keeps nothing."""
    _count_execution()
    scratch = [str(i) for i in range(1000)]
    return {"pid": os.getpid(), "items": len(scratch)}


@app.task
def noop() -> None:
    """The benchmark's task: nothing at all."""


@app.task
def guard_stats() -> dict[str, Any] | None:
    """lifeguard's figures of the process that runs this task."""
    return guard.stats() if guard is not None else None


@app.task
def pid() -> int:
    return os.getpid()
