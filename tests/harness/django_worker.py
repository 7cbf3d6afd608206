"""Workers of the demo's Django project for tests and benchmarks: the project's tasks plus
the ones only tests and benchmarks run (``tests/harness/django_tasks.py``)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lifeguard.demo.project import TASKS as PROJECT_TASKS
from lifeguard.demo.project import sandbox_worker as project_worker
from lifeguard.demo.worker import CeleryWorker

TASKS = "tests.harness.django_tasks"

__all__ = ["PROJECT_TASKS", "TASKS", "sandbox_worker"]


def sandbox_worker(*, args: Sequence[str] = (), **knobs: Any) -> CeleryWorker:
    """``lifeguard.demo.project.sandbox_worker`` that also imports this harness's tasks."""
    return project_worker(args=["--include", TASKS, *args], **knobs)
