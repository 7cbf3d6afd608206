"""Warm Django connections shared by the greenlets of a gevent/eventlet process.

Under green pools Django's connections are per greenlet, and every task runs in a new
greenlet: without help each task opens and closes a session. Here each managed alias gets
a process-wide set of at most ``green_budget`` driver connections:

* at task end, a connection that passed every end-of-task check (the Django concern's)
  is detached from the greenlet's wrapper, unclosed, into the set;
* at a later task's first query, Django's ``get_new_connection`` (wrapped per backend
  class) takes the warmest one, after the before-reuse checks (the Django concern's:
  socket, status, ``CONN_MAX_AGE``, ping after idle); if none is idle and the budget
  allows, it opens one; otherwise the greenlet waits up to ``green_wait_timeout`` and then
  fails with :class:`GreenBudgetExhausted`, which names the budget. Never a hang, never a
  backend past the budget.

Connections are counted by the driver object: one closed by any path (Django, a discard,
a leak sweep) or garbage-collected frees its place at the next look.
``init_connection_state`` still runs on every take: it only sends a query when the time
zone or role differs, which a connection of the same alias never does.
"""

from __future__ import annotations

import logging
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import LifeguardError
from ..postgres import driver as pgdriver
from ..postgres.slots import fair_share, limits_on

logger = logging.getLogger("lifeguard.green")

#: The default budget when the concurrency does not ask for less.
DEFAULT_BUDGET = 10
#: How often a waiting greenlet looks for connections closed behind the set's back.
_RECHECK = 1.0


class GreenBudgetExhausted(LifeguardError):
    """Every connection of an alias's green budget stayed in use for the whole wait."""


@dataclass
class _Idle:
    raw: Any
    since: float
    close_at: float | None


