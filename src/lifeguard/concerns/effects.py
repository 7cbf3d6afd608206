"""External side effects (an email, a payment, an upload), claimed and completed on PostgreSQL.

A database transaction cannot hold an HTTP call, so ``effect`` splits it in two around the
call, on a connection of its own in autocommit (no transaction stays open meanwhile):

1. take a session-level advisory lock of the key (the server drops it the moment this
   session ends: SIGKILL, OOM, a deploy), then commit a claim row in ``lifeguard_once``;
2. the body makes the call, with ``effect.idempotency_key`` for the remote API;
3. commit the completion (state ``done`` and the result), then close the connection.

A rerun of the key (a redelivery, a retry, a second send of the same business key) takes
the lock first. Held: the owner is alive; it waits (``on_busy``). Free, and the claim is
``done``: it returns the stored result without running. Free, and the claim is still
``claimed``: its owner died (or raised) between claim and completion, so nobody knows if
the effect happened, and ``on_orphan`` decides: ``"rerun"`` (at least once, same
idempotency key), ``"skip"`` (at most once) or ``"fail"`` (:class:`EffectOrphaned` until an
operator resolves it: ``lifeguard effects``). No timer decides that an owner is dead.

docs/once.md says which guarantee each choice gives.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import json
import os
import socket
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Any, Literal, TypedDict, TypeVar

from .. import stats
from ..errors import ConfigurationError, LifeguardError
from ..postgres import once_sql as sql
from .once import _dedicated_connection, _dumps, _task, count

if TYPE_CHECKING:
    from typing_extensions import Unpack

F = TypeVar("F", bound=Callable[..., Any])
OnOrphan = Literal["rerun", "skip", "fail"]
EffectOnBusy = Literal["wait", "raise", "retry"]
EffectStatus = Literal["claimed", "reclaimed", "done", "skipped"]
Key = str | Callable[..., str] | None

ON_ORPHAN = ("rerun", "skip", "fail")
ON_BUSY = ("wait", "raise", "retry")
# uuid5 namespace of idempotency keys: the same key gives the same idempotency key in every
# process, on every run, and after its row is pruned.
IDEMPOTENCY_NAMESPACE = uuid.UUID("5f0c6f1e-3a57-5d8e-9a65-6c1f0e1d2a7b")


def idempotency_key(key: str) -> str:
    """The idempotency key the remote API gets for ``key`` (a UUID, as Stripe recommends)."""
    return str(uuid.uuid5(IDEMPOTENCY_NAMESPACE, key))


class Effect:
    """What an ``effect`` block sees.

    ``status`` says what this run found when the block began. ``done`` is True when the
    body must not run: the effect was completed by an earlier
    run (``status == "done"``, ``result`` is its stored result) or its orphaned claim was
    skipped by ``on_orphan="skip"`` (``status == "skipped"``). Otherwise ``status`` is
    ``"claimed"`` (the first run) or ``"reclaimed"`` (a rerun after the owner died:
    ``orphaned_claim_at`` says when that claim was made) and the body runs, passes
    ``idempotency_key`` to the remote API and sets ``result`` (JSON), stored at completion.
    """

    def __init__(self, key: str, status: EffectStatus, result: Any = None) -> None:
        self.key = key
        self.idempotency_key = idempotency_key(key)
        self.status: EffectStatus = status
        self._result = result
        self.orphaned_claim_at: datetime | None = None
        self.waited = False

    @property
    def done(self) -> bool:
        return self.status in ("done", "skipped")

    @property
    def orphaned(self) -> bool:
        """This run found a claim whose owner had died (and reran or skipped it)."""
        return self.orphaned_claim_at is not None

    @property
    def result(self) -> Any:
        return self._result

    @result.setter
    def result(self, value: Any) -> None:
        _dumps(value, self.key)  # fails here, in the body, rather than at completion
        self._result = value

    def __repr__(self) -> str:
        return f"Effect(key={self.key!r}, status={self.status!r})"


class EffectBusy(LifeguardError):
    """The key's owner is alive (its lock is held): ``on_busy="raise"``, or ``"wait"``
    for longer than ``timeout``."""


class EffectOrphaned(LifeguardError):
    """``on_orphan="fail"``: the key was claimed, and its owner died (or raised) before it
    completed. Whether the effect happened is unknown; the claim stays, and every run of
    the key fails so, until an operator resolves it (``lifeguard effects resolve``)."""

    def __init__(
        self,
        message: str,
        *,
        key: str | None = None,
        task_name: str | None = None,
        claimed_at: datetime | None = None,
        claimed_by: str | None = None,
    ) -> None:
        super().__init__(message)
        self.key = key
        self.task_name = task_name
        self.claimed_at = claimed_at
        self.claimed_by = claimed_by


_current: contextvars.ContextVar[Effect | None] = contextvars.ContextVar(
    "lifeguard_effect", default=None
)


def current_effect() -> Effect:
    """The running ``effect`` (for an ``@effect_task`` body: its idempotency key)."""
    running = _current.get()
    if running is None:
        raise ConfigurationError("lifeguard.current_effect(): no effect block is running")
    return running


# A task's effect without a key is "<task id>:effect"; a second one in the same run would
# share it and be skipped as done, so it is refused.
_DEFAULT_KEY_USED = "_lifeguard_effect_default_key"


def _resolve(key: str | None) -> tuple[str, str | None, str]:
    task = _task()
    name = getattr(task, "name", None)
    owner = f"{socket.gethostname()} pid {os.getpid()}"
    if task is not None:
        owner += f" task {task.request.id}"
    if key is not None:
        return str(key), name, owner
    if task is None:
        raise ConfigurationError("lifeguard.effect: no key given and no Celery task running")
    if getattr(task.request, _DEFAULT_KEY_USED, False):
        raise ConfigurationError(
            f"task {name}: a second lifeguard.effect() without a key in one run; give each "
            'effect its own key, e.g. effect(f"{self.request.id}:email")'
        )
    setattr(task.request, _DEFAULT_KEY_USED, True)
    return f"{task.request.id}:effect", name, owner


class EffectOptions(TypedDict, total=False):
    """The options of :func:`effect`, :func:`effect_async` and :func:`effect_task`.

    ``on_orphan`` (``"rerun"``): what a rerun does with a claim whose owner died before
    completing it: ``"rerun"`` (at least once: the body runs again, with the same
    idempotency key), ``"skip"`` (at most once: ``effect.done`` is True, status
    ``"skipped"``) or ``"fail"`` (raise :class:`EffectOrphaned` for an operator).
    ``on_busy`` (``"wait"``): what a run does while the owner is alive: ``"wait"`` (at most
    ``timeout`` s, default no limit, then :class:`EffectBusy`), ``"raise"``
    (:class:`EffectBusy` at once) or ``"retry"`` (the task's ``retry(countdown=retry_after)``,
    1 s; sync only). The connection the lock lives on: Django's ``using`` alias
    (``"default"``), a sync SQLAlchemy ``engine``, or ``url`` (behind PgBouncer transaction
    mode: a direct or session-mode URL).
    """

    on_orphan: OnOrphan
    on_busy: EffectOnBusy
    timeout: float | None
    retry_after: float
    using: str
    engine: Any
    url: str | None


def _validate(options: EffectOptions) -> None:
    unknown = set(options) - set(EffectOptions.__annotations__)
    if unknown:
        raise ConfigurationError(f"lifeguard.effect: unknown options {sorted(unknown)}")
    if options.get("on_orphan", "rerun") not in ON_ORPHAN:
        raise ConfigurationError(
            f"on_orphan={options.get('on_orphan')!r}: give 'rerun', 'skip' or 'fail'"
        )
    if options.get("on_busy", "wait") not in ON_BUSY:
        raise ConfigurationError(
            f"on_busy={options.get('on_busy')!r}: give 'wait', 'raise' or 'retry'"
        )


@dataclass
class _Claim:
    """One run's side of the protocol, on its own connection (sync; the async twin runs
    these steps in a thread)."""

    key: str
    task_name: str | None
    owner: str
    on_orphan: OnOrphan = "rerun"
    on_busy: EffectOnBusy = "wait"
    timeout: float | None = None
    retry_after: float = 1.0
    using: str = "default"
    engine: Any = None
    url: str | None = None
    conn: Any = None

    @classmethod
    def of(cls, key: str | None, options: EffectOptions) -> _Claim:
        _validate(options)
        return cls(*_resolve(key), **options)

    def open(self) -> Effect:
        if self.engine is not None and getattr(self.engine.dialect, "is_async", False):
            raise ConfigurationError(
                "lifeguard.effect: give engine= a sync Engine of the same database, or url="
            )
        self.conn = _dedicated_connection(self.using, self.engine, self.url)
        try:
            effect = self._claim()
        except BaseException:
            self.close()
            raise
        if effect.done:
            self.close()  # nothing to complete: no session held while the block returns
        return effect

    def _lock(self, cur: Any) -> bool:
        """Takes the key's lock; True if it had to wait for a live owner."""
        lock = sql.effect_lock_id(self.key)
        cur.execute(sql.TRY_LOCK, [lock])
        if cur.fetchone()[0]:
            return False
        if self.on_busy == "retry":
            task = _task()
            if task is None:
                raise ConfigurationError("effect(on_busy='retry') outside a Celery task")
            raise task.retry(countdown=self.retry_after)
        if self.on_busy == "raise":
            raise EffectBusy(f"effect {self.key!r}: another run holds it (its owner is alive)")
        if not sql.wait_for_lock(cur, sql.LOCK, lock, self.timeout):
            raise EffectBusy(f"effect {self.key!r}: its owner still runs after {self.timeout}s")
        return True

    def _claim(self) -> Effect:
        cur = self.conn.cursor()
        waited = self._lock(cur)
        try:
            cur.execute(sql.EFFECT_CLAIM, [self.key, self.task_name, self.owner, self.key])
        except Exception as exc:
            error = sql.effect_storage_error(exc)
            if error is not None:
                raise error from exc
            raise
        state, result, task_name, claimed_at, claimed_by, new = cur.fetchone()
        if new:
            effect = Effect(self.key, "claimed")
        elif state == sql.DONE:
            effect = Effect(self.key, "done", json.loads(result) if result else None)
        elif state == sql.SKIPPED:
            effect = Effect(self.key, "skipped")
        else:
            effect = self._orphan(cur, task_name, claimed_at, claimed_by)
        effect.waited = waited
        return effect

    def _orphan(
        self, cur: Any, task_name: str | None, claimed_at: datetime, claimed_by: str | None
    ) -> Effect:
        """The claim is there and nobody holds its lock: its owner's session ended before
        the completion."""
        count(stats.ORPHANED_CLAIMS, self.task_name, reason=self.on_orphan)
        if self.on_orphan == "fail":
            of_task = f" of task {task_name}" if task_name else ""
            raise EffectOrphaned(
                f"effect {self.key!r}{of_task} was claimed at "
                f"{claimed_at.isoformat(sep=' ', timespec='seconds')} by {claimed_by or '?'} "
                "and never completed: its "
                "worker died or the block raised mid-effect, so whether it happened is "
                f"unknown (idempotency key {idempotency_key(self.key)}). Check the remote "
                f"side, then `lifeguard effects resolve {self.key!r} --done` (it happened) "
                "or --release (run it again)",
                key=self.key,
                task_name=task_name,
                claimed_at=claimed_at,
                claimed_by=claimed_by,
            )
        if self.on_orphan == "skip":
            cur.execute(sql.EFFECT_SKIP, [self.key])
            effect = Effect(self.key, "skipped")
        else:
            cur.execute(sql.EFFECT_RECLAIM, [self.owner, self.task_name, self.key])
            effect = Effect(self.key, "reclaimed")
        effect.orphaned_claim_at = claimed_at
        return effect

    def complete(self, effect: Effect) -> None:
        """Commits ``done`` and the result; closing the session then frees the lock."""
        if effect.done:
            return  # nothing was claimed by this run
        cur = self.conn.cursor()
        cur.execute(sql.EFFECT_COMPLETE, [_dumps(effect.result, self.key), self.key])

    def close(self) -> None:
        if self.conn is not None:
            with contextlib.suppress(Exception):
                self.conn.close()  # the session ends: the server releases the lock
            self.conn = None


