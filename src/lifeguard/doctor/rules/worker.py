"""Rules about the app and its workers: lifeguard itself, recycling, memory limits,
late acknowledgement and prefetch."""

from __future__ import annotations

from collections.abc import Iterator

from ...hooks import PoolKind
from ..context import LONG_TASK_SECONDS, DoctorContext, TaskInfo
from ..findings import Finding, Level
from ..registry import rule

KIB = 1024
MIB = 1024 * 1024
#: A limit less than this much above the birth RSS leaves too little for the tasks.
HEADROOM = 1.25


def _mib(size: float) -> str:
    return f"{size / MIB:.1f} MiB"


def _names(items: list[str], limit: int = 5) -> str:
    shown = ", ".join(items[:limit])
    return shown + (f" and {len(items) - limit} more" if len(items) > limit else "")


@rule("LG001", "lifeguard-not-installed", "lifeguard is not installed on the app")
def lifeguard_not_installed(ctx: DoctorContext) -> Iterator[Finding]:
    if ctx.installed:
        return
    yield Finding(
        Level.WARNING,
        title=f"lifeguard is not installed on the Celery app {ctx.app_name}",
        why=(
            "Its workers run with Celery's stock handling: Celery 5.6+ closes every Django "
            "connection around every task, 5.5 and older reuse connections a soft time "
            "limit left mid-query; SQLAlchemy pools are copied across fork; memory "
            "recycling is prefork-only and measures the lifetime peak; and no worker "
            "connection is named in pg_stat_activity."
        ),
        fix=(
            "In the module that creates the app: `import lifeguard` and, after "
            "`app = Celery(...)` and its configuration, `guard = lifeguard.install(app)`."
        ),
        subject=ctx.app_name,
    )


@rule("LG002", "lifeguard-options-invalid", "lifeguard options the worker refuses")
def lifeguard_options_invalid(ctx: DoctorContext) -> Iterator[Finding]:
    if ctx.options_error is None:
        return
    yield Finding(
        Level.CRITICAL,
        title="a lifeguard option in the app's configuration is invalid",
        why=(
            "The worker reads lifeguard_* settings at start and stops (exit status 78) "
            f"when one is wrong: {ctx.options_error}"
        ),
        fix="Correct the option as the message says.",
        subject=ctx.app_name,
        evidence={"error": ctx.options_error},
    )


@rule(
    "LG003",
    "recycling-ignored-by-pool",
    "worker_max_tasks_per_child / worker_max_memory_per_child on a pool that ignores them",
)
def recycling_ignored_by_pool(ctx: DoctorContext) -> Iterator[Finding]:
    shape = ctx.require_pool()
    if shape.kind.forks or shape.kind is PoolKind.OTHER:
        return
    settings = [s for s in (shape.max_tasks_per_child, shape.max_memory_per_child) if s]
    if not settings:
        return
    names = " and ".join(setting.name for setting in settings)
    if ctx.installed:
        fix = (
            f"Remove {names}. For memory, set lifeguard's memory_growth_limit, which works "
            f"on every pool: {ctx.option_spelled('memory_growth_limit')} = '300MiB' (the "
            "worker then stops warmly between tasks and its supervisor starts it again)."
        )
    else:
        fix = (
            f"Remove {names}, or run these tasks on a prefork worker. lifeguard's memory "
            "limits work on every pool: lifeguard.install(app, memory_growth_limit='300MiB')."
        )
    yield Finding(
        Level.WARNING,
        title=f"{names} set for the {shape.kind.value} pool, which ignores "
        f"{'them' if len(settings) > 1 else 'it'}",
        why=(
            "Celery hands the recycling settings to the prefork pool only; the threads, "
            "gevent, eventlet and solo pools keep them and never read them, without a "
            "warning: no process is ever recycled."
        ),
        fix=fix,
        subject=ctx.app_name,
        evidence={
            "pool": f"{shape.kind.value} ({shape.pool.source})",
            **{setting.name: f"{setting.value} ({setting.source})" for setting in settings},
        },
    )


