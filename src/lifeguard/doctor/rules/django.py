"""Rules about Django's DATABASES in Celery workers: what CONN_MAX_AGE and the native
pool do under stock Celery (per version) and under lifeguard.

What Celery's Django fixup does (research note django_celery.md §1): 5.6 and later close
every connection before and after every task, ignoring CONN_MAX_AGE, and close the native
pool after every task under prefork; 5.5 and older keep connections per CONN_MAX_AGE with
``close_if_unusable_or_obsolete()``, which keeps one a soft time limit interrupted
mid-query (Django ticket #30646). ``CELERY_DB_REUSE_MAX`` skips the closing blindly.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Iterator

from ...hooks import PoolKind
from ..context import DjangoAlias, DoctorContext
from ..findings import Finding, Level
from ..registry import rule

INSTALL = "Install lifeguard: guard = lifeguard.install(app) in the module that creates the app"


def _stock_aliases(ctx: DoctorContext) -> list[DjangoAlias]:
    """Aliases Celery's own fixup handles in the workers (lifeguard does not manage them)."""
    return [alias for alias in ctx.postgres_aliases() if not ctx.manages(alias)]


def _reuse_max(ctx: DoctorContext) -> object:
    return ctx.conf.get("CELERY_DB_REUSE_MAX")


def _version(ctx: DoctorContext) -> str:
    return ".".join(str(part) for part in ctx.celery_version)


def _age(alias: DjangoAlias) -> str:
    return "None" if alias.conn_max_age is None else f"{alias.conn_max_age:g}"


@rule("LG007", "conn-max-age-ignored", "CONN_MAX_AGE set, but ignored by Celery 5.6+")
def conn_max_age_ignored(ctx: DoctorContext) -> Iterator[Finding]:
    if ctx.celery_version < (5, 6) or _reuse_max(ctx):
        return
    for alias in _stock_aliases(ctx):
        if alias.pool is not None or alias.conn_max_age == 0:
            continue
        yield Finding(
            Level.WARNING,
            title=f"{alias.where} CONN_MAX_AGE={_age(alias)} has no effect in the workers "
            f"(Celery {_version(ctx)})",
            why=(
                "Celery 5.6 and later close every Django connection before and after every "
                "task, whatever CONN_MAX_AGE says: each task pays a new PostgreSQL session "
                "(8 to 20 ms, more with TLS and over a network) for queries that take a "
                "fraction of a millisecond."
            ),
            fix=(
                f"{INSTALL}: connections are then kept across tasks for CONN_MAX_AGE and "
                "reused only when proven clean."
            ),
            subject=alias.where,
            evidence={"conn_max_age": alias.conn_max_age, "celery": _version(ctx)},
        )


@rule(
    "LG008",
    "unsafe-connection-reuse",
    "stock reuse that keeps a connection a soft time limit interrupted",
)
def unsafe_connection_reuse(ctx: DoctorContext) -> Iterator[Finding]:
    aliases = _stock_aliases(ctx)
    if not aliases:
        return
    soft = ctx.soft_time_limits
    interrupts = bool(soft) and ctx.django_psycopg3
    level = Level.CRITICAL if interrupts else Level.WARNING
    consequence = (
        "With psycopg 3 every later task of that process then fails with 'another command "
        "is already in progress', and the server keeps running the interrupted query."
    )
    if soft:
        consequence += f" Tasks with a soft time limit: {', '.join(soft[:5])}."
    evidence = {"celery": _version(ctx), "soft_time_limit_tasks": soft}
    reuse_max = _reuse_max(ctx)
    if reuse_max:
        yield Finding(
            level,
            title=f"CELERY_DB_REUSE_MAX={reuse_max} keeps connections without any check",
            why=(
                "It skips Celery's closing for that many tasks and checks nothing: after "
                "one soft time limit interrupts a query, the connection is reused as it is. "
                + consequence
            ),
            fix=f"Remove CELERY_DB_REUSE_MAX and {INSTALL[0].lower()}{INSTALL[1:]}.",
            subject=ctx.app_name,
            evidence={**evidence, "CELERY_DB_REUSE_MAX": str(reuse_max)},
        )
        return
    if ctx.celery_version >= (5, 6):
        return
    for alias in aliases:
        if alias.pool is not None or alias.conn_max_age == 0:
            continue
        yield Finding(
            level,
            title=f"{alias.where} CONN_MAX_AGE={_age(alias)} reuses connections a soft time "
            f"limit left mid-query (Celery {_version(ctx)})",
            why=(
                "Celery 5.5 and older keep a connection between tasks with Django's "
                "close_if_unusable_or_obsolete(), which keeps one whose query an exception "
                "interrupted (Django ticket #30646). " + consequence
            ),
            fix=f"{INSTALL}, or set CONN_MAX_AGE to 0 (a new session per task).",
            subject=alias.where,
            evidence={**evidence, "conn_max_age": alias.conn_max_age},
        )


