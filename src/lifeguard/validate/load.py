"""The load: the validated task sent through the user's own app, its outcomes collected.

:class:`Load` keeps at most ``in_flight`` tasks sent and unfinished (all at once when
not limited), until ``count`` were sent or a deadline passed, then waits for the last
ones. A task is finished when the result backend holds its outcome, so validation
needs a result backend: with a key-value one (Redis, memcached, ...) all unfinished
tasks are checked in one round trip (``get_many``), otherwise one by one.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from .workers import CannotValidate

#: Seconds between two checks of the unfinished tasks when none finished: short when few
#: are unfinished (a small --concurrency must not leave the workers waiting for us).
POLL_INTERVAL = 0.01
POLL_INTERVAL_MANY = 0.05
_MANY = 100
_ERROR_CHARS = 160


@dataclass
class Outcomes:
    """What happened to the tasks of a phase (or of several)."""

    sent: int = 0
    succeeded: int = 0
    failed: int = 0  # FAILURE, REVOKED, ... anything but SUCCESS
    errors: Counter[str] = field(default_factory=Counter)  # "Type: message" -> count
    done_at: list[float] = field(default_factory=list)  # t at which each success was seen
    failed_at: list[float] = field(default_factory=list)
    first_sent_at: float | None = None
    last_sent_at: float | None = None
    last_done_at: float | None = None

    @property
    def finished(self) -> int:
        return self.succeeded + self.failed

    @property
    def unfinished(self) -> int:
        return self.sent - self.finished

    def merge(self, other: Outcomes) -> Outcomes:
        def known(*values: float | None) -> list[float]:
            return [value for value in values if value is not None]

        firsts = known(self.first_sent_at, other.first_sent_at)
        return Outcomes(
            sent=self.sent + other.sent,
            succeeded=self.succeeded + other.succeeded,
            failed=self.failed + other.failed,
            errors=self.errors + other.errors,
            done_at=self.done_at + other.done_at,
            failed_at=self.failed_at + other.failed_at,
            first_sent_at=min(firsts, default=None),
            last_sent_at=max(known(self.last_sent_at, other.last_sent_at), default=None),
            last_done_at=max(known(self.last_done_at, other.last_done_at), default=None),
        )

    def to_json(self) -> dict[str, Any]:
        seconds = (
            self.last_done_at - self.first_sent_at
            if self.last_done_at is not None and self.first_sent_at is not None
            else None
        )
        return {
            "sent": self.sent,
            "succeeded": self.succeeded,
            "failed": self.failed,
            "unfinished": self.unfinished,
            "errors": dict(self.errors.most_common(10)),
            "seconds": None if seconds is None else round(seconds, 3),
            "per_second": round(self.finished / seconds, 1) if seconds else None,
        }


class ResultPoller:
    """Which of the sent tasks have finished, and how."""

    def __init__(self, app: Any) -> None:
        from celery.backends.base import DisabledBackend, KeyValueStoreBackend

        self.app = app
        self.backend = app.backend
        if isinstance(self.backend, DisabledBackend):
            raise CannotValidate(
                "the app has no result backend: lifeguard validate reads each task's outcome "
                "from it. Configure result_backend (e.g. the broker's redis://) for the app "
                "and its workers"
            )
        self.batched = isinstance(self.backend, KeyValueStoreBackend)

    def finished(self, task_ids: list[str]) -> dict[str, tuple[str, Any]]:
        """``{task id: (state, result)}`` of those that finished."""
        if not task_ids:
            return {}
        if self.batched:
            metas = self.backend.get_many(task_ids, interval=0, max_iterations=1, no_ack=True)
            return {str(task_id): (meta["status"], meta.get("result")) for task_id, meta in metas}
        done = {}
        for task_id in task_ids:
            result = self.app.AsyncResult(task_id)
            if result.ready():
                done[task_id] = (result.state, result.result)
        return done


@dataclass(frozen=True)
class TaskCall:
    """The task to send: name, arguments, queue."""

    name: str
    args: tuple[Any, ...] = ()
    kwargs: dict[str, Any] = field(default_factory=dict)
    queue: str = "celery"


class Load:
    """Sends a task through ``app`` and follows every copy to its end."""

    def __init__(self, app: Any, call: TaskCall, clock: Callable[[], float]) -> None:
        self.app = app
        self.call = call
        self.clock = clock
        self.poller = ResultPoller(app)

    def run(
        self,
        *,
        count: int | None = None,
        until: float | None = None,
        in_flight: int | None = None,
        timeout: float = 300.0,
        on_progress: Callable[[Outcomes, int], None] | None = None,
    ) -> Outcomes:
        """Send until ``count`` tasks were sent or the clock reaches ``until``, at most
        ``in_flight`` unfinished at a time; then wait up to ``timeout`` seconds after the
        last send for the rest. Tasks still unfinished then count as ``unfinished``."""
        if count is None and until is None:
            raise ValueError("give count, until, or both")
        if count is None and in_flight is None:
            raise ValueError("a load bounded by time needs in_flight")
        outcomes = Outcomes()
        pending: list[str] = []
        last_sent = self.clock()
        while True:
            now = self.clock()
            sending = (count is None or outcomes.sent < count) and (until is None or now < until)
            while sending and (in_flight is None or len(pending) < in_flight):
                pending.append(self._send())
                outcomes.sent += 1
                last_sent = outcomes.last_sent_at = self.clock()
                if outcomes.first_sent_at is None:
                    outcomes.first_sent_at = last_sent
                sending = count is None or outcomes.sent < count
            if not pending and not sending:
                break
            finished = self.poller.finished(pending)
            if finished:
                seen = self.clock()
                for state, result in finished.values():
                    self._record(outcomes, state, result, seen)
                pending = [task_id for task_id in pending if task_id not in finished]
            if on_progress is not None:
                on_progress(outcomes, len(pending))
            if not sending and pending and self.clock() - last_sent > timeout:
                break
            if not finished:
                time.sleep(POLL_INTERVAL if len(pending) < _MANY else POLL_INTERVAL_MANY)
        return outcomes

    def _send(self) -> str:
        call = self.call
        result = self.app.send_task(call.name, args=call.args, kwargs=call.kwargs, queue=call.queue)
        return str(result.id)

    @staticmethod
    def _record(outcomes: Outcomes, state: str, result: Any, seen: float) -> None:
        outcomes.last_done_at = seen
        if state == "SUCCESS":
            outcomes.succeeded += 1
            outcomes.done_at.append(seen)
            return
        outcomes.failed += 1
        outcomes.failed_at.append(seen)
        if isinstance(result, BaseException):
            text = f"{type(result).__name__}: {' '.join(str(result).split())}"
        else:
            text = f"{state}: {result!r}"
        outcomes.errors[text[:_ERROR_CHARS]] += 1
