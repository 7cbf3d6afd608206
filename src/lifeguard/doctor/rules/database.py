"""Rules that need the database server: PgBouncer, the connection budget, the server's
timeouts and keepalives (research note memory_monitoring.md §4-5).

Server settings are read as the role the doctor connected as sees them: ``ALTER ROLE``
and ``ALTER DATABASE`` settings of that role count. Run the doctor with the workers'
own database settings (the default with ``-A``) to see what the workers get.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from typing import Any

from ...monitor.thresholds import Thresholds
from ...postgres.conninfo import parse_conninfo
from ...postgres.pgbouncer import transaction_mode_connect_args
from ...postgres.slots import fair_share
from ..budget import Budget, connection_budget, green_budgets
from ..context import DjangoAlias, DoctorContext, EngineInfo
from ..findings import Finding, Level
from ..registry import Skip, rule
from ..server import endpoint

#: Linux's tcp_keepalive_time: what the server uses when tcp_keepalives_idle is 0.
OS_KEEPALIVE_IDLE = 7200.0


def _duration(seconds: float) -> str:
    if seconds >= 3600 and seconds % 3600 == 0:
        return f"{seconds / 3600:g} h"
    if seconds >= 60 and seconds % 60 == 0:
        return f"{seconds / 60:g} min"
    return f"{seconds:g} s"


# --- PgBouncer ---------------------------------------------------------------------------


def _behind_pooler(ctx: DoctorContext) -> tuple[str | None, str, str | None] | None:
    """``(mode, how it is known, endpoint behind it or None for every connection)``,
    or None when no pooler is known to be in front."""
    if ctx.pgbouncer_mode:
        if ctx.pgbouncer_mode == "none":
            return None
        return ctx.pgbouncer_mode, f"--pgbouncer {ctx.pgbouncer_mode}", None
    if ctx.server is not None and ctx.server.pooler is not None:
        pooler = ctx.server.pooler
        return pooler.mode, pooler.source, ctx.server.endpoint
    if ctx.options is not None and ctx.options.pgbouncer_transaction_mode:
        return "transaction", "the lifeguard option pgbouncer_transaction_mode is on", None
    if ctx.server is None:
        raise Skip(ctx.server_skip)
    return None


def _pooling_transactions(ctx: DoctorContext) -> tuple[str | None, str, str | None, bool] | None:
    """``(mode, how it is known, endpoint, mode known)`` of a pooler in front that may
    pool per transaction (not session mode); None without one."""
    pooler = _behind_pooler(ctx)
    if pooler is None or pooler[0] == "session":
        return None
    mode, how, endpoint = pooler
    return mode, how, endpoint, mode in ("transaction", "statement")


def _engine_prepares(ctx: DoctorContext, engine: EngineInfo) -> bool:
    """The engine's connections may prepare statements on the server."""
    required = transaction_mode_connect_args(engine.driver)
    if not required:
        return False  # psycopg2 and others never prepare server-side
    if engine.registered and ctx.options is not None and ctx.options.pgbouncer_transaction_mode:
        return False  # lifeguard applies the profile to every new connection
    params = engine.connect_params
    if params is None:
        return True
    return not all(key in params and params[key] == value for key, value in required.items())


def _django_prepares(ctx: DoctorContext, alias: DjangoAlias) -> bool:
    """Django's psycopg 3 backend binds client-side and never prepares, unless
    OPTIONS asks for server-side binding and a prepare_threshold."""
    options = alias.options
    return (
        ctx.django_psycopg3
        and options.get("server_side_binding") is True
        and options.get("prepare_threshold") is not None
    )