@rule("LG009", "conn-max-age-zero", "CONN_MAX_AGE=0 under lifeguard: a new session per task")
def conn_max_age_zero(ctx: DoctorContext) -> Iterator[Finding]:
    for alias in ctx.postgres_aliases():
        if not ctx.manages(alias) or alias.pool is not None or alias.conn_max_age != 0:
            continue
        if ctx.shape.kind.green:
            yield Finding(
                Level.INFO,
                title=f"{alias.where} opens a new session for every task under "
                f"{ctx.shape.kind.value}",
                why=(
                    "Django's connections belong to the greenlet that opened them and every "
                    "task runs in a new greenlet; with CONN_MAX_AGE=0 lifeguard closes each "
                    "at task end instead of sharing it with the next greenlet."
                ),
                fix=(
                    f"Set CONN_MAX_AGE in {alias.where}, e.g. 600: the process's greenlets "
                    "then share a budget of warm connections (the lifeguard option "
                    "green_budget, default min(concurrency, 10))."
                ),
                subject=alias.where,
            )
            continue
        yield Finding(
            Level.INFO,
            title=f"{alias.where} CONN_MAX_AGE=0: lifeguard closes its connection after every task",
            why=(
                "CONN_MAX_AGE=0 (Django's default) means close after each unit of work; "
                "lifeguard honours it, so each task pays a new session (8 to 20 ms). "
                "lifeguard reuses a connection only when checks that cost no round trip "
                "prove it clean, so a longer age is safe."
            ),
            fix=(f"Set CONN_MAX_AGE in {alias.where}, e.g. 600 (seconds), or None (no limit)."),
            subject=alias.where,
        )


@rule("LG010", "django-pool-invalid", "a Django native pool the worker refuses to start with")
def django_pool_invalid(ctx: DoctorContext) -> Iterator[Finding]:
    pooled = [alias for alias in ctx.postgres_aliases() if alias.pool is not None]
    if not pooled:
        return
    import django

    for alias in pooled:
        problems = []  # (what, why, fix)
        if alias.conn_max_age != 0:
            problems.append(
                (
                    f"CONN_MAX_AGE={_age(alias)}",
                    "Django refuses persistent connections with its pool "
                    "(ImproperlyConfigured at the first query)",
                    "Set CONN_MAX_AGE to 0; lifeguard keeps pooled connections warm across "
                    "tasks by itself.",
                )
            )
        if django.VERSION < (5, 1):
            problems.append(
                (
                    f"runs on Django {django.get_version()}",
                    "Django's native pool needs Django 5.1 or later",
                    "Upgrade Django to 5.1 or later, or remove OPTIONS['pool'].",
                )
            )
        if not ctx.django_psycopg3 or importlib.util.find_spec("psycopg_pool") is None:
            problems.append(
                (
                    "has no psycopg_pool",
                    "Django's native pool needs psycopg 3 with psycopg_pool",
                    "pip install 'psycopg[pool]'.",
                )
            )
        for what, why, fix in problems:
            yield Finding(
                Level.CRITICAL,
                title=f"{alias.where} sets OPTIONS['pool'] and {what}",
                why=f"{why}; a lifeguard worker refuses to start (exit status 78).",
                fix=fix,
                subject=alias.where,
                evidence={"conn_max_age": alias.conn_max_age, "pool": dict(alias.pool or {})},
            )


