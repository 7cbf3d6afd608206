"""The pytest plugin, run on users' projects with planted bugs (``pytester``).

The main project is a Django + PostgreSQL Celery app with lifeguard, in a scratch
database. Its suite runs in a subprocess with the plugin enabled by two ini lines,
against one real prefork worker, then threads, gevent and eventlet workers: exactly the
planted tests fail (a transaction left open, a connection leaked by a thread or
greenlet, a soft time limit mid-query, a statement timeout, 1 MiB kept per run, a
helper process and a dying process abandoning their sessions), each naming its task and
reason; the clean ones pass, ``allow=`` turns a planted failure into a pass and
``warn=True`` into a warning. Beside it: the same under pytest-django (the worker in the
test database), and a plain Celery app with a SQLAlchemy engine named by a
``celery_app`` fixture, its database by ``lifeguard_database_url``.
"""

from __future__ import annotations

import re
import textwrap
import time
import uuid
from collections.abc import Iterator

import pytest

from lifeguard.demo.postgres import PostgresServer
from tests.support import Database, scratch_database

pytest_plugins = ["pytester"]

TASKS = """
import os
import threading
import time

from django.db import connection

from proj.celery import app


@app.task
def clean(x):
    with connection.cursor() as cursor:
        cursor.execute("SELECT %s", [x])
        return cursor.fetchone()[0]


@app.task
def leaves_transaction_open():
    cursor = connection.cursor()
    cursor.execute("BEGIN")
    cursor.execute("SELECT 1")  # no COMMIT: the session stays idle in transaction
    return 1


@app.task
def thread_leaks_connection():
    def report():
        with connection.cursor() as cursor:  # the thread's own connection, never closed
            cursor.execute("SELECT 1")

    thread = threading.Thread(target=report, name="reporter")
    thread.start()
    thread.join()
    return 1


@app.task
def thread_holds_transaction():
    begun = threading.Event()

    def audit():
        cursor = connection.cursor()
        cursor.execute("BEGIN")
        cursor.execute("SELECT 1")
        begun.set()
        time.sleep(3)  # outlives the task, the transaction still open

    threading.Thread(target=audit, name="audit").start()
    begun.wait(10)
    return 1


@app.task(soft_time_limit=1)
def slow_report():
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_sleep(30)")


_KEPT = []
_CACHE = {}
_CALLS = [0]


@app.task
def keeps_a_mebibyte():
    _KEPT.append(b"k" * 2**20)


@app.task
def bounded_cache():
    _CALLS[0] += 1
    _CACHE[_CALLS[0] % 3] = b"c" * 2**20  # three entries at most, filled on first use


@app.task
def report_times_out():
    from django.db import transaction

    with transaction.atomic(), connection.cursor() as cursor:
        cursor.execute("SET LOCAL statement_timeout = '100ms'")
        cursor.execute("SELECT pg_sleep(5)")  # the server cancels it: the task fails


def export_connection():
    # A raw psycopg connection, as the helper process an export forks opens.
    import psycopg
    from django.conf import settings

    db = settings.DATABASES["default"]
    return psycopg.connect(
        host=db["HOST"], port=db["PORT"], user=db["USER"],
        password=db["PASSWORD"] or None, dbname=db["NAME"],
    )


@app.task
def export_in_a_helper_process():
    pid = os.fork()
    if pid == 0:  # the helper connects, then is gone without closing (killed, crashed)
        try:
            conn = export_connection()  # held: a dropped one would close cleanly
            conn.execute("SELECT 1")
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    time.sleep(0.05)  # the upload after the export (the server has seen the helper go)
    return 1


@app.task
def helper_outlives_the_task(go):
    pid = os.fork()
    if pid == 0:  # connects, outlives the task and its test's check, exits unclosed
        try:
            conn = export_connection()  # held: a dropped one would close cleanly
            conn.execute("SELECT 1")
            deadline = time.monotonic() + 30
            while not os.path.exists(go) and time.monotonic() < deadline:
                time.sleep(0.01)  # until the next test says go
        finally:
            os._exit(0)
    return 1


@app.task
def exits_with_its_connection_open():
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
    os._exit(1)  # as the OOM killer would end it: no connection closed


@app.task
def how_it_runs():
    import sys

    gevent = "gevent.monkey" in sys.modules and sys.modules["gevent.monkey"].is_module_patched(
        "socket"
    )
    eventlet = "eventlet" in sys.modules and sys.modules["eventlet"].patcher.is_monkey_patched(
        "socket"
    )
    return {
        "pid": os.getpid(),
        "thread": threading.current_thread().name,
        "gevent": gevent,
        "eventlet": eventlet,
    }


@app.task
def greenlet_leaks_connection(library):
    import importlib

    def report():
        with connection.cursor() as cursor:  # the greenlet's own connection, never closed
            cursor.execute("SELECT 1")

    greenlet = importlib.import_module(library).spawn(report)  # gevent or eventlet
    greenlet.join() if library == "gevent" else greenlet.wait()
    return 1
"""

