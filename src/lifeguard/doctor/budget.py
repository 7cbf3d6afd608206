"""The connection budget: how many connections the app may hold on the server it uses.

Per host, each process that runs tasks (every prefork child, or the one worker process of
the other pools) holds, for each Django alias and SQLAlchemy engine that points at the
server that was read:

* Django, no native pool: one connection per thread or greenlet that runs a task (the
  concurrency under threads, gevent and eventlet; one per prefork child or solo worker);
  under gevent/eventlet with lifeguard and ``CONN_MAX_AGE > 0``, its ``green_budget``;
* Django's native pool: its ``min_size`` is always open (lifeguard opens it after fork),
  and it grows up to ``max_size`` as tasks need connections;
* a SQLAlchemy pool: one connection per task running at once, up to
  ``pool_size + max_overflow`` (a task is assumed to use one connection of an engine at
  a time); ``NullPool`` opens one per running task.

Times the hosts, plus each web process (one connection per alias, or its pool's
``max_size``), against the slots ordinary roles may use: ``max_connections`` minus
``superuser_reserved_connections`` and ``reserved_connections`` (PostgreSQL 16+).
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from ..concerns.green_pool import default_budget
from ..options import Options
from .context import DjangoAlias, DoctorContext, EngineInfo, WorkerShape


@dataclass(frozen=True)
class BudgetLine:
    """Connections one kind of client may hold, per process."""

    what: str  # "Django DATABASES['default']", "SQLAlchemy engine postgresql://..."
    per_process: int
    processes: int  # per host
    how: str  # how ``per_process`` was computed

    @property
    def per_host(self) -> int:
        return self.per_process * self.processes

    def to_json(self) -> dict[str, object]:
        return {
            "what": self.what,
            "per_process": self.per_process,
            "processes_per_host": self.processes,
            "per_host": self.per_host,
            "how": self.how,
        }


@dataclass(frozen=True)
class Budget:
    hosts: int
    worker_lines: tuple[BudgetLine, ...]
    web_lines: tuple[BudgetLine, ...]
    usable: int  # the server's usable slots (or the pooler's max_client_conn)
    elsewhere: tuple[str, ...]  # the app's databases on another server, not counted

    @property
    def workers(self) -> int:
        return self.hosts * sum(line.per_host for line in self.worker_lines)

    @property
    def web(self) -> int:
        return sum(line.per_host for line in self.web_lines)

    @property
    def total(self) -> int:
        return self.workers + self.web

    @property
    def share(self) -> float:
        return self.total / self.usable if self.usable > 0 else float("inf")

    def formula(self) -> str:
        """``2 hosts x (4 x 1 + 4 x 2) + 10 web x 1 = 34``."""
        per_host = " + ".join(
            f"{line.processes} x {line.per_process}" for line in self.worker_lines
        )
        text = f"{self.hosts} host{'s' if self.hosts != 1 else ''} x ({per_host or '0'})"
        for line in self.web_lines:
            text += f" + {line.processes} web x {line.per_process}"
        return f"{text} = {self.total}"

    def to_json(self) -> dict[str, object]:
        return {
            "hosts": self.hosts,
            "workers": [line.to_json() for line in self.worker_lines],
            "web": [line.to_json() for line in self.web_lines],
            "total": self.total,
            "usable": self.usable,
            "share": round(self.share, 4) if self.usable > 0 else None,
            "elsewhere": list(self.elsewhere),
        }


def django_per_process(
    alias: DjangoAlias, shape: WorkerShape, green_budget: int | None = None
) -> tuple[int, str]:
    units = shape.units
    if green_budget is not None:
        return min(units, green_budget), (
            f"lifeguard's green budget: {green_budget} connections shared by {units} greenlets"
        )
    if alias.pool is not None:
        count = max(alias.pool_min_size, min(alias.pool_max_size, units))
        return count, (
            f"native pool: min_size {alias.pool_min_size} always open, up to max_size "
            f"{alias.pool_max_size}, {units} task(s) at once"
        )
    if units == 1:
        return 1, "one connection per process"
    return units, f"one connection per {shape.kind.value} task slot (-c {units})"


def engine_per_process(engine: EngineInfo, shape: WorkerShape) -> tuple[int, str]:
    units = shape.units
    capacity = engine.capacity
    if capacity is None:
        return units, f"{engine.pool_class}: one connection per running task ({units})"
    count = min(capacity, units)
    return count, (
        f"{engine.pool_class} of {capacity} (pool_size + max_overflow), {units} task(s) at once"
    )


def worker_lines(
    aliases: Iterable[DjangoAlias],
    engines: Iterable[EngineInfo],
    shape: WorkerShape,
    green_budgets: Mapping[str, int] | None = None,
) -> list[BudgetLine]:
    """What each task process of a worker of ``shape`` may hold, per alias and engine.

    ``lifeguard validate`` uses it too, with the shape of each running worker.
    ``green_budgets``: the aliases whose greenlets share lifeguard's green budget.
    """
    lines: list[BudgetLine] = []
    for alias in aliases:
        budget = (green_budgets or {}).get(alias.alias)
        per_process, how = django_per_process(alias, shape, budget)
        lines.append(BudgetLine(f"Django {alias.where}", per_process, shape.processes, how))
    for engine in engines:
        per_process, how = engine_per_process(engine, shape)
        lines.append(BudgetLine(f"SQLAlchemy {engine.label}", per_process, shape.processes, how))
    return lines


def connection_budget(ctx: DoctorContext, endpoint: str, usable: int) -> Budget:
    """The budget of the app's connections to the server at ``endpoint``."""
    shape = ctx.shape
    options = (ctx.options or ctx.guard.options) if ctx.installed and ctx.guard else None
    engines = [engine for engine in ctx.all_engines() if engine.dialect == "postgresql"]
    here = [alias for alias in ctx.postgres_aliases() if alias.endpoint == endpoint]
    engines_here = [engine for engine in engines if engine.endpoint == endpoint]
    elsewhere = [
        f"Django {alias.description}"
        for alias in ctx.postgres_aliases()
        if alias.endpoint != endpoint
    ] + [f"SQLAlchemy {engine.label}" for engine in engines if engine.endpoint != endpoint]
    web_lines = [
        BudgetLine(
            f"Django {alias.where}",
            alias.pool_max_size if alias.pool is not None else 1,
            shape.web_processes,
            "per web process",
        )
        for alias in here
        if shape.web_processes
    ]
    return Budget(
        hosts=shape.hosts,
        worker_lines=tuple(
            worker_lines(here, engines_here, shape, green_budgets(options, shape, here))
        ),
        web_lines=tuple(web_lines),
        usable=usable,
        elsewhere=tuple(elsewhere),
    )


def green_budgets(
    options: Options | None, shape: WorkerShape, aliases: Iterable[DjangoAlias]
) -> dict[str, int]:
    """Aliases whose greenlets share lifeguard's green budget (``options``: the installed
    lifeguard's, None without it), and its size."""
    if options is None or options.django is False or not shape.kind.green:
        return {}
    budget = options.green_budget or default_budget(shape.units)
    return {
        alias.alias: budget
        for alias in aliases
        if (options.django_aliases is None or alias.alias in options.django_aliases)
        and alias.pool is None
        and alias.conn_max_age != 0
    }