@rule("LG011", "django-pool-size", "a Django native pool sized wrong for the worker pool")
def django_pool_size(ctx: DoctorContext) -> Iterator[Finding]:
    pooled = [alias for alias in ctx.postgres_aliases() if alias.pool is not None]
    if not pooled:
        return
    shape = ctx.require_pool()
    for alias in pooled:
        evidence = {
            "min_size": alias.pool_min_size,
            "max_size": alias.pool_max_size,
            "pool": shape.kind.value,
            "concurrency": shape.concurrency.value,
        }
        if shape.kind.forks and alias.pool_min_size > 1:
            children = int(shape.concurrency.value)
            yield Finding(
                Level.WARNING,
                title=f"{alias.where} pool keeps min_size={alias.pool_min_size} connections "
                "open in every prefork child",
                why=(
                    "A prefork child runs one task at a time, so it uses one connection; "
                    f"the pool still holds {alias.pool_min_size} in each of the "
                    f"{children} children: {alias.pool_min_size * children} sessions per "
                    f"host instead of {children} (psycopg_pool's default min_size is 4)."
                ),
                fix=f"OPTIONS['pool'] = {{'min_size': 1, 'max_size': 2}} in {alias.where}.",
                subject=alias.where,
                evidence=evidence,
            )
        elif shape.kind in (PoolKind.THREADS, PoolKind.GEVENT, PoolKind.EVENTLET):
            shape = ctx.require_concurrency()
            units = shape.units
            if alias.pool_max_size >= units:
                continue
            yield Finding(
                Level.WARNING,
                title=f"{alias.where} pool max_size={alias.pool_max_size} is below the "
                f"{shape.kind.value} concurrency ({units})",
                why=(
                    f"Up to {units} tasks run at once and share one pool per process: when "
                    f"more than {alias.pool_max_size} need a connection, the others wait for "
                    "the pool's timeout (30 s by default) and fail with PoolTimeout."
                ),
                fix=(
                    f"OPTIONS['pool'] = {{'min_size': 1, 'max_size': {units}}} in "
                    f"{alias.where}, or fewer tasks at once (if the pool is meant to cap "
                    "database concurrency, raise its timeout instead)."
                ),
                subject=alias.where,
                evidence=evidence,
            )


@rule(
    "LG012",
    "django-pool-prefork-without-lifeguard",
    "Django's native pool under prefork with Celery's stock handling",
)
def django_pool_prefork_without_lifeguard(ctx: DoctorContext) -> Iterator[Finding]:
    aliases = [alias for alias in _stock_aliases(ctx) if alias.pool is not None]
    if not aliases:
        return
    shape = ctx.require_pool()
    if not shape.kind.forks:
        return
    for alias in aliases:
        if ctx.celery_version >= (5, 6):
            why = (
                f"Celery {_version(ctx)} closes the whole pool after every task under "
                "prefork, and the next query opens it again: min_size "
                f"({alias.pool_min_size}) new sessions per task (measured: 1,600 sessions "
                "for 400 tasks, 57 tasks/s against 133 without a pool)."
            )
        else:
            why = (
                f"Celery {_version(ctx)} does not close a pool the MainProcess opened before "
                "forking: children inherit it, and a child closing its copy closes the "
                "parent's sessions (psycopg_pool is not fork-safe; PoolTimeout, 'server "
                "closed the connection unexpectedly')."
            )
        yield Finding(
            Level.WARNING,
            title=f"{alias.where} uses Django's native pool under prefork without lifeguard",
            why=why,
            fix=(
                f"{INSTALL}: the pool is then opened after fork, connections go back to it "
                "after every task, and it closes when the child exits. Otherwise remove "
                "OPTIONS['pool'] on prefork workers."
            ),
            subject=alias.where,
            evidence={"celery": _version(ctx), "min_size": alias.pool_min_size},
        )