class GreenBudget:
    """The shared connections of one alias, and the counters ``guard.stats()`` shows."""

    def __init__(self, alias: str, budget: int, wait_timeout: float, *, auto: bool) -> None:
        self.alias = alias
        self.budget = budget
        self.wait_timeout = wait_timeout
        self.auto = auto  # default budget: may still shrink to the database's free slots
        self._idle: list[_Idle] = []  # the warmest last
        # id(raw) -> (a weak reference to it, its driver adapter), for each one in use.
        self._out: dict[int, tuple[weakref.ReferenceType[Any], pgdriver.DriverAdapter | None]] = {}
        self._opening = 0
        self._cond = threading.Condition()  # green under gevent/eventlet's monkey patching
        self.waits = 0
        self.timeouts = 0
        self.peak_in_use = 0
        self.opened = 0
        self.taken_warm = 0

    def _in_use(self) -> int:
        return len(self._out) + self._opening

    def _check_out(self, raw: Any) -> None:
        """Count ``raw`` as in use (with its driver adapter, looked up once)."""
        self._out[id(raw)] = (weakref.ref(raw), pgdriver.adapter_for(raw))

    def _reap(self) -> bool:
        """Forget checked-out connections that were closed or dropped; True if any."""
        dead: list[int] | None = None
        for key, (ref, adapter) in self._out.items():
            raw = ref()
            if raw is None or adapter is None or adapter.is_closed(raw):
                if dead is None:
                    dead = []
                dead.append(key)
        if dead is None:
            return False
        for key in dead:
            del self._out[key]
        return True

    def _has_room(self) -> bool:
        """A place free in the budget? Closed ones are looked for only when it seems
        full: every task end settles (reaps) already."""
        if self._in_use() < self.budget:
            return True
        return self._reap() and self._in_use() < self.budget

    def take(
        self,
        open_new: Callable[[], Any],
        vet: Callable[[_Idle], bool],
    ) -> tuple[Any, bool]:
        """A driver connection for a greenlet's wrapper, and whether it was warm.

        ``vet`` runs the before-reuse checks on an idle one (and discards it if they
        fail); ``open_new`` is Django's own ``get_new_connection``.
        """
        deadline: float | None = None
        while True:
            entry: _Idle | None = None
            with self._cond:
                if self._idle:
                    entry = self._idle.pop()
                    self._check_out(entry.raw)
                elif self._has_room():
                    self._opening += 1
                else:
                    now = time.monotonic()
                    if deadline is None:
                        deadline = now + self.wait_timeout
                        self.waits += 1
                    if now >= deadline:
                        self.timeouts += 1
                        raise GreenBudgetExhausted(self._exhausted_message())
                    self._cond.wait(min(deadline - now, _RECHECK))
                    continue
                self.peak_in_use = max(self.peak_in_use, self._in_use())
            if entry is not None:
                if vet(entry):
                    self.taken_warm += 1
                    return entry.raw, True
                self.settle()  # vet closed it: its place is free again
                continue
            return self._open(open_new), False

    def _open(self, open_new: Callable[[], Any]) -> Any:
        try:
            raw = open_new()
        except BaseException:
            with self._cond:
                self._opening -= 1
                self._cond.notify()
            raise
        if self.auto:
            self.auto = False
            self._fit_free_slots(raw)
        with self._cond:
            self._opening -= 1
            self._check_out(raw)
            self.opened += 1
        return raw

    def _fit_free_slots(self, raw: Any) -> None:
        """A default budget is at most half the slots still free for ordinary roles."""
        limits = limits_on(raw)
        if limits is None or fair_share(limits.free_slots) >= self.budget:
            return
        self.budget = fair_share(limits.free_slots)
        logger.warning(
            "lifeguard: DATABASES[%r] has %d free connection slots: this process's "
            "green budget is %d connections (set the lifeguard option green_budget to "
            "choose it)",
            self.alias,
            limits.free_slots,
            self.budget,
        )

    def hand_back(self, wrapper: Any, since: float) -> None:
        """Detach the wrapper's checked connection, unclosed, into the set."""
        raw = wrapper.connection
        if raw is None:
            return
        with self._cond:
            self._out.pop(id(raw), None)
            self._idle.append(_Idle(raw, since, wrapper.close_at))
            self._cond.notify()
        wrapper.connection = None

    def settle(self) -> None:
        """Wake a waiter if a checked-out connection was closed meanwhile."""
        with self._cond:
            if self._reap():
                self._cond.notify_all()

    def close_idle(self) -> None:
        with self._cond:
            idle, self._idle = self._idle, []
            self._cond.notify_all()
        for entry in idle:
            pgdriver.close_quietly(entry.raw)

    def _exhausted_message(self) -> str:
        return (
            f"lifeguard: all {self.budget} connections of the green budget of "
            f"DATABASES[{self.alias!r}] stayed in use for {self.wait_timeout:g}s "
            f"(green_budget={self.budget}): raise the lifeguard option green_budget "
            "(CELERY_LIFEGUARD_GREEN_BUDGET), or green_wait_timeout to wait longer, or "
            "hold connections for shorter spans in tasks."
        )

    def stats(self) -> dict[str, Any]:
        with self._cond:
            self._reap()
            return {
                "budget": self.budget,
                "in_use": self._in_use(),
                "idle": len(self._idle),
                "peak_in_use": self.peak_in_use,
                "waits": self.waits,
                "wait_timeouts": self.timeouts,
                "opened": self.opened,
                "taken_warm": self.taken_warm,
            }


