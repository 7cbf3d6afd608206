"""``lifeguard validate``: the commonly recommended load test, run against your own workers.

Record a baseline of the database's connections, send a burst of tasks through your app,
wait for them to drain, let connections settle, look again, and judge: idle connections
back to the baseline (+10%), none idle in transaction, no connection errors, the workers
within their connection budget, every task succeeded; with ``--soak``, no task process
whose memory keeps growing. Exit status (docs/commands.md): 0 pass, 1 fail, 3 could not
run.
"""

from __future__ import annotations

import json
import re
import sys
from typing import Any, NoReturn

import click

from ..errors import ConfigurationError
from ..monitor.target import DatabaseUnreachable
from ._database import NagiosCommand, database_options, load_app, prefix_for
from ._exit import Exit

EXIT_PASS, EXIT_FAIL, EXIT_CANNOT_RUN = Exit.OK, Exit.WARNING, Exit.CANNOT_RUN
MIB = 1024 * 1024
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|min|h)?\s*$", re.IGNORECASE)
_SECONDS_PER = {"ms": 0.001, "s": 1, "m": 60, "min": 60, "h": 3600}


def _duration(ctx: click.Context, param: click.Parameter, value: str | None) -> float | None:
    """``90``, ``30s``, ``5m``, ``1.5h`` -> seconds."""
    if value is None:
        return None
    match = _DURATION.match(value)
    if match is None or float(match.group(1)) <= 0:
        raise click.BadParameter(f"{value!r} is not a duration such as 30s, 5m or 1h")
    return float(match.group(1)) * _SECONDS_PER[(match.group(2) or "s").lower()]


def _size(ctx: click.Context, param: click.Parameter, value: str) -> int:
    """``5MiB``, ``512KiB``, ``1MB`` -> bytes (at least 1 KiB: a bare number is bytes)."""
    from ..options import size_in_bytes

    try:
        size = size_in_bytes(value)
    except ValueError as exc:
        raise click.BadParameter(
            f"{value!r} is not a size such as 5MiB or 512KiB ({exc})"
        ) from None
    if size < 1024:
        raise click.BadParameter(f"{value!r} is {size} bytes; give a unit, e.g. {size}KiB")
    return size


def _json(kind: type) -> Any:
    def parse(ctx: click.Context, param: click.Parameter, value: str) -> Any:
        try:
            parsed = json.loads(value)
        except ValueError as exc:
            raise click.BadParameter(f"not JSON ({exc}): {value!r}") from None
        if not isinstance(parsed, kind):
            raise click.BadParameter(f"must be a JSON {kind.__name__}, not {value!r}")
        return parsed

    return parse


@click.command(cls=NagiosCommand)
@database_options
@click.option("--task", "task_name", required=True, metavar="NAME", help="The task to send.")
@click.option(
    "--args", "task_args", metavar="JSON", default="[]", callback=_json(list), help="A list."
)
@click.option(
    "--kwargs", "task_kwargs", metavar="JSON", default="{}", callback=_json(dict), help="An object."
)
@click.option(
    "--count", type=click.IntRange(min=1), default=500, show_default=True, help="Tasks to send."
)
@click.option(
    "--concurrency",
    type=click.IntRange(min=1),
    help="At most this many tasks sent and unfinished at a time (default: all at once).",
)
@click.option("--queue", help="Queue to send to (default: the task's route in the app).")
@click.option(
    "--budget",
    type=click.IntRange(min=0),
    help="Connections the workers may hold (default: their concurrency x the app's "
    "PostgreSQL databases).",
)
@click.option(
    "--soak",
    metavar="DURATION",
    callback=_duration,
    help="Then keep the load going this long (30s, 10m, 1h) and judge memory growth.",
)
@click.option(
    "--slope-limit",
    metavar="SIZE",
    callback=_size,
    default="5MiB",
    show_default=True,
    help="With --soak: a task process whose RSS keeps growing faster than this per minute fails.",
)
@click.option(
    "--settle",
    type=click.FloatRange(min=0),
    default=3.0,
    show_default=True,
    help="Seconds to wait after the last task before the final look.",
)
@click.option(
    "--interval",
    type=click.FloatRange(min=0.1),
    default=0.5,
    show_default=True,
    help="Seconds between samples of connections and memory.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1),
    default=300.0,
    show_default=True,
    help="Seconds to wait for outcomes after the last task was sent.",
)
@click.option(
    "--warmup-rounds",
    type=click.IntRange(min=0),
    default=3,
    show_default=True,
    help="Warm-up rounds (2 tasks per unit of concurrency) before the baseline; 0: none.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the result as JSON.")