@rule(
    "LG015",
    "pgbouncer-prepared-statements",
    "asyncpg or psycopg behind PgBouncer in transaction mode without the profile",
)
def pgbouncer_prepared_statements(ctx: DoctorContext) -> Iterator[Finding]:
    pooler = _pooling_transactions(ctx)
    if pooler is None:
        return
    mode, how, endpoint, known = pooler
    server_pooler = ctx.server.pooler if ctx.server is not None else None
    handles_prepares = server_pooler is not None and server_pooler.max_prepared_statements > 0
    mode_text = f"in {mode} mode" if known else "(pool mode unknown)"
    why_prepared = (
        "In transaction pooling, consecutive transactions of one client may run on different "
        "server sessions: a statement prepared in one is missing in the next (measured "
        "through PgBouncer 1.18: asyncpg's defaults failed 51-87 % of transactions, "
        "psycopg's prepare_threshold=5 failed 9-42 %)."
    )
    if not known:
        why_prepared += (
            " The pooler's mode is unknown: this applies if it runs transaction or statement "
            "pooling (pass --pgbouncer session if it does not)."
        )
    evidence = {"pooler": how, "mode": mode}
    if not handles_prepares:
        for engine in ctx.all_engines():
            if endpoint is not None and engine.endpoint != endpoint:
                continue
            if not _engine_prepares(ctx, engine):
                continue
            args = ", ".join(
                f"{key}={value!r}"
                for key, value in transaction_mode_connect_args(engine.driver).items()
            )
            if ctx.installed:
                fix = (
                    f"{ctx.option_spelled('pgbouncer_transaction_mode')} = True and register "
                    "the engine with guard.add_engine() (lifeguard then passes "
                    f"{args}); or create_engine(..., connect_args={{{args}}})."
                )
            else:
                fix = f"create_engine(..., connect_args={{{args}}})."
            yield Finding(
                Level.CRITICAL if known else Level.WARNING,
                title=f"{engine.driver} engine {engine.label} prepares statements behind a "
                f"pooler {mode_text}",
                why=why_prepared,
                fix=fix,
                subject=engine.label,
                evidence={**evidence, "driver": engine.driver},
            )
        for alias in ctx.postgres_aliases():
            if (endpoint is None or alias.endpoint == endpoint) and _django_prepares(ctx, alias):
                yield Finding(
                    Level.CRITICAL if known else Level.WARNING,
                    title=f"{alias.where} prepares statements behind a pooler {mode_text}",
                    why=why_prepared,
                    fix=(
                        f"Remove 'prepare_threshold' (or 'server_side_binding') from "
                        f"{alias.where}['OPTIONS']: Django then never prepares."
                    ),
                    subject=alias.where,
                    evidence=evidence,
                )
    for alias in ctx.postgres_aliases():
        if endpoint is not None and alias.endpoint != endpoint:
            continue
        if alias.disable_server_side_cursors:
            continue
        yield Finding(
            Level.WARNING if known else Level.INFO,
            title=f"{alias.where} uses server-side cursors behind a pooler {mode_text}",
            why=(
                "QuerySet.iterator() declares a server-side cursor that lives in the server "
                "session; in transaction pooling the next fetch may reach another session "
                "and fail with 'cursor ... does not exist' (Django's documentation requires "
                "DISABLE_SERVER_SIDE_CURSORS with transaction pooling)."
            ),
            fix=f"{alias.where}['DISABLE_SERVER_SIDE_CURSORS'] = True.",
            subject=alias.where,
            evidence=evidence,
        )


def _lock_endpoint(ctx: DoctorContext, singleton: Mapping[str, Any]) -> str | None:
    """host:port where a singleton's lock session goes; None: not known."""
    url = singleton.get("url") or (ctx.options.singleton_database_url if ctx.options else None)
    if url:
        try:
            options = parse_conninfo(str(url))
        except ValueError:
            return None
        return endpoint(options.get("host", "").split(",")[0], options.get("port"))
    engine = singleton.get("engine")
    if engine is not None:
        return endpoint(engine.url.host, engine.url.port)
    for alias in ctx.postgres_aliases():
        if alias.alias == singleton.get("using", "default"):
            return alias.endpoint
    return None


def _direct(ctx: DoctorContext, singleton: Mapping[str, Any]) -> bool:
    """The singleton was given its own URL: taken as going past the pooler."""
    return bool(
        singleton.get("url") or (ctx.options is not None and ctx.options.singleton_database_url)
    )