@rule(
    "LG004",
    "memory-limit-below-birth-rss",
    "a memory limit at or below the RSS a worker process starts with",
)
def memory_limit_below_birth_rss(ctx: DoctorContext) -> Iterator[Finding]:
    shape = ctx.require_pool()
    limits = shape.max_memory_per_child is not None or (
        ctx.options is not None and ctx.options.memory_limit is not None
    )
    if not limits:
        return
    birth = ctx.require_birth_rss()
    estimate = (
        f"The birth RSS is an estimate: this process's RSS ({_mib(birth)}) after importing "
        "the app and Celery's worker modules; a running worker's MainProcess, which every "
        "prefork child copies, is usually somewhat larger."
    )
    celery_limit = shape.max_memory_per_child
    if celery_limit is not None and shape.kind.forks:
        yield from _celery_limit(ctx, int(celery_limit.value), celery_limit.source, birth, estimate)
    memory_limit = ctx.options.memory_limit if ctx.options is not None else None
    if memory_limit is not None and memory_limit <= birth:
        suggest = _round_up_mib(birth + 256 * MIB)
        yield Finding(
            Level.WARNING,
            title=f"lifeguard memory_limit={_mib(memory_limit)} is below the RSS a worker "
            f"process starts with (about {_mib(birth)})",
            why=(
                "lifeguard does not recycle a process that starts above memory_limit (its "
                "replacement would start as large), so this limit never applies. " + estimate
            ),
            fix=(
                f"Set {ctx.option_spelled('memory_limit')} above the birth RSS plus the "
                f"largest task's working set, e.g. '{suggest // MIB}MiB', or use "
                "memory_growth_limit (e.g. '300MiB'), which ignores how large a process "
                "starts."
            ),
            subject=ctx.app_name,
            evidence={"memory_limit_bytes": memory_limit, "birth_rss_estimate_bytes": birth},
        )


def _celery_limit(
    ctx: DoctorContext, kib: int, source: str, birth: int, estimate: str
) -> Iterator[Finding]:
    limit = kib * KIB
    if limit > birth * HEADROOM:
        return
    name = ctx.spelled("worker_max_memory_per_child") if source == "app.conf" else source
    units = f" The value is in KiB: {kib} means {_mib(limit)}."
    if kib < 16 * KIB:  # a number of megabytes, most likely
        units += f" If you meant {kib} MB, write {kib * KIB}."
    suggest_kib = _round_up_mib(birth + 256 * MIB) // KIB
    if limit <= birth:
        level = Level.CRITICAL
        title = (
            f"worker_max_memory_per_child={kib} (KiB, {_mib(limit)}) is below the RSS a "
            f"prefork child starts with (about {_mib(birth)})"
        )
        why = (
            "Celery compares each child's peak RSS with this limit after every task. A "
            "forked child starts with the pages it shares with the MainProcess, so every "
            "child is over the limit from birth: it is replaced after each task, and its "
            f"replacement starts just as large (celery#4125).{units} {estimate}"
        )
    else:
        level = Level.WARNING
        title = (
            f"worker_max_memory_per_child={kib} (KiB, {_mib(limit)}) leaves less than "
            f"{_mib(limit - birth)} above the RSS a prefork child starts with "
            f"(about {_mib(birth)})"
        )
        why = (
            "Celery compares each child's peak RSS (ru_maxrss) with this limit after every "
            "task: one task that briefly needs more than the headroom recycles the child, "
            f"and a MainProcess that grows a little puts every child over it.{units} {estimate}"
        )
    fix = (
        f"Set {name} well above the birth RSS plus the largest task's working set, e.g. "
        f"{suggest_kib} (KiB), or use lifeguard's memory_growth_limit, which measures growth "
        "since the child's first task and works on every pool."
    )
    yield Finding(
        level,
        title=title,
        why=why,
        fix=fix,
        subject=ctx.app_name,
        evidence={
            "worker_max_memory_per_child_kib": kib,
            "source": source,
            "birth_rss_estimate_bytes": birth,
        },
    )