@click.option(
    "--report",
    "report_path",
    type=click.Path(dir_okay=False, writable=True),
    help="Write an HTML report with charts to this file.",
)
@click.pass_context
def validate(
    ctx: click.Context,
    /,
    *,
    task_name: str,
    task_args: list[Any],
    task_kwargs: dict[str, Any],
    count: int,
    concurrency: int | None,
    queue: str | None,
    budget: int | None,
    soak: float | None,
    slope_limit: int,
    settle: float,
    interval: float,
    timeout: float,
    warmup_rounds: int,
    as_json: bool,
    report_path: str | None,
    **options: Any,
) -> None:
    """Load your workers with a task and check connections and memory come back healthy.

    Exit status: 0 pass, 1 fail, 3 could not run.
    """
    from ..monitor.report import Monitor
    from ..monitor.target import resolve_target
    from ..monitor.thresholds import Thresholds
    from ..report import write_html
    from ..validate.load import TaskCall
    from ..validate.run import Settings, Validation
    from ..validate.workers import CannotValidate

    if not options.get("app"):
        _cannot_run(ctx, "give the Celery app with -A (as for celery -A)", as_json)
    try:
        app = load_app(options["app"])
        target = resolve_target(options.get("database_url"), app, options["database_alias"])
        monitor = Monitor(
            target,
            prefix_for(options.get("prefix"), app),
            Thresholds(),
            connect_timeout=options["connect_timeout"],
        )
        call = TaskCall(task_name, tuple(task_args), task_kwargs, queue or _route(app, task_name))
        _check_results_kept(app, task_name)
    except ConfigurationError as exc:
        _cannot_run(ctx, str(exc), as_json)
    settings = Settings(
        call=call,
        count=count,
        concurrency=concurrency,
        budget=budget,
        soak=soak,
        slope_limit=slope_limit,
        settle=settle,
        interval=interval,
        timeout=timeout,
        warmup_rounds=warmup_rounds,
        inspect_timeout=options["inspect_timeout"],
    )
    try:
        with _progress() as progress:
            validation = Validation(app, monitor, settings, options["app"], progress)
            result = validation.run()
    except (CannotValidate, DatabaseUnreachable, ConfigurationError) as exc:
        _cannot_run(ctx, str(exc), as_json)
    except KeyboardInterrupt:
        _cannot_run(ctx, "interrupted: tasks already sent may still run", as_json)
    finally:
        monitor.close()
    summary = dict(result.summary)
    summary["report"] = str(write_html(result.record, report_path)) if report_path else None
    if as_json:
        click.echo(json.dumps(summary, indent=2, default=str))
    else:
        _print_text(summary)
    ctx.exit(EXIT_PASS if result.passed else EXIT_FAIL)


def _route(app: Any, task_name: str) -> str:
    """The queue the app routes the task to."""
    try:
        queue = app.amqp.router.route({}, task_name)["queue"]
        return str(getattr(queue, "name", queue))
    except Exception:
        return str(app.conf.task_default_queue)


def _check_results_kept(app: Any, task_name: str) -> None:
    task = app.tasks.get(task_name)
    if task is not None and getattr(task, "ignore_result", False):
        raise ConfigurationError(
            f"the task {task_name} has ignore_result=True: lifeguard validate reads each "
            "task's outcome from the result backend; validate a task that keeps its result"
        )


def _cannot_run(ctx: click.Context, message: str, as_json: bool) -> NoReturn:
    if as_json:
        error = {"result": "error", "exit_code": EXIT_CANNOT_RUN, "error": message}
        click.echo(json.dumps(error))
    else:
        click.echo(f"lifeguard validate: cannot run: {message}", err=True)
    ctx.exit(EXIT_CANNOT_RUN)