@rule(
    "LG023",
    "singleton-behind-transaction-pooler",
    "singleton locks on sessions of a pooler in transaction mode",
)
def singleton_behind_transaction_pooler(ctx: DoctorContext) -> Iterator[Finding]:
    singletons = [task for task in ctx.tasks if task.singleton is not None]
    if not singletons:
        return
    pooler = _pooling_transactions(ctx)
    if pooler is None:
        return
    mode, how, pooled_endpoint, known = pooler
    for task in singletons:
        assert task.singleton is not None
        where = _lock_endpoint(ctx, task.singleton)
        if pooled_endpoint is None:
            if _direct(ctx, task.singleton):
                continue  # every connection is pooled, but this one was given its own URL
        elif where is not None and where != pooled_endpoint:
            continue  # the lock session goes to another endpoint: past the pooler
        mode_text = f"in {mode} mode" if known else "(pool mode unknown)"
        yield Finding(
            Level.CRITICAL if known else Level.WARNING,
            title=f"singleton task {task.name} locks through a pooler {mode_text}",
            why=(
                "A singleton holds a session-level advisory lock on a session of its own. "
                "In transaction pooling the server session that took the lock goes back to "
                "the pool after the statement: the lock is neither held for the task nor "
                "released when its worker dies, and another client may unlock it."
                + (
                    ""
                    if known
                    else " The pool mode is unknown: this applies if it runs transaction "
                    "or statement pooling (pass --pgbouncer session if it does not)."
                )
            ),
            fix=(
                f"Give the lock sessions a direct URL of the same database (past PgBouncer): "
                f"{ctx.option_spelled('singleton_database_url')} = 'postgresql://...' or "
                "singleton_task(url=...); or a PgBouncer database in session mode."
            ),
            subject=task.name,
            evidence={"pooler": how, "mode": mode, "lock_endpoint": where},
        )


# --- the connection budget ---------------------------------------------------------------


@rule(
    "LG016",
    "connection-budget",
    "hosts x processes x connections per process against the server's usable slots",
)
def connection_budget_rule(ctx: DoctorContext) -> Iterator[Finding]:
    server = ctx.require_server()
    ctx.require_concurrency()
    snapshot = server.snapshot
    pooler = server.pooler
    if pooler is not None:
        limit = pooler.settings.get("max_client_conn")
        if limit is None or not limit.isdigit():
            budget = connection_budget(ctx, server.endpoint, snapshot.usable_slots)
            yield Finding(
                Level.INFO,
                title="the app connects through a pooler: its connections do not count "
                "against the server's slots",
                why=(
                    f"{budget.formula()} client connections go to the pooler, whose "
                    "max_client_conn caps them; the server sees the pooler's pool sizes. "
                    "The pooler's settings could not be read (its admin console answers "
                    "only admin_users and stats_users)."
                ),
                fix="Check that max_client_conn exceeds the total, with room for deploys.",
                subject=server.target.where,
                evidence=budget.to_json(),
            )
            return
        budget = connection_budget(ctx, server.endpoint, int(limit))
        against = f"the pooler's max_client_conn ({limit})"
    else:
        budget = connection_budget(ctx, server.endpoint, snapshot.usable_slots)
        reserved = f"superuser_reserved_connections {snapshot.superuser_reserved}"
        if snapshot.reserved:
            reserved += f", reserved_connections {snapshot.reserved}"
        against = (
            f"the {snapshot.usable_slots} usable slots (max_connections "
            f"{snapshot.max_connections} minus {reserved})"
        )
    if not (budget.worker_lines or budget.web_lines):
        return
    finding = _budget_finding(budget, against)
    if finding is not None:
        yield finding


def _budget_finding(budget: Budget, against: str) -> Finding | None:
    defaults = Thresholds()
    warning = defaults.idle_warning.connections(budget.usable)
    critical = defaults.idle_critical.connections(budget.usable)
    if budget.total > critical:
        level = Level.CRITICAL
    elif budget.total > warning:
        level = Level.WARNING
    else:
        return None
    biggest = max(budget.worker_lines, key=lambda line: line.per_host, default=None)
    fix = "Lower the concurrency or the connections per process"
    if biggest is not None:
        fix += f" (largest: {biggest.what}, {biggest.per_process} per process: {biggest.how})"
    fix += (
        "; under prefork, Django's pool at {'min_size': 1, 'max_size': 2} and SQLAlchemy's "
        "pool_size=1; put PgBouncer in front of the server; or raise max_connections."
    )
    return Finding(
        level,
        title=f"the app may open {budget.total} connections, {budget.share:.0%} of {against}",
        why=(
            f"{budget.formula()}. Past the usable slots new connections fail ('remaining "
            "connection slots are reserved', 'too many clients'); close to them, a deploy "
            "(old and new workers at once), a burst or a leak tips it over. Warning above "
            "60 %, critical above 85 %, as lifeguard check judges idle connections."
        ),
        fix=fix,
        subject=None,
        evidence=budget.to_json(),
    )