SUITE = """
import os
import tempfile
import time

import pytest
from celery.exceptions import SoftTimeLimitExceeded

from proj import tasks


def test_clean_query():
    assert tasks.clean.delay(5).get(timeout=30) == 5


def test_clean_many():
    results = [tasks.clean.delay(i) for i in range(6)]
    assert [r.get(timeout=30) for r in results] == list(range(6))


def test_no_tasks():
    assert 1 + 1 == 2


def test_leaves_transaction_open():
    assert tasks.leaves_transaction_open.delay().get(timeout=30) == 1


def test_thread_leaks_connection():
    assert tasks.thread_leaks_connection.delay().get(timeout=30) == 1


def test_chain_link_leaves_transaction_open():
    from celery import chain

    result = chain(tasks.clean.si(1), tasks.leaves_transaction_open.si()).delay()
    assert result.get(timeout=30) == 1


def test_thread_holds_transaction():
    assert tasks.thread_holds_transaction.delay().get(timeout=30) == 1


def test_slow_report_gives_up():
    with pytest.raises(SoftTimeLimitExceeded):
        tasks.slow_report.delay().get(timeout=30)


@pytest.mark.lifeguard(allow=["in_transaction"])
def test_open_transaction_on_purpose():
    assert tasks.leaves_transaction_open.delay().get(timeout=30) == 1


@pytest.mark.lifeguard(warn=True)
def test_open_transaction_warned():
    assert tasks.leaves_transaction_open.delay().get(timeout=30) == 1


def test_bounded_cache(lifeguard_soak):
    report = lifeguard_soak(tasks.bounded_cache, n=60, max_growth="8MiB", max_slope="50KiB/task")
    assert report.runs == 60


def test_keeps_a_mebibyte(lifeguard_soak):
    lifeguard_soak(tasks.keeps_a_mebibyte, n=60, max_growth="8MiB", max_slope="50KiB/task")


def test_report_times_out():
    with pytest.raises(Exception, match="statement timeout"):
        tasks.report_times_out.delay().get(timeout=30)


def test_helper_process_abandons_its_session():
    assert tasks.export_in_a_helper_process.delay().get(timeout=30) == 1


@pytest.mark.lifeguard(allow=["sessions_abandoned"])
def test_helper_process_on_purpose():
    assert tasks.export_in_a_helper_process.delay().get(timeout=30) == 1


HELPER_GO = os.path.join(tempfile.gettempdir(), f"lifeguard-helper-go-{os.getpid()}")


def test_helper_outlives_its_task():
    assert tasks.helper_outlives_the_task.delay(HELPER_GO).get(timeout=30) == 1


def test_clean_after_a_late_helper():
    open(HELPER_GO, "w").close()  # the earlier test's helper exits now
    time.sleep(0.5)
    os.unlink(HELPER_GO)
    assert tasks.clean.delay(1).get(timeout=30) == 1


def test_process_dies_with_its_connection_open():
    from billiard.exceptions import WorkerLostError

    with pytest.raises(WorkerLostError):
        tasks.exits_with_its_connection_open.delay().get(timeout=30)


# Other pools last, each pool's tests together (a class-scoped parameter): a test in
# another pool replaces the session's worker, which the next tests reuse.
GREEN_LEAKS = {
    "threads": tasks.thread_leaks_connection.s(),
    "gevent": tasks.greenlet_leaks_connection.s("gevent"),
    "eventlet": tasks.greenlet_leaks_connection.s("eventlet"),
}


@pytest.mark.parametrize(
    "pool",
    [pytest.param(pool, marks=pytest.mark.lifeguard(pool=pool)) for pool in GREEN_LEAKS],
    scope="class",
)
class TestPool:
    def test_runs_tasks_in_its_pool(self, pool, lifeguard_worker):
        info = tasks.how_it_runs.delay().get(timeout=30)
        assert lifeguard_worker.pool == pool and not lifeguard_worker.worker.children()
        assert info["pid"] == lifeguard_worker.worker.pid  # not a prefork child
        patched = {"threads": info["thread"] != "MainThread", **info}
        assert patched[pool] is True, info

    def test_leaks_connection(self, pool):
        assert GREEN_LEAKS[pool].delay().get(timeout=30) == 1
"""

