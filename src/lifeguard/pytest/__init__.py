"""lifeguard's pytest plugin: a real worker of your app, and a failure for each leak it saw.

Enable it in the ini file (the entry point ``lifeguard.pytest`` loads it once
``celery-lifeguard[pytest]`` is installed; ``-p lifeguard.pytest`` loads it from a
checkout)::

    [pytest]
    lifeguard = true
    lifeguard_celery_app = proj.celery

Every test then sends its tasks to one real ``celery worker`` of ``proj.celery`` with
lifeguard installed (prefork unless a marker or ``lifeguard_pool`` says otherwise),
started once per session. After each test that sent tasks, what lifeguard saw inside the
worker while running them (a transaction left open, a statement interrupted, a
connection leaked by a thread or greenlet, a task failing on a database fault) and what
the database shows (a backend still idle in transaction, sessions the server counted as
abandoned or fatal while the tasks ran) fails the test, naming the task, the reason and
where. See docs/pytest.md.
"""

from __future__ import annotations

import os
import re
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from ..options import size_in_bytes
from .worker import (
    CHECKS,
    ActivityReader,
    Finding,
    SessionEnds,
    SessionWorker,
    sessions_abandoned,
)

MIN_SLOPE_POINTS = 5
POOLS = ("prefork", "threads", "gevent", "eventlet", "solo")


class LifeguardWarning(UserWarning):
    """A lifeguard finding reported as a warning (``lifeguard_report = warn`` or
    ``@pytest.mark.lifeguard(warn=True)``)."""


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup("lifeguard", "lifeguard: a real Celery worker, checked after each test")
    group.addoption(
        "--lifeguard",
        action="store_true",
        default=None,
        help="Run every test against a real worker of lifeguard_celery_app (ini: lifeguard).",
    )
    group.addoption("--lifeguard-pool", default=None, help="Default pool of the worker.")
    parser.addini(
        "lifeguard", "Run every test against the real worker.", type="bool", default=False
    )
    parser.addini("lifeguard_celery_app", "The app the worker runs, e.g. proj.celery or proj:app.")
    parser.addini("lifeguard_pool", "Default pool: prefork, threads, gevent, eventlet, solo.")
    parser.addini("lifeguard_concurrency", "Worker concurrency (default 2).", default="2")
    parser.addini(
        "lifeguard_queues", "Queues the worker consumes (default: the app's default queue).",
        type="args", default=[],
    )  # fmt: skip
    parser.addini("lifeguard_broker_url", "Broker URL (default: the app's, else Redis).")
    parser.addini("lifeguard_result_backend", "Result backend (default: the app's, else Redis).")
    parser.addini(
        "lifeguard_database_url",
        "PostgreSQL to read pg_stat_activity from (default: Django's default database).",
    )
    parser.addini("lifeguard_report", "fail (default) or warn.", default="fail")
    parser.addini("lifeguard_allow", "Checks allowed in every test.", type="args", default=[])
    parser.addini(
        "lifeguard_wait", "Seconds to wait after a test for its tasks to end.", default="10"
    )


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "lifeguard(allow=[...], pool=..., warn=False): allow lifeguard checks by name "
        f"({', '.join(CHECKS)}), choose the worker's pool, or report findings as warnings",
    )
    config.stash[_STATE] = _State(config)


@dataclass
class _Settings:
    allow: frozenset[str]
    pool: str
    warn: bool