class GreenConnections:
    """Every alias's budget in this process, and the wrap of ``get_new_connection``."""

    def __init__(self) -> None:
        self.budgets: dict[str, GreenBudget] = {}
        self.native: dict[str, tuple[int, float]] = {}  # pooled alias -> (max_size, timeout)
        self._warm: weakref.WeakSet[Any] = weakref.WeakSet()
        self.vet: Callable[[Any, _Idle], bool] | None = None

    def add(self, wrapper_class: type, budget: GreenBudget) -> None:
        self.budgets[budget.alias] = budget
        self._wrap(wrapper_class)

    def add_native_pool(
        self,
        wrapper_class: type,
        alias: str,
        pool_options: dict[str, Any],
        budget: int,
        wait: float,
    ) -> dict[str, Any]:
        """Django's native pool under green pools: the same budget (its ``max_size``, unless
        set) and the same bounded wait, ending in the same error."""
        options = dict(pool_options)
        options.setdefault("max_size", max(budget, int(options.get("min_size", 4))))
        options.setdefault("timeout", wait)
        self.native[alias] = (int(options["max_size"]), float(options["timeout"]))
        self._wrap(wrapper_class)
        return options

    def _wrap(self, wrapper_class: type) -> None:
        if getattr(wrapper_class, "_lifeguard_green_original", None) is not None:
            return
        original = wrapper_class.get_new_connection  # type: ignore[attr-defined]
        wrapper_class._lifeguard_green_original = original  # type: ignore[attr-defined]
        owner = self

        def get_new_connection(wrapper: Any, conn_params: Any) -> Any:
            found = owner.budgets.get(wrapper.alias)
            if found is None:
                if wrapper.alias in owner.native:
                    return owner._from_native_pool(wrapper, original, conn_params)
                return original(wrapper, conn_params)
            raw, warm = found.take(
                lambda: original(wrapper, conn_params),
                lambda entry: owner.vet is None or owner.vet(wrapper, entry),
            )
            if warm:
                owner._warm.add(wrapper)
            else:
                owner._warm.discard(wrapper)
            return raw

        wrapper_class.get_new_connection = get_new_connection  # type: ignore[attr-defined]

    def _from_native_pool(self, wrapper: Any, original: Any, conn_params: Any) -> Any:
        try:
            return original(wrapper, conn_params)
        except Exception as exc:
            if type(exc).__name__ != "PoolTimeout":
                raise
            max_size, timeout = self.native[wrapper.alias]
            raise GreenBudgetExhausted(
                f"lifeguard: all {max_size} connections of the native pool of "
                f"DATABASES[{wrapper.alias!r}] stayed in use for {timeout:g}s "
                f"(OPTIONS['pool']['max_size']={max_size}, the green budget): raise "
                "max_size, or the lifeguard option green_wait_timeout (or the pool's "
                "'timeout') to wait longer."
            ) from exc

    def took_warm(self, wrapper: Any) -> bool:
        """True when the wrapper's current connection came warm from the set."""
        return wrapper in self._warm

    def hand_back(self, wrapper: Any, since: float) -> bool:
        budget = self.budgets.get(wrapper.alias)
        if budget is None:
            return False
        budget.hand_back(wrapper, since)
        return True

    def settle(self) -> None:
        for budget in self.budgets.values():
            budget.settle()

    def close_idle(self) -> None:
        for budget in self.budgets.values():
            budget.close_idle()

    def stats(self, alias: str) -> dict[str, Any] | None:
        budget = self.budgets.get(alias)
        return budget.stats() if budget is not None else None

    def metric_samples(self) -> list[Any]:
        """Per alias: the budget, connections in use and their peak, waits and timeouts."""
        from .metrics import Sample

        samples = []
        for alias, budget in self.budgets.items():
            figures = budget.stats()
            labels = {"alias": alias}
            for name, key, kind, text in (
                ("django_green_budget", "budget", "gauge", "Connections the greenlets share"),
                ("django_green_in_use", "in_use", "gauge", "Shared connections in use"),
                ("django_green_peak_in_use", "peak_in_use", "gauge", "Most in use at once"),
                ("django_green_waits", "waits", "counter", "Takes that waited for one"),
                ("django_green_wait_timeouts", "wait_timeouts", "counter", "Waits that failed"),
            ):
                samples.append(Sample(name, figures[key], kind, labels, text))
        return samples


def default_budget(concurrency: int | None) -> int:
    """min(concurrency, 10): one-query tasks hold a connection for milliseconds."""
    if not concurrency:
        return DEFAULT_BUDGET
    return max(1, min(concurrency, DEFAULT_BUDGET))