GREEN_POOLS = ("threads", "gevent", "eventlet")  # the project's TestPool, in that order
PLANTED = {  # test -> (the task its message names, the reason in words)
    "test_leaves_transaction_open": ("leaves_transaction_open", "left a transaction open"),
    "test_thread_leaks_connection": ("thread_leaks_connection", "leaked a database connection"),
    "test_thread_holds_transaction": ("thread_holds_transaction", "idle in transaction"),
    "test_chain_link_leaves_transaction_open": (
        "leaves_transaction_open",
        "left a transaction open",
    ),
    "test_slow_report_gives_up": ("slow_report", "had a statement interrupted mid-flight"),
    "test_keeps_a_mebibyte": ("keeps_a_mebibyte", "slope over max_slope=50KiB/task"),
    "test_report_times_out": ("report_times_out", "failed because of a database fault"),
    "test_helper_process_abandons_its_session": (
        "export_in_a_helper_process",
        "left database sessions the server counts as abandoned",
    ),
    "test_process_dies_with_its_connection_open": (
        "exits_with_its_connection_open",
        "more in sessions_abandoned",
    ),
    **{
        f"TestPool::test_leaks_connection[{pool}]": (task, "leaked a database connection")
        for pool, task in zip(
            GREEN_POOLS,
            [
                "thread_leaks_connection",
                "greenlet_leaks_connection",
                "greenlet_leaks_connection",
            ],
            strict=True,
        )
    },
}
CLEAN = {
    "test_clean_query",
    "test_clean_many",
    "test_no_tasks",
    "test_open_transaction_on_purpose",
    "test_open_transaction_warned",
    "test_bounded_cache",
    "test_helper_process_on_purpose",
    "test_helper_outlives_its_task",  # its helper's session ends after the check
    "test_clean_after_a_late_helper",  # ... and becomes a warning here
    *(f"TestPool::test_runs_tasks_in_its_pool[{pool}]" for pool in GREEN_POOLS),
}


@pytest.fixture(scope="module")
def project_db(pg: PostgresServer) -> Iterator[Database]:
    with scratch_database(pg, "plugin") as db:
        yield db


