"""Exactly-once database effects and fleet-wide singleton tasks, on PostgreSQL.

``once``: the task's key is inserted into ``lifeguard_once`` inside the task's own
transaction, before its writes. The key and the writes commit together or not at all:
a redelivered run whose key is committed skips its body and returns the stored result;
a run killed before its commit left nothing, so its redelivery runs normally; two
concurrent runs of one key serialise on the key's unique index (the second waits for
the first to commit, then skips). One extra round trip per run: the claim, which also
returns the stored result on the skip path; a result is sent with the COMMIT when the
block owns the transaction on psycopg 3 (else it is one more round trip).

``singleton``: a session-level advisory lock on a connection of its own, opened for the
block and closed after it. No transaction stays open for the task's length, and the
server drops the lock the moment the holder's session ends, SIGKILL included.

docs/once.md says which guarantee each choice gives.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import json
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

from .. import registry, stats
from ..errors import ConfigurationError, LifeguardError
from ..postgres import once_sql as sql
from ..postgres.appname import application_name

F = TypeVar("F", bound=Callable[..., Any])
OnBusy = Literal["wait", "skip", "retry"]
Key = str | Callable[..., str] | None


@dataclass
class OnceBlock:
    """What a ``once`` block sees: ``done`` is True when the key was already committed by
    an earlier run; then ``result`` is that run's result and the body must not run.
    Otherwise the body sets ``result`` (JSON), stored with the key at commit."""

    key: str
    done: bool = False
    result: Any = None


@dataclass
class SingletonLock:
    """What a ``singleton`` block sees: ``acquired`` is False only with ``on_busy="skip"``
    when another run holds the key (then the body must not run)."""

    key: str
    lock_id: int
    acquired: bool = False
    waited: bool = field(default=False, repr=False)


class SingletonBusy(LifeguardError):
    """``on_busy="wait"`` with a ``timeout``: the key stayed held for that long."""


def _task() -> Any:
    from celery import current_task

    return current_task if current_task and current_task.request.id else None


def count(counter: str, task_name: str | None = None, reason: str | None = None) -> None:
    """Add one to ``counter`` (``stats.ONCE_SKIPPED``, ``stats.ORPHANED_CLAIMS``, ...) in
    ``guard.stats()`` and on the metrics endpoint, per task name, in this process. Nothing
    happens without an installed guard; counting never fails the task."""
    task = _task()
    try:
        guard = registry.lookup(getattr(task, "app", None))
    except Exception:
        return
    if guard is not None:
        name = task_name if task_name is not None else getattr(task, "name", None)
        guard.counters.incr(counter, task=name, reason=reason)


def _resolve_key(key: str | None, what: str) -> tuple[str, str | None]:
    task = _task()
    name = getattr(task, "name", None)
    if key is not None:
        return str(key), name
    if task is None:
        raise ConfigurationError(f"{what}: no key given and no Celery task running")
    return str(task.request.id), name


def _dumps(result: Any, key: str) -> str:
    try:
        return json.dumps(result)
    except (TypeError, ValueError) as exc:
        raise ConfigurationError(
            f"once key {key!r}: the result must be JSON to be stored ({exc})"
        ) from exc


def _loads(row: Any) -> Any:
    return json.loads(row[0]) if row and row[0] is not None else None


def _storage_guard(exc: BaseException, role: Any = None) -> None:
    error = sql.storage_error(exc, role)
    if error is not None:
        raise error from exc


# --- once: Django --------------------------------------------------------------------------


def _psycopg3(raw: Any) -> bool:
    try:
        import psycopg
    except ImportError:
        return False
    return isinstance(raw, psycopg.Connection)


def _store_and_commit(raw: Any, result: str, key: str) -> None:
    """The result and the COMMIT in one round trip: one simple-query message
    ``UPDATE ...; COMMIT``, its values bound (quoted) by psycopg's client-side cursor. If
    the UPDATE fails the COMMIT does not run; if the COMMIT fails the server rolled back:
    either way the error reaches the caller's rollback. The driver's ``commit()`` that
    follows finds the connection idle and sends nothing, so the ORM's own commit runs its
    hooks as usual."""
    import psycopg

    with psycopg.ClientCursor(raw) as cur:
        cur.execute(sql.STORE_AND_COMMIT, [result, key])


def _claimed(row: Any, block: OnceBlock, task_name: str | None) -> None:
    """Fill ``block`` from the CLAIM_OR_FETCH row; count a skipped duplicate."""
    inserted, stored = row
    if not inserted:
        block.done, block.result = True, _loads([stored])
        count(stats.ONCE_SKIPPED, task_name)


def _django_outermost(connection: Any) -> bool:
    """The block's atomic() is the outermost one and will commit on exit."""
    return bool(
        connection.commit_on_exit
        and not connection.needs_rollback
        and not connection.savepoint_ids
        and len(connection.atomic_blocks) == 1
    )