class _State:
    """The session's worker (one at a time; another pool replaces it) and settings."""

    def __init__(self, config: pytest.Config) -> None:
        self.config = config
        self.worker: SessionWorker | None = None
        self.app: Any = None
        self.activity: ActivityReader | None = None
        self.sessions_check = True
        # The figures read at the running test's first publish, or why they could not be.
        self.before: SessionEnds | None = None
        self.before_error: Exception | None = None
        # The bad session ends read after the last checked test, and that test's id.
        self.last_ends: tuple[SessionEnds, str] | None = None

    @property
    def enabled(self) -> bool:
        flag = self.config.getoption("lifeguard")
        return bool(flag if flag is not None else self.config.getini("lifeguard"))

    def default_pool(self) -> str:
        return str(
            self.config.getoption("lifeguard_pool")
            or self.config.getini("lifeguard_pool")
            or "prefork"
        )

    def settings(self, item: pytest.Item) -> _Settings:
        allow = set(self.config.getini("lifeguard_allow"))
        pool = self.default_pool()
        warn = str(self.config.getini("lifeguard_report")).strip().lower() == "warn"
        for marker in reversed(list(item.iter_markers("lifeguard"))):  # closest wins
            allow |= set(marker.kwargs.get("allow", ()))
            pool = marker.kwargs.get("pool", pool)
            warn = bool(marker.kwargs.get("warn", warn))
        unknown = allow - set(CHECKS)
        if unknown:
            raise pytest.UsageError(
                f"lifeguard: unknown check(s) {sorted(unknown)} in allow=; "
                f"the checks are {', '.join(CHECKS)}"
            )
        if pool not in POOLS:
            raise pytest.UsageError(f"lifeguard: pool {pool!r} is none of {', '.join(POOLS)}")
        return _Settings(frozenset(allow), pool, warn)

    def load_app(self, request: pytest.FixtureRequest) -> tuple[str, Any]:
        from celery.app.utils import find_app

        path = str(self.config.getini("lifeguard_celery_app") or "")
        if not path:
            if "celery_app" not in request.fixturenames and not _has_fixture(request, "celery_app"):
                raise pytest.UsageError(
                    "lifeguard: name the Celery app: `lifeguard_celery_app = proj.celery` in "
                    "the ini file, or a `celery_app` fixture returning it"
                )
            path = _import_path(request.getfixturevalue("celery_app"))
        return path, find_app(path)

    def worker_for(self, request: pytest.FixtureRequest, pool: str) -> SessionWorker:
        if self.worker is not None and self.worker.pool == pool:
            return self.worker
        if self.worker is not None:
            self.worker.stop(self.app)
            self.worker = None
        self.last_ends = None  # the old worker's sessions end now: no test's doing
        path, app = self.load_app(request)
        self.app = app
        broker = str(self.config.getini("lifeguard_broker_url") or "")
        backend = str(self.config.getini("lifeguard_result_backend") or "")
        if not broker and not app.conf.broker_url:
            from ..demo.redis import find_redis

            broker = f"{find_redis()}/0"
        if not backend and not app.conf.result_backend:
            backend = broker or str(app.conf.broker_url)
        if broker:
            app.conf.broker_url = broker
        if backend:
            app.conf.result_backend = backend
        databases = _django_test_databases()
        conninfo = _conninfo(str(self.config.getini("lifeguard_database_url") or ""))
        if self.activity is not None:
            self.activity.close()
        self.activity = ActivityReader(conninfo) if conninfo is not None else None
        self.worker = SessionWorker(
            path,
            pool=pool,
            concurrency=int(self.config.getini("lifeguard_concurrency")),
            broker_url=broker or None,
            result_backend=backend or None,
            databases=databases,
            rootdir=str(self.config.rootpath),
            queues=list(self.config.getini("lifeguard_queues")),
        )
        self.worker.on_first_publish = self.note_session_ends
        self.worker.start()
        return self.worker

    def _database_check_failed(self, what: str, exc: Exception) -> None:
        """The check, not the test, could not run: say so once and stop reading."""
        from ..postgres.conninfo import error_line

        keywords = {k: str(v) for k, v in (self.activity.conninfo if self.activity else {}).items()}
        conninfo = keywords.pop("conninfo", "")
        if self.activity is not None:
            self.activity.close()
            self.activity = None
        warnings.warn(
            LifeguardWarning(
                f"lifeguard: cannot read {what} ({type(exc).__name__}: "
                f"{error_line(exc, conninfo, keywords)[:200]}); the database checks "
                "(idle_in_transaction, sessions_abandoned) are off"
            ),
            stacklevel=1,
        )

    def note_session_ends(self) -> None:
        """At a test's first publish (``SessionWorker.on_first_publish``), before its
        first task goes out: the session figures its tasks' are compared with. Only
        tests that send tasks pay for the read; a failure is reported after the test,
        never inside the publish."""
        self.before = None
        if self.activity is None or not self.sessions_check:
            return
        try:
            self.before = self.activity.session_ends()
        except Exception as exc:
            self.before_error = exc

    def _late_session_ends(self, before: SessionEnds) -> None:
        """Sessions that ended badly after the previous checked test's read and before
        this test's tasks went out (a process or thread its tasks started that outlived
        them) are not this test's: a warning names that test."""
        if self.last_ends is None:
            return
        previous, test = self.last_ends
        self.last_ends = None
        late = sessions_abandoned(previous, before, test)
        if late:
            lines = "\n".join(f"    seen in {line}" for line in late[0].where)
            warnings.warn(
                LifeguardWarning(
                    f"lifeguard: database sessions ended badly after {test} was checked "
                    "(a process or thread its tasks started that outlived them?), before "
                    f"this test sent its tasks:\n{lines}"
                ),
                stacklevel=1,
            )

    def _sessions_unreadable(self, exc: Exception) -> None:
        import psycopg

        if isinstance(exc, psycopg.errors.UndefinedColumn):  # PostgreSQL 13 or older
            self.sessions_check = False
            warnings.warn(
                LifeguardWarning(
                    "lifeguard: this PostgreSQL has no session figures in "
                    "pg_stat_database (they came in PostgreSQL 14); the sessions_abandoned "
                    "check is off"
                ),
                stacklevel=1,
            )
        else:
            self._database_check_failed("pg_stat_database", exc)

    def database_findings(
        self, item: pytest.Item, worker: SessionWorker, sent: list[tuple[str, str]]
    ) -> list[Finding]:
        """What the database shows after the test's tasks: backends of the worker idle
        in transaction, sessions that ended badly while the tasks ran (one round trip)."""
        before, self.before = self.before, None
        if self.before_error is not None:
            error, self.before_error = self.before_error, None
            self._sessions_unreadable(error)
        if self.activity is None:
            return []
        names = " or ".join(sorted({name for _, name in sent}))
        pids = worker.pids()
        after: SessionEnds | None = None
        rows = None
        try:
            if before is not None and self.sessions_check:
                rows, after = self.activity.after_test(pids)
            found = self.activity.idle_in_transaction(pids, names, rows)
        except Exception as exc:
            self._database_check_failed("pg_stat_activity and pg_stat_database", exc)
            return []
        if before is None or after is None:
            return found
        self._late_session_ends(before)
        self.last_ends = (after, item.nodeid)
        return found + sessions_abandoned(before, after, names)

    def stop(self) -> None:
        if self.activity is not None:
            self.activity.close()
            self.activity = None
        if self.worker is not None:
            self.worker.stop(self.app)
            self.worker = None