@contextlib.contextmanager
def _running(running: Effect) -> Iterator[None]:
    """``current_effect()`` is ``running`` inside the block that makes the effect."""
    token = _current.set(None if running.done else running)
    try:
        yield
    finally:
        _current.reset(token)


@contextlib.contextmanager
def effect(key: str | None = None, **options: Unpack[EffectOptions]) -> Iterator[Effect]:
    """A block around one external side effect, claimed before it and completed after it.

    ``key``: a business key (``"invoice:42:email"``), or None for ``"<task id>:effect"``;
    ``options``: :class:`EffectOptions` (``on_orphan``, ``on_busy``, ``timeout``,
    ``retry_after``, ``using``, ``engine``, ``url``). If the block raises, the claim stays:
    the next run treats it as orphaned. ::

        with lifeguard.effect(f"invoice:{invoice_id}:email", on_orphan="rerun") as effect:
            if not effect.done:
                send(invoice_id, idempotency_key=effect.idempotency_key)
                effect.result = {"sent": True}
    """
    claim = _Claim.of(key, options)
    running = claim.open()
    try:
        with _running(running):
            yield running
        claim.complete(running)
    finally:
        claim.close()


@contextlib.asynccontextmanager
async def effect_async(
    key: str | None = None, **options: Unpack[EffectOptions]
) -> AsyncIterator[Effect]:
    """:func:`effect` for ``async with``: the claim and the completion run in a thread (on
    the same dedicated connection), the body on the event loop. ``on_busy="retry"`` is
    sync only: use ``"raise"`` and retry in the task."""
    if options.get("on_busy") == "retry":
        raise ConfigurationError("effect_async: on_busy='retry' is sync only; use 'raise'")
    claim = _Claim.of(key, options)
    running = await asyncio.to_thread(claim.open)
    try:
        with _running(running):
            yield running
        await asyncio.to_thread(claim.complete, running)
    finally:
        await asyncio.to_thread(claim.close)