def write_project(
    pytester: pytest.Pytester, db: Database, redis_url: str, *, django_apps: bool = False
) -> None:
    conn = db.server.connect_kwargs(db.name)
    apps = ["django.contrib.contenttypes", "django.contrib.auth"] if django_apps else []
    queue = f"lifeguard-plugin-{uuid.uuid4().hex[:8]}"
    settings = f"""
        SECRET_KEY = "plugin-test"
        USE_TZ = True
        INSTALLED_APPS = {apps!r}
        DATABASES = {{
            "default": {{
                "ENGINE": "django.db.backends.postgresql",
                "NAME": {conn["dbname"]!r},
                "HOST": {conn["host"]!r},
                "PORT": {conn["port"]!r},
                "USER": {conn["user"]!r},
                "PASSWORD": {conn.get("password") or ""!r},
            }}
        }}
        CELERY_BROKER_URL = "{redis_url}/0"
        CELERY_RESULT_BACKEND = "{redis_url}/0"
        CELERY_TASK_DEFAULT_QUEUE = {queue!r}
        """
    celery = """
        import os

        from celery import Celery

        import lifeguard

        os.environ.setdefault("DJANGO_SETTINGS_MODULE", "proj.settings")
        app = Celery("proj")
        app.config_from_object("django.conf:settings", namespace="CELERY")
        app.conf.include = ["proj.tasks"]
        guard = lifeguard.install(app)
        """
    pytester.makepyfile(
        **{
            "proj/__init__.py": "",
            "proj/settings.py": textwrap.dedent(settings),
            "proj/celery.py": textwrap.dedent(celery),
            "proj/tasks.py": TASKS,
            "test_tasks.py": SUITE,
        }
    )
    # The set-up docs/pytest.md gives (plus -p: the worktree's plugin is not installed).
    pytester.makeini(
        """
        [pytest]
        lifeguard = true
        lifeguard_celery_app = proj.celery
        pythonpath = .
        addopts = -p lifeguard.pytest -p no:cacheprovider -p no:django
        """
    )


def outcomes(output: str, module: str = "test_tasks") -> dict[str, str]:
    """test name -> PASSED/FAILED, from ``-rA`` short summary lines."""
    pattern = rf"^(PASSED|FAILED) {module}\.py::(\S+)"
    return {name: state for state, name in re.findall(pattern, output, re.M)}


@pytest.mark.slow
def test_planted_bugs_fail_clean_tests_pass(
    pytester: pytest.Pytester, project_db: Database, redis_url: str
) -> None:
    """One worker session: each planted bug fails its test with the task's name and the
    reason in words; clean tests, a test with no task and an allowed reason pass."""
    write_project(pytester, project_db, redis_url)
    started = time.monotonic()
    result = pytester.runpytest_subprocess("-rA", "--durations=0", timeout=240)
    elapsed = time.monotonic() - started
    output = result.stdout.str()
    seen = outcomes(output)
    assert seen == {**dict.fromkeys(PLANTED, "FAILED"), **dict.fromkeys(CLEAN, "PASSED")}, output
    failures = output.split("= FAILURES =", 1)[1]
    for test, (task, reason) in PLANTED.items():
        header = test.replace("::", ".")  # how pytest heads a class's test's failure
        section = failures.split(f"_ {header} _", 1)[1].split("\n_____", 1)[0]
        assert f"task proj.tasks.{task}" in section and reason in section, section
    # Where lifeguard saw it: the worker process and lifeguard's own words.
    transaction = failures.split("_ test_leaves_transaction_open _", 1)[1]
    assert "seen in worker process" in transaction
    assert "the default connection" in transaction
    leak = failures.split("_ test_thread_leaks_connection _", 1)[1]
    assert "opened by thread 'reporter'" in leak
    held = failures.split("_ test_thread_holds_transaction _", 1)[1].split("\n_____", 1)[0]
    assert "seen in the database: backend" in held and "last statement 'SELECT 1'" in held
    fault = failures.split("_ test_report_times_out _", 1)[1].split("\n_____", 1)[0]
    assert "canceling statement due to statement timeout (SQLSTATE 57014)" in fault
    abandoned = failures.split("_ test_helper_process_abandons_its_session _", 1)[1]
    assert "seen in the database: pg_stat_database of " + project_db.name in abandoned
    assert "1 more in sessions_abandoned" in abandoned.split("\n_____", 1)[0]
    greenlet = failures.split("_ TestPool.test_leaks_connection[gevent] _", 1)[1]
    assert "opened by greenlet 'Greenlet-" in greenlet.split("\n_____", 1)[0]
    greenthread = failures.split("_ TestPool.test_leaks_connection[eventlet] _", 1)[1]
    assert "opened by greenlet GreenThread at 0x" in greenthread.split("\n_____", 1)[0]
    assert "cannot read" not in output  # every check could run
    # A task whose process died is not waited for (lifeguard_wait, 10 s): no done line
    # comes, and the plugin sees the process is gone.
    died = re.search(r"([\d.]+)s call +test_tasks.py::test_process_dies_with_its", output)
    assert died is not None and float(died.group(1)) < 5, output
    # warn=True: the same finding, as a warning of a passing test.
    warned = output.split("warnings summary", 1)[1]
    assert "test_open_transaction_warned" in warned and "LifeguardWarning" in warned
    assert "task proj.tasks.leaves_transaction_open" in warned
    late = warned.split("test_tasks.py::test_clean_after_a_late_helper", 1)[1]
    assert (
        "database sessions ended badly after test_tasks.py::test_helper_outlives_its_task "
        "was checked" in late.split("\ntest_tasks.py::", 1)[0]
    ), warned
    # The planted bugs left nothing behind on the server: lifeguard cleaned every one.
    assert project_db.admin(
        "SELECT count(*) FROM pg_stat_activity WHERE datname = %s AND state <> 'idle'",
        [project_db.name],
    ) == [(0,)]
    print(f"plugin suite: {elapsed:.1f}s")