def _round_up_mib(size: int, step: int = 64 * MIB) -> int:
    return -(-size // step) * step


@rule(
    "LG005",
    "acks-late-without-worker-lost-decision",
    "task_acks_late without a decision on task_reject_on_worker_lost",
)
def acks_late_without_decision(ctx: DoctorContext) -> Iterator[Finding]:
    undecided = [
        task
        for task in ctx.tasks
        if task.acks_late and task.reject_on_worker_lost is None and not task.retry_on_worker_lost
    ]
    app_level = (
        ctx.conf_set("task_acks_late")
        and bool(ctx.conf.get("task_acks_late"))
        and not ctx.conf_set("task_reject_on_worker_lost")
        and not ctx.conf_set("task_retry_on_worker_lost")
    )
    retry = (
        f" or {ctx.spelled('task_retry_on_worker_lost')} = True (Celery 5.7+: sent again "
        "like a retry, bounded by max_retries)"
        if "task_retry_on_worker_lost" in ctx.conf
        else ""
    )
    why = (
        "With late acknowledgement a message is acknowledged after its task ran. If the "
        "process running it dies (OOM killer, SIGKILL, a hard time limit), Celery still "
        "acknowledges it and records a WorkerLostError FAILURE unless "
        "task_reject_on_worker_lost is True: the task is lost, which acks_late was meant "
        "to prevent. With True it is redelivered, and a task that kills its process every "
        "time loops forever. Either can be right; it has to be chosen."
    )
    if app_level:
        yield Finding(
            Level.WARNING,
            title=f"{ctx.spelled('task_acks_late')} is on without a decision on "
            f"{ctx.spelled('task_reject_on_worker_lost')}",
            why=why,
            fix=(
                f"Write {ctx.spelled('task_reject_on_worker_lost')} = True (redelivered: make "
                "the tasks idempotent and bound their memory) or = False (acknowledged and "
                f"lost as a FAILURE){retry}."
            ),
            subject=ctx.app_name,
            evidence={"tasks": [task.name for task in undecided]},
        )
    own = [task for task in undecided if not app_level]
    if own:
        names = [task.name for task in own]
        yield Finding(
            Level.WARNING,
            title=f"acks_late task{'s' if len(own) > 1 else ''} {_names(names)} without a "
            "decision on reject_on_worker_lost",
            why=why,
            fix=(
                "Decide per task: @app.task(acks_late=True, reject_on_worker_lost=True) (or "
                f"False), or for the whole app with {ctx.spelled('task_reject_on_worker_lost')}"
                f"{retry}."
            ),
            subject=", ".join(names),
            evidence={"tasks": names},
        )


@rule(
    "LG006",
    "prefetch-with-long-tasks",
    "worker_prefetch_multiplier above 1 with long or late-acknowledged tasks",
)
def prefetch_with_long_tasks(ctx: DoctorContext) -> Iterator[Finding]:
    if ctx.conf.get("worker_disable_prefetch"):
        return
    multiplier = int(ctx.conf.get("worker_prefetch_multiplier") or 0)
    if multiplier == 1:
        return
    long_tasks: list[TaskInfo] = [task for task in ctx.tasks if task.long or task.acks_late]
    if not long_tasks:
        return
    shape = ctx.shape
    if multiplier == 0:
        reserved = "every message in the queue (0: no limit)"
    elif shape.concurrency_known or ctx.assume_shape:
        concurrency = int(shape.concurrency.value)
        reserved = f"{multiplier} x {concurrency} = {multiplier * concurrency} messages per worker"
    else:
        reserved = f"{multiplier} x its concurrency messages"
    kinds = []
    if any(task.long for task in long_tasks):
        kinds.append(f"time limits of {LONG_TASK_SECONDS:.0f} s or more")
    if any(task.acks_late for task in long_tasks):
        kinds.append("acks_late")
    names = [task.name for task in long_tasks]
    yield Finding(
        Level.WARNING,
        title=f"worker_prefetch_multiplier={multiplier} with tasks that have {' or '.join(kinds)}",
        why=(
            f"A worker reserves {reserved} ahead of time. A message reserved behind a long "
            "task waits for it while other workers sit idle; with acks_late every reserved "
            "message goes back to the queue if the worker dies (on Redis and SQS, after the "
            "visibility timeout, possibly while another worker already ran it)."
        ),
        fix=(
            f"{ctx.spelled('worker_prefetch_multiplier')} = 1 on the workers that run these "
            "tasks (keep a larger prefetch on a separate worker for short tasks)."
        ),
        subject=_names(names),
        evidence={
            "worker_prefetch_multiplier": multiplier,
            "concurrency": shape.concurrency.value,
            "tasks": {task.name: task.longest_limit for task in long_tasks},
        },
    )