_STATE = pytest.StashKey[_State]()
_CHECKED = pytest.StashKey[bool]()  # on a test that got the worker: check it after


def _has_fixture(request: pytest.FixtureRequest, name: str) -> bool:
    manager = request.session._fixturemanager
    return bool(manager.getfixturedefs(name, request.node))


def _pytest_django_active(config: pytest.Config) -> bool:
    """pytest-django loaded and in charge of Django (it set Django up at start)."""
    import sys

    if not config.pluginmanager.hasplugin("django") or "django.apps" not in sys.modules:
        return False
    from django.apps import apps

    return bool(apps.ready)


def _import_path(app: Any) -> str:
    """``module:attribute`` of a Celery app object, for the worker's ``-A``."""
    import sys

    for module_name, module in list(sys.modules.items()):
        if module is None or module_name == "__main__":
            continue
        for attribute, value in list(vars(module).items()):
            if value is app:
                return f"{module_name}:{attribute}"
    raise pytest.UsageError(
        "lifeguard: the celery_app fixture's app is not a module attribute, so a worker "
        "cannot import it; set lifeguard_celery_app in the ini file instead"
    )


def _django_test_databases() -> dict[str, str] | None:
    """The database names of the test process's Django connections (pytest-django's
    test databases once ``django_db_setup`` ran), for the worker to use the same ones."""
    if not _django_configured():
        return None
    from django.db import connections

    return {alias: str(connections[alias].settings_dict["NAME"]) for alias in connections}