DJANGO_TASKS = """
from django.contrib.auth.models import User
from django.db import connection

from proj.celery import app


@app.task
def database_name():
    with connection.cursor() as cursor:
        cursor.execute("SELECT current_database()")
        return cursor.fetchone()[0]


@app.task
def user_exists(name):
    return User.objects.filter(username=name).exists()


@app.task
def leaves_transaction_open():
    cursor = connection.cursor()
    cursor.execute("BEGIN")
    cursor.execute("SELECT 1")
    return 1


@app.task
def where():
    import os

    return os.getpid(), database_name()
"""

DJANGO_SUITE = """
import os
import tempfile
import time

import pytest
from django.contrib.auth.models import User
from django.db import connection

from proj import tasks


def test_worker_sees_the_test_database():
    User.objects.create(username="ada")  # no django_db marker: the plugin adds one
    assert tasks.database_name.delay().get(timeout=30) == connection.settings_dict["NAME"]
    assert connection.settings_dict["NAME"].startswith("test_")
    assert tasks.user_exists.delay("ada").get(timeout=30) is True


def test_each_test_starts_empty():
    assert tasks.user_exists.delay("ada").get(timeout=30) is False


def test_leaves_transaction_open():
    assert tasks.leaves_transaction_open.delay().get(timeout=30) == 1


@pytest.mark.lifeguard(pool="solo")
def test_solo_pool(lifeguard_worker):
    pid, name = tasks.where.delay().get(timeout=30)
    assert lifeguard_worker.pool == "solo"
    assert pid == lifeguard_worker.worker.pid  # no children: not the prefork worker
    assert name == connection.settings_dict["NAME"]
"""


@pytest.mark.slow
def test_pytest_django_worker_uses_the_test_database(
    pytester: pytest.Pytester, pg: PostgresServer, redis_url: str
) -> None:
    """Under pytest-django, the worker works in the test database pytest-django created
    and sees the rows a test commits; tests need no marker; the checks still fail a leak;
    a marker switches the pool; the test database is dropped at the end (the worker has
    let go of it)."""
    pytest.importorskip("pytest_django")
    name = f"lifeguard_pdj_{uuid.uuid4().hex[:8]}"
    write_project(pytester, Database(pg, name), redis_url, django_apps=True)
    pytester.makepyfile(**{"proj/tasks.py": DJANGO_TASKS, "test_tasks.py": DJANGO_SUITE})
    pytester.makeini(
        """
        [pytest]
        DJANGO_SETTINGS_MODULE = proj.settings
        lifeguard = true
        lifeguard_celery_app = proj.celery
        pythonpath = .
        addopts = -p lifeguard.pytest -p no:cacheprovider
        """
    )
    try:
        result = pytester.runpytest_subprocess("-rA", timeout=240)
        output = result.stdout.str() + result.stderr.str()
        assert outcomes(output) == {
            "test_worker_sees_the_test_database": "PASSED",
            "test_each_test_starts_empty": "PASSED",
            "test_leaves_transaction_open": "FAILED",
            "test_solo_pool": "PASSED",
        }, output
        assert "task proj.tasks.leaves_transaction_open" in output
        assert "left a transaction open" in output
        assert "error" not in output.lower().split("short test summary")[0], output
        with pg.admin() as conn:
            left = conn.execute(
                "SELECT count(*) FROM pg_database WHERE datname = %s", [f"test_{name}"]
            ).fetchone()
        assert left == (0,), "pytest-django could not drop its test database"
    finally:
        with pg.admin() as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "test_{name}" WITH (FORCE)')