def effect_task(key: Key = None, **options: Unpack[EffectOptions]) -> Callable[[F], F]:
    """Decorate a task function (under ``@app.task``) whose whole body is one external
    effect. ``key``: None (``"<task id>:effect"``), a string, or a callable given the task's
    arguments; ``options``: :class:`EffectOptions`. The body gets its idempotency key from
    ``lifeguard.current_effect().idempotency_key``; its return value (JSON) is stored, and a
    rerun of a completed key returns it without running (a skipped orphan returns None)."""

    def key_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        return key(*args, **kwargs) if callable(key) else key

    _validate(options)  # a bad option fails at import, not at the first run

    def decorate(function: F) -> F:
        if inspect.iscoroutinefunction(function):

            @functools.wraps(function)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                async with effect_async(key_of(args, kwargs), **options) as running:
                    if not running.done:
                        running.result = await function(*args, **kwargs)
                return running.result

            return run_async  # type: ignore[return-value]

        @functools.wraps(function)
        def run(*args: Any, **kwargs: Any) -> Any:
            with effect(key_of(args, kwargs), **options) as running:
                if not running.done:
                    running.result = function(*args, **kwargs)
            return running.result

        return run  # type: ignore[return-value]

    return decorate


# --- for an operator: the claims not completed, and resolving one -------------------------