def _django_configured() -> bool:
    import sys

    if "django.conf" not in sys.modules:
        return False
    from django.conf import settings

    return bool(settings.configured or os.environ.get("DJANGO_SETTINGS_MODULE"))


def _conninfo(url: str) -> dict[str, Any] | None:
    """libpq keywords of the database whose pg_stat_activity the plugin reads."""
    if url:
        # A SQLAlchemy URL names its driver (postgresql+psycopg://): libpq takes the rest.
        return {"conninfo": re.sub(r"^(postgres(?:ql)?)\+\w+://", r"\1://", url.strip())}
    if not _django_configured():
        return None
    from django.db import connections

    wrapper = connections["default"]
    if wrapper.vendor != "postgresql":
        return None
    params = dict(wrapper.get_connection_params())
    params.pop("cursor_factory", None)
    params.pop("context", None)
    params.pop("client_encoding", None)
    params.pop("prepare_threshold", None)
    params.pop("server_side_binding", None)
    params.pop("pool", None)
    params.pop("application_name", None)
    return {key: value for key, value in params.items() if isinstance(value, (str, int))}


@pytest.fixture(scope="session")
def _lifeguard_session(request: pytest.FixtureRequest) -> Iterator[_State]:
    """Stops the worker at the session's end, before pytest-django drops the test
    databases the worker is connected to (its fixture was set up first)."""
    state = request.config.stash[_STATE]
    if _pytest_django_active(request.config):
        # pytest-django: the worker must use the test databases it creates.
        request.getfixturevalue("django_db_setup")
    yield state
    state.stop()


@pytest.fixture
def lifeguard_worker(request: pytest.FixtureRequest, _lifeguard_session: _State) -> SessionWorker:
    """The session's real worker of your app, with lifeguard, in the test's pool.

    Started on first use and reused by every later test (a test asking for another
    pool replaces it). Tasks the test sends are checked after it.
    """
    settings = _lifeguard_session.settings(request.node)
    request.node.stash[_CHECKED] = True
    return _lifeguard_session.worker_for(request, settings.pool)