class _Bar:
    """The run's progress as a rich progress bar on stderr (only in a terminal)."""

    def __init__(self, progress: Any) -> None:
        self.progress = progress
        self.task: Any = None

    def phase(self, name: str, total: float | None = None) -> None:
        self._finish()
        self.task = self.progress.add_task(name, total=total, detail="")

    def update(self, completed: float, detail: str = "") -> None:
        if self.task is not None:
            self.progress.update(self.task, completed=completed, detail=detail)

    def _finish(self) -> None:
        if self.task is None:
            return
        total = next(t.total for t in self.progress.tasks if t.id == self.task) or 1
        self.progress.update(self.task, total=total, completed=total)
        self.progress.stop_task(self.task)

    def close(self) -> None:
        self._finish()
        self.task = None


class _progress:  # used as a context manager, like open()
    def __enter__(self) -> _Bar:
        from rich.console import Console
        from rich.progress import (
            BarColumn,
            Progress,
            SpinnerColumn,
            TaskProgressColumn,
            TextColumn,
            TimeElapsedColumn,
        )

        console = Console(stderr=True)
        self.progress = Progress(
            SpinnerColumn(finished_text="[green]✓[/]"),
            TextColumn("{task.description:<20}"),
            BarColumn(bar_width=24),
            TaskProgressColumn(),
            TimeElapsedColumn(),
            TextColumn("{task.fields[detail]}", style="dim"),
            console=console,
            disable=not console.is_terminal,
        )
        self.progress.start()
        self.bar = _Bar(self.progress)
        return self.bar

    def __exit__(self, *exc: object) -> None:
        self.bar.close()
        self.progress.stop()


def _print_text(summary: dict[str, Any]) -> None:
    from rich.console import Console

    console = Console(highlight=False, soft_wrap=True)
    tasks, conns = summary["tasks"], summary["connections"]
    workers = ", ".join(
        f"{w['node']} ({w['pool']} -c {w['concurrency']}{', lifeguard' if w['lifeguard'] else ''})"
        for w in summary["workers"]
    )
    rate = f", {tasks['per_second']:g} tasks/s" if tasks.get("per_second") else ""
    memory = summary["memory"]
    measured = [p for p in memory["processes"] if p["last_rss"]]
    rss = [p["last_rss"] for p in measured]
    growth = max((p["last_rss"] - p["first_rss"] for p in measured), default=0)
    lines = [
        f"lifeguard validate: {summary['task']} on queue {summary['queue']}",
        f"  workers:     {workers}",
        f"  database:    {summary['database']}",
        f"  tasks:       {tasks['sent']} sent, {tasks['succeeded']} succeeded, "
        f"{tasks['failed']} failed, {tasks['unfinished']} unfinished{rate}",
        f"  connections: idle {conns['baseline']['by_state'].get('idle', 0)} before, "
        f"{conns['final']['by_state'].get('idle', 0)} after; workers held at most "
        f"{conns['peak']['workers']} (budget {summary['budget']['connections']}: "
        f"{summary['budget']['explained']})",
        f"  memory:      {len(memory['processes'])} task processes"
        + (
            f", RSS {min(rss) / MIB:.1f}-{max(rss) / MIB:.1f} MiB at the end, grew at most "
            f"{growth / MIB:+.1f} MiB"
            if rss
            else ", RSS unknown"
        )
        + f", {len(memory['recycles'])} went away (recycled)",
    ]
    for line in lines:
        console.print(line)
    styles = {"pass": "green", "fail": "bold red"}
    for criterion in summary["criteria"]:
        status = criterion["status"]
        console.print(
            f"  [{styles.get(status, 'dim')}]{status.upper():<4}[/] "
            f"{criterion['title']}: [dim]{criterion['detail']}[/]"
        )
    verdict = summary["result"].upper()
    console.print(f"[{styles[summary['result']]}]{verdict}[/]", end="")
    console.print(f"  report: {summary['report']}" if summary["report"] else "")
    sys.stdout.flush()