@contextlib.contextmanager
def _django_once(key: str, task_name: str | None, using: str) -> Iterator[OnceBlock]:
    from django.db import DatabaseError, connections, transaction

    connection = connections[using]
    with transaction.atomic(using=using):
        block = OnceBlock(key)
        with connection.cursor() as cur:
            try:
                cur.execute(sql.CLAIM_OR_FETCH, [key, task_name])
                _claimed(cur.fetchone(), block, task_name)
            except DatabaseError as exc:
                _storage_guard(exc, connection.settings_dict.get("USER"))
                raise
        yield block
        if block.done:
            # A body that ran anyway must not commit a second effect.
            transaction.set_rollback(True, using=using)
        elif block.result is not None:
            result = _dumps(block.result, key)
            if _django_outermost(connection) and _psycopg3(connection.connection):
                with connection.wrap_database_errors:
                    _store_and_commit(connection.connection, result, key)
            else:
                with connection.cursor() as cur:
                    cur.execute(sql.STORE, [result, key])


# --- once: SQLAlchemy ------------------------------------------------------------------------

_CLAIM = sql.named(sql.CLAIM_OR_FETCH, "key", "task_name")
_STORE = sql.named(sql.STORE, "result", "key")


def _sqla_role(session: Any) -> str | None:
    bind = session.get_bind()
    return getattr(getattr(bind, "url", None), "username", None)


def _sqla_owned_psycopg3(session: Any) -> Any:
    """The psycopg 3 connection under ``session`` if the block may commit through it:
    not when a ``before_commit`` listener could write after the COMMIT went out."""
    if session.dispatch.before_commit:
        return None
    raw = session.connection().connection.dbapi_connection
    return raw if _psycopg3(raw) else None


def _sqla_store_and_commit(raw: Any, result: str, key: str) -> None:
    """:func:`_store_and_commit`, its errors as SQLAlchemy's (``IntegrityError``, ...), the
    ones ``session.commit()`` would raise."""
    import psycopg
    from sqlalchemy.exc import DBAPIError

    try:
        _store_and_commit(raw, result, key)
    except psycopg.Error as exc:
        raise DBAPIError.instance(sql.STORE, None, exc, psycopg.Error) from exc


@contextlib.contextmanager
def _sqla_once(key: str, task_name: str | None, session: Any) -> Iterator[OnceBlock]:
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    owns = not session.in_transaction()  # else the caller's transaction carries the key
    block = OnceBlock(key)
    try:
        try:
            row = session.execute(text(_CLAIM), {"key": key, "task_name": task_name}).one()
            _claimed(row, block, task_name)
        except DBAPIError as exc:
            _storage_guard(exc, _sqla_role(session))
            raise
        yield block
        if block.done:
            if owns:
                session.rollback()
        else:
            if block.result is not None:
                result = _dumps(block.result, key)
                raw = _sqla_owned_psycopg3(session) if owns else None
                if raw is not None:
                    session.flush()  # the ORM's pending writes go before the COMMIT
                    _sqla_store_and_commit(raw, result, key)  # session.commit(): a no-op
                else:
                    session.execute(text(_STORE), {"result": result, "key": key})
            if owns:
                session.commit()
    except BaseException:
        if owns:
            session.rollback()
        raise


@contextlib.asynccontextmanager
async def _sqla_once_async(
    key: str, task_name: str | None, session: Any
) -> AsyncIterator[OnceBlock]:
    from sqlalchemy import text
    from sqlalchemy.exc import DBAPIError

    owns = not session.in_transaction()
    block = OnceBlock(key)
    try:
        try:
            result = await session.execute(text(_CLAIM), {"key": key, "task_name": task_name})
            _claimed(result.one(), block, task_name)
        except DBAPIError as exc:
            _storage_guard(exc, _sqla_role(session))
            raise
        yield block
        if block.done:
            if owns:
                await session.rollback()
        else:
            if block.result is not None:
                await session.execute(
                    text(_STORE), {"result": _dumps(block.result, key), "key": key}
                )
            if owns:
                await session.commit()
    except BaseException:
        if owns:
            await session.rollback()
        raise