@pytest.fixture(autouse=True)
def _lifeguard_auto(request: pytest.FixtureRequest) -> None:
    """With ``lifeguard = true`` every test runs against the worker."""
    state = request.config.stash[_STATE]
    marked = request.node.get_closest_marker("lifeguard") is not None
    if state.enabled or marked:
        request.getfixturevalue("lifeguard_worker")


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    state = item.config.stash[_STATE]
    worker = state.worker
    if worker is not None:
        worker.take_published()  # tasks sent by fixtures' setup are the fixture's own
        state.before = state.before_error = None  # the test's first publish reads them
    result = yield
    worker = state.worker
    if worker is None:
        return result
    sent = worker.take_published()
    if not item.stash.get(_CHECKED, False):
        # Not a test of the worker: its tasks (a celery_worker fixture's in-process
        # worker, a mocked publish) are not waited for, nor checked.
        return result
    ids = [task_id for task_id, _ in sent]
    findings: list[Finding] = []
    if ids:
        ids = worker.settle(ids, float(item.config.getini("lifeguard_wait")))
        findings = worker.findings(ids)
        findings += state.database_findings(item, worker, sent)
    settings = state.settings(item)
    findings = [f for f in findings if f.check not in settings.allow]
    if findings:
        message = "\n".join(f.describe() for f in findings)
        if settings.warn:
            warnings.warn(LifeguardWarning(message), stacklevel=1)
        else:
            pytest.fail(message, pytrace=False)
    return result


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Under pytest-django, a test that uses the worker gets ``django_db(transaction=True)``:
    the worker is another process, and sees only committed rows."""
    if not _pytest_django_active(config):
        return
    enabled = config.stash[_STATE].enabled
    for item in items:
        fixtures = getattr(item, "fixturenames", ())
        uses = enabled or "lifeguard_worker" in fixtures or "lifeguard_soak" in fixtures
        if (uses or item.get_closest_marker("lifeguard")) and not item.get_closest_marker(
            "django_db"
        ):
            item.add_marker(pytest.mark.django_db(transaction=True))


def pytest_sessionfinish(session: pytest.Session) -> None:
    state = session.config.stash.get(_STATE, None)
    if state is not None:
        state.stop()


# --- soak -------------------------------------------------------------------------------


@dataclass
class SoakReport:
    """Memory of the processes that ran a soak: the worst process decides."""

    task: str
    runs: int
    growth: int  # bytes, worst process, after the warm-up runs
    slope: float | None  # bytes per task, worst process
    per_process: dict[int, tuple[int, float | None, int]]  # pid -> (growth, slope, runs)

    def describe(self) -> str:
        slope = "n/a" if self.slope is None else f"{self.slope / 1024:.0f} KiB/task"
        return (
            f"{self.task}: {self.runs} runs, RSS grew {self.growth / 2**20:.1f} MiB, "
            f"slope {slope} (worst of {len(self.per_process)} process(es))"
        )


def _per_task(value: str | int | float) -> int:
    text = value.strip() if isinstance(value, str) else value
    if isinstance(text, str) and text.lower().endswith("/task"):
        text = text[: -len("/task")]
    return size_in_bytes(text)


@pytest.fixture
def lifeguard_soak(lifeguard_worker: SessionWorker) -> Callable[..., SoakReport]:
    """``lifeguard_soak(task_or_signature, n=200, max_growth="8MiB", max_slope="50KiB/task")``

    Runs the task ``n`` times in the real worker and fails the test when the RSS of a
    process that ran it grew by more than ``max_growth`` after the warm-up runs
    (the first ``warmup`` runs of each process: first-use caches fill, imports happen,
    and the allocator settles), or kept growing faster than ``max_slope``
    (least squares of RSS over that process's runs, as lifeguard's slope limit).
    """
    from ..concerns.memory import SlopeWindow

    def soak(
        signature: Any,
        *,
        n: int = 200,
        max_growth: str | int | None = "8MiB",
        max_slope: str | int | None = "50KiB/task",
        warmup: int = 10,
        timeout: float = 120.0,
    ) -> SoakReport:
        sig = signature.s() if hasattr(signature, "s") else signature
        results = [sig.clone().apply_async() for _ in range(n)]
        for result in results:
            result.get(timeout=timeout, propagate=False)
        ids = [result.id for result in results]
        missing = lifeguard_worker.wait_done(ids, timeout)
        if missing:
            pytest.fail(f"lifeguard soak: {len(missing)} of {n} runs never ended", pytrace=False)
        series: dict[int, list[int]] = {}
        for event in lifeguard_worker.runs(ids):
            rss = event.record.get("rss")
            if rss is not None:
                series.setdefault(event.pid, []).append(int(rss))
        per_process: dict[int, tuple[int, float | None, int]] = {}
        for pid, every in series.items():
            points = every[warmup:] or every[-1:]
            window = SlopeWindow(len(points))
            for x, y in enumerate(points):
                window.add(x, y)
            # Fewer than MIN_SLOPE_POINTS runs fit no trend worth failing a test on.
            slope = window.slope() if len(points) >= MIN_SLOPE_POINTS else None
            per_process[pid] = (points[-1] - points[0], slope, len(points))
        name = getattr(sig, "task", None) or str(sig)
        growth = max((g for g, _, _ in per_process.values()), default=0)
        slopes = [s for _, s, _ in per_process.values() if s is not None]
        report = SoakReport(str(name), n, growth, max(slopes) if slopes else None, per_process)
        problems = []
        if max_growth is not None and growth > size_in_bytes(max_growth):
            problems.append(f"growth over max_growth={max_growth}")
        if (
            max_slope is not None
            and report.slope is not None
            and report.slope > _per_task(max_slope)
        ):
            problems.append(f"slope over max_slope={max_slope}")
        if problems:
            pytest.fail(
                f"lifeguard soak: task {report.describe()}: {' and '.join(problems)}",
                pytrace=False,
            )
        return report

    return soak


__all__ = ["CHECKS", "LifeguardWarning", "SoakReport", "lifeguard_soak", "lifeguard_worker"]