@rule(
    "LG021",
    "slots-exhausted",
    "the server or the doctor's role is at its connection limit now",
)
def slots_exhausted(ctx: DoctorContext) -> Iterator[Finding]:
    server = ctx.require_server()
    limits = server.limits
    exhausted = limits.exhausted() if limits is not None else None
    if limits is None or exhausted is None:
        return
    yield Finding(
        Level.CRITICAL,
        title=exhausted,
        why=(
            "New sessions of ordinary roles (or of this role) are refused right now "
            "('remaining connection slots are reserved', 'too many clients already', "
            "'too many connections for role'): workers cannot connect, tasks fail or wait. "
            "lifeguard hands such tasks back instead of failing them, but they do not run."
        ),
        fix=(
            "Find who holds the slots (lifeguard monitor; SELECT usename, application_name, "
            "state, count(*) FROM pg_stat_activity GROUP BY 1, 2, 3); lower the workers' "
            "concurrency or pool sizes, put PgBouncer in front, or raise max_connections "
            f'or the role\'s limit (ALTER ROLE "{limits.role}" CONNECTION LIMIT n).'
        ),
        subject=server.target.where,
        evidence=limits.to_json(),
    )


# --- gevent/eventlet: the green budget -------------------------------------------------

#: A full burst (one task per greenlet) must get its connections within the wait when
#: each task keeps its connection this long (seconds); below it, the budget is too small.
GREEN_HOLD_SECONDS = 0.1


@rule(
    "LG022",
    "green-budget-fit",
    "gevent/eventlet: green budget, concurrency and the server's slots do not fit",
)
def green_budget_fit(ctx: DoctorContext) -> Iterator[Finding]:
    shape = ctx.require_pool()
    if not shape.kind.green or not ctx.installed:
        return
    shape = ctx.require_concurrency()
    options = ctx.options or ctx.guard.options
    budgets = green_budgets(options, shape, ctx.postgres_aliases())
    if not budgets:
        return
    concurrency = shape.units
    wait = options.green_wait_timeout
    explicit = options.green_budget is not None
    option = ctx.option_spelled("green_budget")
    pool = f"{shape.kind.value} -c {concurrency}"
    for alias, budget in budgets.items():
        where = f"DATABASES[{alias!r}]"
        evidence = {
            "alias": alias,
            "green_budget": budget,
            "budget_source": "green_budget" if explicit else "default: min(concurrency, 10)",
            "concurrency": concurrency,
            "green_wait_timeout": wait,
        }
        if explicit and budget > concurrency:
            yield Finding(
                Level.INFO,
                title=f"green_budget={budget} for {where} is above the concurrency ({pool})",
                why=(
                    f"A task's greenlet holds one connection at a time, so at most "
                    f"{concurrency} of the {budget} are ever in use at once: the budget "
                    "bounds nothing, and a reader of the settings expects more sessions "
                    "than the worker opens."
                ),
                fix=f"Set {option} to at most {concurrency}, or leave it unset.",
                subject=where,
                evidence=evidence,
            )
        hold = wait * budget / concurrency
        if hold < GREEN_HOLD_SECONDS:
            needed = math.ceil(concurrency * GREEN_HOLD_SECONDS / wait) if wait > 0 else budget
            yield Finding(
                Level.WARNING,
                title=f"{concurrency} greenlets share {budget} connection(s) of {where}: a "
                f"burst fails once tasks keep a connection {hold * 1000:.0f} ms",
                why=(
                    f"When every greenlet of a {pool} worker runs a task, each connection "
                    f"of the budget serves {concurrency / budget:.0f} tasks in turn; the "
                    f"last waits green_wait_timeout={wait:g}s and then fails with "
                    f"GreenBudgetExhausted unless each task keeps its connection less than "
                    f"{wait:g} s x {budget} / {concurrency} = {hold * 1000:.0f} ms. Until "
                    "then tasks stall in the wait instead of running."
                ),
                fix=(
                    f"Raise {option} to at least {max(needed, budget + 1)} (within the "
                    "server's free slots), lower the concurrency, or hold connections for "
                    "shorter spans in tasks."
                ),
                subject=where,
                evidence={**evidence, "burst_hold_ms": round(hold * 1000, 1)},
            )
    yield from _green_budget_slots(ctx, budgets, explicit, option, pool)