@dataclass(frozen=True)
class UnresolvedClaim:
    """A claim not completed. ``owner_alive``: its owner's lock is held (it is running);
    else it is orphaned and waits for a rerun's policy or an operator."""

    key: str
    task_name: str | None
    claimed_at: datetime
    claimed_by: str | None
    owner_alive: bool

    @property
    def idempotency_key(self) -> str:
        return idempotency_key(self.key)


def _lock_held(cur: Any, key: str) -> bool:
    big = sql.effect_lock_id(key) & 0xFFFFFFFFFFFFFFFF
    cur.execute(sql.EFFECT_LOCK_HELD, [big >> 32, big & 0xFFFFFFFF])
    return bool(cur.fetchone()[0])


def unresolved_effects(conn: Any, limit: int = 100) -> list[UnresolvedClaim]:
    """The claims not completed, oldest first, through a DB-API connection."""
    cur = conn.cursor()
    cur.execute(sql.EFFECT_UNRESOLVED, [limit])
    rows = cur.fetchall()
    return [
        UnresolvedClaim(key, task_name, claimed_at, claimed_by, _lock_held(cur, key))
        for key, task_name, claimed_at, claimed_by in rows
    ]


Resolution = Literal["done", "skip", "release"]


def resolve_effect(conn: Any, key: str, action: Resolution, result: Any = None) -> None:
    """Resolve an orphaned claim, through a DB-API connection in autocommit: ``"done"``
    (it happened: reruns return ``result``), ``"skip"`` (reruns do not run it) or
    ``"release"`` (delete the claim: the next run runs it, with the same idempotency key).
    Refused while the owner is alive, or when ``key`` has no claim left unresolved."""
    cur = conn.cursor()
    lock = sql.effect_lock_id(key)
    cur.execute(sql.TRY_LOCK, [lock])
    if not cur.fetchone()[0]:
        raise EffectBusy(f"effect {key!r}: its owner is alive and running it; wait for it")
    try:
        if action == "done":
            cur.execute(sql.EFFECT_COMPLETE, [_dumps(result, key), key])
        elif action == "skip":
            cur.execute(sql.EFFECT_SKIP, [key])
        elif action == "release":
            cur.execute(sql.EFFECT_RELEASE, [key])
        else:
            raise ConfigurationError(f"{action!r}: give 'done', 'skip' or 'release'")
        if cur.rowcount == 0:
            raise LifeguardError(f"effect {key!r}: no unresolved claim of that key")
    finally:
        cur.execute(sql.UNLOCK, [lock])