SQLA_APP = """
import os
import threading
import time

from celery import Celery
from sqlalchemy import create_engine, text

import lifeguard

app = Celery("plain", broker=os.environ["PLAIN_BROKER"], backend=os.environ["PLAIN_BROKER"])
app.conf.task_default_queue = os.environ["PLAIN_QUEUE"]
guard = lifeguard.install(app)
engine = guard.add_engine(lambda: create_engine(os.environ["PLAIN_DB"], pool_size=2))

_KEPT = []


@app.task
def total():
    with guard.session(engine()) as session:
        return session.execute(text("SELECT 40 + 2")).scalar()


@app.task
def forgets_its_connection():
    connection = engine().connect()  # never closed: still checked out at the task's end
    _KEPT.append(connection)
    return connection.execute(text("SELECT 1")).scalar()


@app.task(soft_time_limit=0.5)
def slow_total():
    with guard.session(engine()) as session:
        session.execute(text("SELECT pg_sleep(30)"))


@app.task
def total_times_out():
    with guard.session(engine()) as session:
        session.execute(text("SET LOCAL statement_timeout = '100ms'"))
        session.execute(text("SELECT pg_sleep(5)"))  # the server cancels it


@app.task
def thread_holds_transaction():
    begun = threading.Event()

    def audit():
        with engine().connect() as connection:
            connection.execute(text("SELECT 1"))  # begins; no commit
            begun.set()
            time.sleep(3)  # outlives the task, the transaction still open

    threading.Thread(target=audit, name="audit").start()
    begun.wait(10)
    return 1


@app.task
def export_in_a_helper_process():
    pid = os.fork()
    if pid == 0:  # the helper's own engine: it connects, then is gone without closing
        try:
            create_engine(os.environ["PLAIN_DB"]).connect().execute(text("SELECT 1"))
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    time.sleep(0.05)  # the upload after the export (the server has seen the helper go)
    return 1
"""

SQLA_SUITE = """
import os
import tempfile
import time

import pytest
from celery.exceptions import SoftTimeLimitExceeded

import plain

pytestmark = pytest.mark.lifeguard()  # this module's tests get the worker


def test_total():
    assert plain.total.delay().get(timeout=30) == 42


def test_forgets_its_connection():
    assert plain.forgets_its_connection.delay().get(timeout=30) == 1


def test_slow_total_gives_up():
    with pytest.raises(SoftTimeLimitExceeded):
        plain.slow_total.delay().get(timeout=30)


def test_total_times_out():
    with pytest.raises(Exception, match="statement timeout"):
        plain.total_times_out.delay().get(timeout=30)


def test_thread_holds_transaction():
    assert plain.thread_holds_transaction.delay().get(timeout=30) == 1


def test_helper_process_abandons_its_session():
    assert plain.export_in_a_helper_process.delay().get(timeout=30) == 1
"""