def _green_budget_slots(
    ctx: DoctorContext, budgets: dict[str, int], explicit: bool, option: str, pool: str
) -> Iterator[Finding]:
    """The budgets of every host's worker against the slots the server has free now."""
    server = ctx.server
    if server is None or server.limits is None or server.pooler is not None:
        return  # without the server (or behind a pooler) the budget alone is judged
    limits = server.limits
    here = [a.alias for a in ctx.postgres_aliases() if a.endpoint == server.endpoint]
    per_process = sum(budget for alias, budget in budgets.items() if alias in here)
    if not per_process:
        return
    hosts = ctx.shape.hosts
    total = hosts * per_process
    free = limits.free_slots + 1  # the doctor's own session ends with it
    evidence = {
        "hosts": hosts,
        "per_process": per_process,
        "total": total,
        "free_slots": free,
        "usable_slots": limits.usable_slots,
        "server_backends": limits.server_backends - 1,
        "green_budget_set": explicit,
    }
    figures = (
        f"{hosts} host{'s' if hosts != 1 else ''} x {per_process} (the green budget of "
        f"{', '.join(f'DATABASES[{a!r}]' for a in here if a in budgets)}) = {total}"
    )
    if not explicit:
        if total > fair_share(free):  # what each worker's first connection does
            yield Finding(
                Level.INFO,
                title=f"the default green budget will shrink: {free} slots are free now for "
                f"{total} connections",
                why=(
                    f"{figures}. A worker whose budget is the default lowers it at its "
                    "first connection to half the slots then free, so one worker never "
                    "takes the server's last ones; each worker started later gets less, "
                    "and its greenlets wait more."
                ),
                fix=(
                    f"Set {option} to what each worker should have (at most "
                    f"{max(1, free // (2 * hosts))} here), or make room on the server "
                    "(PgBouncer, a higher max_connections)."
                ),
                subject=server.target.where,
                evidence=evidence,
            )
        return
    if total <= free:
        return
    level = Level.CRITICAL if total > limits.usable_slots else Level.WARNING
    yield Finding(
        level,
        title=f"green workers may open {total} connections; the server has {free} free "
        f"slots now ({limits.usable_slots} usable)",
        why=(
            f"{figures} for {pool} workers, against {limits.summary()}; "
            f"{limits.server_backends - 1} client backends are connected now. Past the "
            "free slots the workers' connects fail ('remaining connection slots are "
            "reserved', 'too many clients') and their tasks with them."
        ),
        fix=(
            f"Lower {option} to at most {max(1, free // hosts)} per worker (unset, it "
            "takes half the free slots by itself), put PgBouncer in front, or raise "
            "max_connections."
        ),
        subject=server.target.where,
        evidence=evidence,
    )


# --- server timeouts ---------------------------------------------------------------------


@rule(
    "LG017",
    "idle-in-transaction-timeout-off",
    "idle_in_transaction_session_timeout = 0",
)
def idle_in_transaction_timeout_off(ctx: DoctorContext) -> Iterator[Finding]:
    server = ctx.require_server()
    value = server.seconds("idle_in_transaction_session_timeout")
    if value is None or value > 0:
        return
    also = ""
    if server.seconds("transaction_timeout") is not None:
        also = " PostgreSQL 17+ also bounds whole transactions with transaction_timeout."
    yield Finding(
        Level.WARNING,
        title=f"idle_in_transaction_session_timeout is 0 for role {server.role} on "
        f"{server.snapshot.database}",
        why=(
            "A session left idle inside a transaction (a task killed between BEGIN and "
            "COMMIT, a leaked connection, a debugging shell) keeps its locks and holds back "
            "vacuum for as long as its client lives. lifeguard rolls back what its workers "
            "leave open, not what web processes, scripts or other workers do."
        ),
        fix=(
            f"ALTER ROLE \"{server.role}\" SET idle_in_transaction_session_timeout = '5min'; "
            "(above the longest legitimate transaction; or ALTER DATABASE, or in "
            f"postgresql.conf).{also}"
        ),
        subject=f"role {server.role}",
        evidence={"idle_in_transaction_session_timeout": value, "role": server.role},
    )