def once(
    key: str | None = None, *, using: str = "default", session: Any = None
) -> contextlib.AbstractContextManager[OnceBlock]:
    """A block whose database writes commit at most once per ``key``.

    ``key`` defaults to the running Celery task's id (the same on a redelivery). With
    ``session`` (a SQLAlchemy Session) the key goes into the session's transaction
    (begun and committed by the block unless one was already open), else into a Django
    ``transaction.atomic(using)`` the block opens. Check ``block.done`` first::

        with lifeguard.once(f"invoice:{invoice_id}:charge") as block:
            if block.done:
                return block.result
            ...  # the writes
            block.result = {"charged": amount}
    """
    resolved, task_name = _resolve_key(key, "lifeguard.once")
    if session is not None:
        return _sqla_once(resolved, task_name, session)
    return _django_once(resolved, task_name, using)


def once_async(
    key: str | None = None, *, session: Any
) -> contextlib.AbstractAsyncContextManager[OnceBlock]:
    """:func:`once` for a SQLAlchemy ``AsyncSession`` (``async with``)."""
    resolved, task_name = _resolve_key(key, "lifeguard.once_async")
    return _sqla_once_async(resolved, task_name, session)


def once_task(
    key: Key = None, *, using: str = "default", session: Callable[[], Any] | None = None
) -> Callable[[F], F]:
    """Decorate a task function (under ``@app.task``) so its writes and its result commit
    once per key: a rerun of a committed key returns the stored result without running.

    ``key``: None (the task id), a string, or a callable given the task's arguments.
    ``session``: a factory of the SQLAlchemy (Async)Session to use, else Django's
    ``using`` alias. The result must be JSON.
    """

    def key_of(args: tuple[Any, ...], kwargs: dict[str, Any]) -> str | None:
        return key(*args, **kwargs) if callable(key) else key

    def decorate(function: F) -> F:
        if inspect.iscoroutinefunction(function):
            if session is None:
                raise ConfigurationError("once_task on an async def task needs session=")
            factory = session

            @functools.wraps(function)
            async def run_async(*args: Any, **kwargs: Any) -> Any:
                async with once_async(key_of(args, kwargs), session=factory()) as block:
                    if block.done:
                        return block.result
                    block.result = await function(*args, **kwargs)
                return block.result

            return run_async  # type: ignore[return-value]

        @functools.wraps(function)
        def run(*args: Any, **kwargs: Any) -> Any:
            own = session() if session is not None else None
            with once(key_of(args, kwargs), using=using, session=own) as block:
                if block.done:
                    return block.result
                block.result = function(*args, **kwargs)
            return block.result

        return run  # type: ignore[return-value]

    return decorate


# --- singleton: a session-level advisory lock on a connection of its own --------------------


def _dedicated_connection(using: str, engine: Any, url: str | None) -> Any:
    """A new DB-API connection in autocommit, never a pooled one: the lock lives and dies
    with this session, and no transaction stays open while the task runs. Without
    ``url``, the option ``singleton_database_url`` (direct, past PgBouncer) comes first."""
    guard = registry.lookup(getattr(_task(), "app", None))
    if url is None and guard is not None:
        url = guard.options.singleton_database_url
    # The worker process's application_name: the lock session is attributed to it.
    prefix = guard.options.application_name_prefix if guard is not None else None
    named: dict[str, Any] = {"application_name": application_name(prefix)} if prefix else {}
    if url is not None:
        try:
            import psycopg

            return psycopg.connect(url, autocommit=True, **named)
        except ImportError:
            import psycopg2

            raw = psycopg2.connect(url, **named)
    elif engine is not None:
        cargs, cparams = engine.dialect.create_connect_args(engine.url)
        if engine.dialect.driver in ("psycopg", "psycopg2"):
            cparams = {**named, **cparams}
        raw = engine.dialect.connect(*cargs, **cparams)
    else:
        from django.db import connections

        wrapper = connections[using]
        # Not get_new_connection(): with Django's native pool (5.1+) it lends a pooled
        # connection, which closing never gives back (the pool runs dry).
        raw = wrapper.Database.connect(**wrapper.get_connection_params())
    raw.autocommit = True
    return raw


