"""Rules about SQLAlchemy engines found in the app after import (research note
sqlalchemy_async.md: E1 asyncio.run per task, E3 engines shared across fork)."""

from __future__ import annotations

from collections.abc import Iterator

from ...hooks import PoolKind
from ..context import DoctorContext, EngineInfo
from ..findings import Finding, Level
from ..registry import rule


def _evidence(engine: EngineInfo) -> dict[str, object]:
    return {
        "engine": engine.label,
        "async": engine.is_async,
        "pool_class": engine.pool_class,
        "pool_size": engine.pool_size,
        "max_overflow": engine.max_overflow,
        "connections_after_import": engine.connections,
        "registered": engine.registered,
    }


@rule(
    "LG013",
    "sqlalchemy-engine-unmanaged",
    "a SQLAlchemy engine created before fork and not registered with lifeguard",
)
def sqlalchemy_engine_unmanaged(ctx: DoctorContext) -> Iterator[Finding]:
    engines = [e for e in ctx.all_engines() if e.pooled and not e.registered]
    if not engines:
        return
    shape = ctx.require_pool()
    for engine in engines:
        kind = "AsyncEngine" if engine.is_async else "engine"
        if ctx.installed:
            fix = (
                f"Register it where it is created: engine = guard.add_engine("
                f"{'create_async_engine' if engine.is_async else 'create_engine'}(...)) "
                "(or pass a function that builds it)."
            )
        else:
            fix = (
                "Install lifeguard and register the engine: guard = lifeguard.install(app); "
                "engine = guard.add_engine(create_engine(...)). Without lifeguard: never use "
                "the engine at import, and call engine.dispose(close=False) in a "
                "worker_process_init handler."
            )
        if shape.kind.forks:
            connected = engine.connections > 0
            why = (
                f"Created at import, the {kind} and its {engine.pool_class} are copied into "
                "every prefork child. Once the MainProcess has connected (a query at import, "
                "in worker_init, from a result backend), children send queries inside the "
                "parent's session: TLS 'bad record mac' errors, hangs, wrong results."
            )
            if connected:
                why = (
                    f"It already holds {engine.connections} connection(s) after the app was "
                    "imported: every prefork child inherits them. " + why
                )
            if ctx.installed:
                why += (
                    " lifeguard makes registered engines fork-safe, cancels statements a "
                    "soft time limit interrupts and returns leaked connections; this one "
                    "gets none of it."
                )
            yield Finding(
                Level.CRITICAL if connected else Level.WARNING,
                title=f"SQLAlchemy {kind} {engine.label} "
                + (
                    "connected while the app was imported"
                    if connected
                    else "is created before fork and not managed by lifeguard"
                ),
                why=why,
                fix=fix,
                subject=engine.label,
                evidence=_evidence(engine),
            )
        elif ctx.installed:
            yield Finding(
                Level.INFO,
                title=f"SQLAlchemy {kind} {engine.label} is not registered with lifeguard",
                why=(
                    "A statement a soft time limit or a gevent timeout interrupts is not "
                    "cancelled on the server, connections a task leaves checked out are not "
                    "returned, and its connections are not named in pg_stat_activity."
                ),
                fix=fix,
                subject=engine.label,
                evidence=_evidence(engine),
            )


@rule(
    "LG014",
    "sqlalchemy-pool-mismatch",
    "a SQLAlchemy pool on a worker pool where it cannot work",
)
def sqlalchemy_pool_mismatch(ctx: DoctorContext) -> Iterator[Finding]:
    engines = list(ctx.all_engines())
    if not engines:
        return
    shape = ctx.require_pool()
    for engine in engines:
        if engine.is_async and shape.kind.green:
            yield Finding(
                Level.CRITICAL,
                title=f"AsyncEngine {engine.label} in an app run by the {shape.kind.value} pool",
                why=(
                    f"{shape.kind.value} runs tasks as greenlets of one thread: one asyncio "
                    "event loop cannot be driven from many greenlets, and a loop thread would "
                    "wake greenlets from a foreign thread. lifeguard refuses async tasks on "
                    "this pool at worker start (exit status 78)."
                ),
                fix=(
                    "Route the tasks that use it to a queue served by a prefork, threads or "
                    "solo worker (celery -A proj worker -P prefork -Q async_tasks), or use a "
                    "sync engine in these tasks."
                ),
                subject=engine.label,
                evidence=_evidence(engine),
            )
        elif engine.is_async and engine.pooled and not ctx.installed:
            yield Finding(
                Level.WARNING,
                title=f"pooled AsyncEngine {engine.label} without a persistent event loop",
                why=(
                    "Celery has no async tasks; the usual asyncio.run() per task creates a "
                    "new event loop each time, while a pooled connection belongs to the loop "
                    "that opened it: the second task fails ('attached to a different loop', "
                    "'another operation is in progress') and the pool is left broken."
                ),
                fix=(
                    "Install lifeguard, register the engine (guard.add_engine) and declare "
                    "the coroutines with @lifeguard.async_task(app): one event loop per "
                    "worker process serves every task. Otherwise use NullPool (a new "
                    "connection per task)."
                ),
                subject=engine.label,
                evidence=_evidence(engine),
            )
        elif (
            shape.kind in (PoolKind.THREADS, PoolKind.GEVENT, PoolKind.EVENTLET)
            and engine.capacity is not None
            and engine.pool_class not in ("StaticPool", "AssertionPool")
        ):
            shape = ctx.require_concurrency()
            if engine.capacity >= shape.units:
                continue
            yield Finding(
                Level.WARNING,
                title=f"{engine.label}: pool_size + max_overflow = {engine.capacity}, below "
                f"the {shape.kind.value} concurrency ({shape.units})",
                why=(
                    f"Up to {shape.units} tasks run at once in one process and share this "
                    "pool: a task that finds it empty waits pool_timeout (30 s by default) "
                    f"and fails with 'QueuePool limit of size {engine.pool_size} overflow "
                    f"{engine.max_overflow} reached'."
                ),
                fix=(
                    f"create_engine(..., pool_size={shape.units}) (or a max_overflow that "
                    f"makes pool_size + max_overflow >= {shape.units}); if the pool is meant "
                    "to cap database concurrency, raise pool_timeout instead."
                ),
                subject=engine.label,
                evidence={**_evidence(engine), "concurrency": shape.units},
            )