def _kept_idle(ctx: DoctorContext, endpoint: str, timeout: float) -> tuple[list[str], list[str]]:
    """Connections the app keeps idle longer than ``timeout``: (those whose next use fails,
    those lifeguard or pre_ping replaces first)."""
    fails: list[str] = []
    replaced: list[str] = []
    green = ctx.shape.kind.green
    for alias in ctx.postgres_aliases():
        if alias.endpoint != endpoint:
            continue
        outlives = alias.conn_max_age is None or alias.conn_max_age > timeout
        if ctx.manages(alias):
            kept, checked = alias.pool is not None or outlives, True  # green: the budget
        elif alias.pool is not None:  # stock Celery closes it per task under prefork only
            kept, checked = not ctx.shape.kind.forks, alias.health_checks
        else:  # stock Celery 5.5 and older keep it for CONN_MAX_AGE
            kept = ctx.celery_version < (5, 6) and not green and outlives
            checked = alias.health_checks
        if kept:
            (replaced if checked else fails).append(f"Django {alias.where}")
    for engine in ctx.all_engines():
        if engine.endpoint != endpoint or not engine.pooled:
            continue
        if engine.recycle is not None and engine.recycle < timeout:
            continue
        if engine.registered and ctx.installed:
            replaced.append(f"SQLAlchemy {engine.label}")
        elif engine.pre_ping:
            replaced.append(f"SQLAlchemy {engine.label} (pool_pre_ping)")
        else:
            fails.append(f"SQLAlchemy {engine.label}")
    return fails, replaced


@rule(
    "LG018",
    "idle-session-timeout-vs-kept-connections",
    "idle_session_timeout shorter than the app keeps connections idle",
)
def idle_session_timeout(ctx: DoctorContext) -> Iterator[Finding]:
    server = ctx.require_server()
    timeout = server.seconds("idle_session_timeout")
    if not timeout:
        return
    fails, replaced = _kept_idle(ctx, server.endpoint, timeout)
    if not (fails or replaced):
        return
    if fails:
        level = Level.WARNING
        why = (
            f"The server ends sessions idle for {_duration(timeout)}. These connections are "
            f"kept longer and nothing checks them before use: {', '.join(fails)}; the next "
            "task that takes one fails with 'terminating connection due to idle-session "
            "timeout' or 'server closed the connection unexpectedly'."
        )
    else:
        level = Level.INFO
        why = (
            f"The server ends sessions idle for {_duration(timeout)}; "
            f"{', '.join(replaced)} keep connections longer. lifeguard (or pool_pre_ping, "
            "CONN_HEALTH_CHECKS) replaces a closed one before a task uses it, so nothing "
            "fails, but each costs a new session, and each ended session counts as "
            "sessions_fatal, which lifeguard check reports as connection errors."
        )
    yield Finding(
        level,
        title=f"idle_session_timeout={_duration(timeout)} ends connections the app keeps idle",
        why=why,
        fix=(
            f"Keep connections for less than {_duration(timeout)} (Django CONN_MAX_AGE, "
            "SQLAlchemy pool_recycle; Django's native pool keeps min_size connections "
            f'forever), or exempt the workers\' role: ALTER ROLE "{server.role}" SET '
            "idle_session_timeout = 0;"
        ),
        subject=f"role {server.role}",
        evidence={"idle_session_timeout": timeout, "fails": fails, "replaced": replaced},
    )


def _client_keepalive(options: dict[str, object]) -> float | None:
    """keepalives_idle a client asks for: libpq's keyword, asyncpg server_settings, or a
    ``-c tcp_keepalives_idle=N`` in libpq's options string."""
    for key in ("keepalives_idle",):
        if key in options:
            return _seconds(options[key])
    server_settings = options.get("server_settings")
    if isinstance(server_settings, dict) and "tcp_keepalives_idle" in server_settings:
        return _seconds(server_settings["tcp_keepalives_idle"])
    text = str(options.get("options") or "")
    marker = "tcp_keepalives_idle="
    if marker in text:
        return _seconds(text.split(marker, 1)[1].split(maxsplit=1)[0])
    return None