@contextlib.contextmanager
def singleton(
    key: str,
    *,
    on_busy: OnBusy = "wait",
    timeout: float | None = None,
    retry_after: float = 1.0,
    using: str = "default",
    engine: Any = None,
    url: str | None = None,
) -> Iterator[SingletonLock]:
    """At most one block of ``key`` at a time across every worker of the fleet.

    ``on_busy``: ``"wait"`` blocks until the holder ends (at most ``timeout`` s, then
    :class:`SingletonBusy`); ``"skip"`` gives ``lock.acquired = False``; ``"retry"``
    raises the running task's ``retry(countdown=retry_after)``. The lock is held on a
    new session to the database of Django's ``using`` alias, of a SQLAlchemy
    ``engine``, or of ``url`` (behind PgBouncer in transaction mode: a direct or
    session-mode URL, see docs/once.md), closed when the block ends.
    """
    if on_busy not in ("wait", "skip", "retry"):
        raise ConfigurationError(f"on_busy={on_busy!r}: give 'wait', 'skip' or 'retry'")
    lock = SingletonLock(key, sql.lock_id(key))
    task = _task()
    task_name = getattr(task, "name", None)
    conn = _dedicated_connection(using, engine, url)
    try:
        cur = conn.cursor()
        cur.execute(sql.labelled(sql.TRY_LOCK, key, task_name), [lock.lock_id])
        lock.acquired = bool(cur.fetchone()[0])
        if not lock.acquired and on_busy == "wait":
            lock.waited = True
            count(stats.SINGLETON_WAITED, task_name)
            if not sql.wait_for_lock(
                cur, sql.labelled(sql.LOCK, key, task_name), lock.lock_id, timeout
            ):
                count(stats.SINGLETON_BUSY, task_name, "timeout")
                raise SingletonBusy(f"singleton {key!r} still held after {timeout}s")
            lock.acquired = True
        if not lock.acquired and on_busy == "skip":
            count(stats.SINGLETON_SKIPPED, task_name)
        if not lock.acquired and on_busy == "retry":
            if task is None:
                raise ConfigurationError("singleton(on_busy='retry') outside a Celery task")
            count(stats.SINGLETON_BUSY, task_name, "retry")
            raise task.retry(countdown=retry_after)
        yield lock
    finally:
        with contextlib.suppress(Exception):
            conn.close()  # the session ends: the server releases the lock


def singleton_task(
    key: Key = None,
    *,
    on_busy: OnBusy = "wait",
    timeout: float | None = None,
    retry_after: float = 1.0,
    using: str = "default",
    engine: Any = None,
    url: str | None = None,
) -> Callable[[F], F]:
    """Decorate a task function (under ``@app.task``): one run of ``key`` (default: the
    task's name) at a time across the fleet; a skipped run returns None."""

    def decorate(function: F) -> F:
        @functools.wraps(function)
        def run(*args: Any, **kwargs: Any) -> Any:
            name = key(*args, **kwargs) if callable(key) else key
            name = name or f"{function.__module__}.{function.__qualname__}"
            with singleton(
                name,
                on_busy=on_busy,
                timeout=timeout,
                retry_after=retry_after,
                using=using,
                engine=engine,
                url=url,
            ) as lock:
                if not lock.acquired:
                    return None
                return function(*args, **kwargs)

        # Where the lock session goes, for `lifeguard doctor` (behind PgBouncer).
        where = {"url": url, "using": using, "engine": engine}
        run.__lifeguard_singleton__ = where  # type: ignore[attr-defined]
        return run  # type: ignore[return-value]

    return decorate


def prune(
    conn: Any, older_than: str = f"{sql.DEFAULT_RETENTION_DAYS}d", batch: int = 10_000
) -> int:
    """Delete keys older than ``older_than`` (``30d`` by default) through a DB-API
    connection in autocommit, in batches; returns how many."""
    interval = sql.parse_retention(older_than)
    total = 0
    while True:
        cur = conn.cursor()
        cur.execute(sql.PRUNE_BATCH, [interval, batch])
        deleted = int(cur.rowcount)
        total += deleted
        if deleted < batch:
            return total
