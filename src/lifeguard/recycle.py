"""How a worker process leaves between tasks without losing one: behind
:meth:`lifeguard.lifecycle.Lifecycle.request_recycle`.

**prefork** (:class:`ChildExit`): the child leaves billiard's ``Worker.workloop`` at
the very point where ``--max-tasks-per-child`` and ``--max-memory-per-child`` make it
leave, with the same exit status (``EX_RECYCLE``), and the pool forks a replacement:

1. the request is made in ``task_postrun``, after Celery stored the task's result;
2. ``workloop`` sends the task's READY message to the MainProcess, then asks for the
   next job through ``Worker.wait_for_job``, which :class:`ChildExit` wraps: instead
   of reading a job it calls ``sys.exit(EX_RECYCLE)``;
3. ``workloop``'s ``finally`` waits until the MainProcess has consumed every READY the
   child sent (``_ensure_messages_consumed``); the MainProcess stores the outcome and,
   for ``acks_late`` tasks, acknowledges the message in the handler of that READY;
4. a job the MainProcess wrote to this child's pipe meanwhile was never read, so never
   accepted: when the child is gone, Celery's ``AsynPool.on_job_process_down`` /
   ``on_partial_read`` put it back to be sent to another child.

**threads, gevent, eventlet, solo** (:class:`WarmShutdown`): one process runs every task,
and no pool replaces it. The request sets ``celery.worker.state.should_stop``, the flag
Celery's own SIGTERM handler sets: the consumer stops taking messages, the tasks already
handed to the pool finish, unacknowledged messages go back to the broker, and the worker
exits, for the process supervisor to start it again.
"""

from __future__ import annotations

import logging
import sys
from collections.abc import Callable
from typing import Any

logger = logging.getLogger("lifeguard")

EX_RECYCLE = 0x9B  # billiard.pool.EX_RECYCLE: "the child exited to be replaced"


class ProcessExit:
    """A way for the process that runs tasks to leave once its current task is handed over."""

    #: What happens, for the log line: "...; <outcome>".
    outcome = ""

    def __init__(self) -> None:
        self.requested = False

    def request(self) -> None:
        self.requested = True


class ChildExit(ProcessExit):
    """prefork: the billiard pool child exits as if it had reached max_tasks_per_child."""

    outcome = "the child exits once its result reached the MainProcess; the pool forks a new one"

    @classmethod
    def install(cls) -> ChildExit | None:
        """Wrap this child's ``wait_for_job``; None if this is not a billiard pool child.

        Must run before ``workloop`` starts, which copies the method into a local:
        ``worker_process_init`` is sent from the child's initializer, in time.
        """
        from billiard.process import current_process

        worker = getattr(current_process(), "_target", None)
        wait_for_job: Callable[..., Any] | None = getattr(worker, "wait_for_job", None)
        if worker is None or wait_for_job is None or not hasattr(worker, "workloop"):
            return None
        child_exit = cls()

        def wait_for_job_unless_recycling(*args: Any, **kwargs: Any) -> Any:
            if child_exit.requested:
                # billiard's Worker.__call__ records this status and exits with it.
                sys.exit(EX_RECYCLE)
            return wait_for_job(*args, **kwargs)

        worker.wait_for_job = wait_for_job_unless_recycling
        return child_exit


class WarmShutdown(ProcessExit):
    """Pools that cannot replace their process: Celery's warm shutdown of the whole worker."""

    def __init__(self, exit_code: int) -> None:
        super().__init__()
        self.exit_code = exit_code
        self.outcome = (
            "warm shutdown of the worker after its running tasks (exit status "
            f"{exit_code}): the process supervisor must start it again"
        )

    def request(self) -> None:
        from celery.worker import state

        super().request()
        if state.should_stop is None or state.should_stop is False:
            state.should_stop = self.exit_code


class Unavailable(ProcessExit):
    """A forked process lifeguard does not know how to replace (a custom pool)."""

    outcome = "nothing: this pool's processes cannot be recycled by lifeguard"


def for_process(forked: bool, shutdown_exit_code: int, *, too_late: bool) -> ProcessExit:
    """The exit mechanism for the process that is starting to run tasks.

    ``too_late``: the process is already running a task (it forked without sending
    ``worker_process_init``), so a billiard loop could no longer be changed.
    """
    if not forked:
        return WarmShutdown(shutdown_exit_code)
    child_exit = None if too_late else ChildExit.install()
    if child_exit is None:
        logger.warning(
            "lifeguard: this pool's child process is not a billiard pool worker; "
            "memory limits cannot recycle it"
        )
        return Unavailable()
    return child_exit