def _seconds(value: object) -> float | None:
    try:
        return float(str(value))
    except ValueError:
        return None


@rule(
    "LG019",
    "tcp-keepalives-default",
    "TCP keepalives left at the OS default (a dead host holds its backends for hours)",
)
def tcp_keepalives_default(ctx: DoctorContext) -> Iterator[Finding]:
    server = ctx.require_server()
    setting = server.settings.get("tcp_keepalives_idle")
    if setting is None:
        return
    if setting.configured and 0 < setting.value < OS_KEEPALIVE_IDLE:
        return
    uncovered = []
    for alias in ctx.postgres_aliases():
        if alias.endpoint == server.endpoint:
            idle = _client_keepalive(dict(alias.options))
            if idle is None or idle >= OS_KEEPALIVE_IDLE:
                uncovered.append(f"Django {alias.where}")
    for engine in ctx.all_engines():
        if engine.endpoint == server.endpoint and engine.dialect == "postgresql":
            idle = _client_keepalive(dict(engine.connect_params or {}))
            if idle is None or idle >= OS_KEEPALIVE_IDLE:
                uncovered.append(f"SQLAlchemy {engine.label}")
    if not uncovered and (ctx.django is not None or ctx.engines):
        return
    server_value = (
        f"tcp_keepalives_idle={setting.value:g}"
        if setting.configured
        else "tcp_keepalives_idle not set (the OS default)"
    )
    yield Finding(
        Level.WARNING,
        title="TCP keepalives wait for the OS default (about 2 h) before noticing a dead "
        "worker host",
        why=(
            "A worker host that dies without closing its sockets (power loss, a network "
            "partition, a killed VM) leaves its backends, their open transactions and their "
            "locks on the server until keepalives give up: with Linux defaults (7200 s idle, "
            f"then 9 probes 75 s apart) about 2 h 11 min. Server: {server_value}; clients "
            f"without keepalives_idle: {', '.join(uncovered) or 'all'}."
        ),
        fix=(
            f'On the server: ALTER ROLE "{server.role}" SET tcp_keepalives_idle = 60; (and '
            "tcp_keepalives_interval = 10, tcp_keepalives_count = 6; or the same in "
            "postgresql.conf). Or in the clients: Django OPTIONS {'keepalives_idle': 60, "
            "'keepalives_interval': 10, 'keepalives_count': 6}, the same in SQLAlchemy "
            "connect_args (psycopg, psycopg2)."
        ),
        subject=f"role {server.role}",
        evidence={
            "tcp_keepalives_idle": setting.value,
            "source": setting.source,
            "clients_without_keepalives": uncovered,
        },
    )


@rule(
    "LG020",
    "client-connection-check-off",
    "client_connection_check_interval = 0: a killed worker's query runs on",
)
def client_connection_check_off(ctx: DoctorContext) -> Iterator[Finding]:
    server = ctx.require_server()
    value = server.seconds("client_connection_check_interval")
    if value is None or value > 0:
        return  # absent before PostgreSQL 14
    hard = [task.name for task in ctx.tasks if task.time_limit]
    yield Finding(
        Level.WARNING if hard else Level.INFO,
        title=f"client_connection_check_interval is 0 for role {server.role}: the query of "
        "a killed worker process runs to its end",
        why=(
            "When a worker process dies mid-query (a hard time limit's SIGKILL, the OOM "
            "killer), the server notices only when it next writes to the socket: the query "
            "runs on, holding its locks (measured: 5.3 s of a 6 s query after SIGKILL; "
            "0.2 s with a 500 ms check)."
            + (f" Tasks with a hard time limit: {', '.join(hard[:5])}." if hard else "")
        ),
        fix=(
            f"ALTER ROLE \"{server.role}\" SET client_connection_check_interval = '1s'; "
            "(PostgreSQL 14+ on Linux; or in postgresql.conf)."
        ),
        subject=f"role {server.role}",
        evidence={"client_connection_check_interval": value, "hard_time_limit_tasks": hard},
    )