@pytest.mark.slow
def test_plain_celery_sqlalchemy_app_from_a_celery_app_fixture(
    pytester: pytest.Pytester, project_db: Database, redis_url: str
) -> None:
    """A plain Celery app with a SQLAlchemy engine, named by a ``celery_app`` fixture
    (no ini app), its database by ``lifeguard_database_url``, the plugin on for one module
    by its marker: a connection left checked
    out, a soft time limit mid-query, a statement timeout, a thread holding a
    transaction and a helper process abandoning its session each fail their test, naming
    the task and the reason; the clean task passes."""
    pytester.makepyfile(
        **{
            "plain.py": SQLA_APP,
            "conftest.py": "import pytest\n\n\n@pytest.fixture(scope='session')\n"
            "def celery_app():\n    import plain\n\n    return plain.app\n",
            "test_plain.py": SQLA_SUITE,
            # A test that does not use the worker: what it sends is not waited for.
            "test_elsewhere.py": "import plain\n\n\ndef test_sends_to_another_queue():\n"
            "    plain.total.apply_async(queue='nobody-consumes-this')\n",
        }
    )
    url = project_db.server.url(project_db.name, scheme="postgresql+psycopg")
    # No Django: the database checks read the database lifeguard_database_url names
    # (here the app's own SQLAlchemy URL).
    pytester.makeini(
        f"""
        [pytest]
        lifeguard_database_url = {url}
        pythonpath = .
        addopts = -p lifeguard.pytest -p no:cacheprovider -p no:django
        """
    )
    env = {
        "PLAIN_BROKER": f"{redis_url}/0",
        "PLAIN_QUEUE": f"lifeguard-plain-{uuid.uuid4().hex[:8]}",
        "PLAIN_DB": url,
    }
    with pytest.MonkeyPatch.context() as patch:
        for key, value in env.items():
            patch.setenv(key, value)
        result = pytester.runpytest_subprocess("-rA", "--durations=0", timeout=240)
    output = result.stdout.str() + result.stderr.str()
    planted = {  # test -> what its failure says
        "test_forgets_its_connection": [
            "task plain.forgets_its_connection",
            "leaked a database connection or session",
            "still checked out",  # lifeguard's own words, from the worker
            "left a transaction open",  # SQLAlchemy 2 began one: rolled back on hand-back
        ],
        "test_slow_total_gives_up": ["task plain.slow_total", "statement interrupted"],
        "test_total_times_out": [
            "task plain.total_times_out",
            "failed because of a database fault",
            "statement timeout (SQLSTATE 57014)",
        ],
        "test_thread_holds_transaction": [
            "task plain.thread_holds_transaction",
            "idle in transaction",
            f"on {project_db.name}: idle in transaction, last statement 'SELECT 1'",
        ],
        "test_helper_process_abandons_its_session": [
            "task plain.export_in_a_helper_process",
            f"pg_stat_database of {project_db.name}: 1 more in sessions_abandoned",
        ],
    }
    assert outcomes(output, "test_plain") == {
        "test_total": "PASSED",
        **dict.fromkeys(planted, "FAILED"),
    }, output
    for test, words in planted.items():
        section = output.split(f"_ {test} _", 1)[1].split("\n_____", 1)[0]
        assert all(word in section for word in words), section
    assert "cannot read" not in output
    # Not a test of the worker (no marker, no fixture): not waited for lifeguard_wait.
    assert outcomes(output, "test_elsewhere") == {"test_sends_to_another_queue": "PASSED"}
    elsewhere = re.search(r"([\d.]+)s call +test_elsewhere.py::", output)
    assert elsewhere is None or float(elsewhere.group(1)) < 5, output


def test_unknown_check_name_is_a_usage_error(pytester: pytest.Pytester) -> None:
    """A typo in allow= stops the run with the list of checks, not a silent pass."""
    pytester.makepyfile(
        """
        import pytest

        @pytest.mark.lifeguard(allow=["in_transation"])
        def test_typo():
            pass
        """
    )
    result = pytester.runpytest_subprocess("-p", "lifeguard.pytest", "-p", "no:cacheprovider")
    output = result.stdout.str() + result.stderr.str()
    assert "unknown check(s) ['in_transation']" in output
    assert "in_transaction, interrupted, leaked" in output
    assert result.ret != 0
