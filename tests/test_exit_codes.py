"""One exit-status contract for every command (docs/commands.md): 0 ok, 1 warning/fail,
2 critical, 3 could not run; 78 for a worker refused by lifeguard's configuration.

Every case runs the real command in a subprocess, as cron, Nagios or a supervisor does,
and reads its status and output: a usage error must not exit click's 2 (CRITICAL for
Nagios), and nothing that could not run may print a traceback.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psycopg
import pytest

from lifeguard.demo.postgres import PostgresServer, free_port
from tests.doctor_support import doctor
from tests.monitor_support import lifeguard, start_lifeguard
from tests.support import Database, scratch_database

OK, WARNING, CRITICAL, CANNOT_RUN, CONFIG = 0, 1, 2, 3, 78
COMMANDS = ["check", "monitor", "doctor", "validate", "demo", "migrate", "effects"]


def dead_url(password: str = "s3cret-pw") -> str:
    """A PostgreSQL URL on a closed port of this machine: refused at once."""
    return f"postgresql://ops:{password}@127.0.0.1:{free_port()}/app"


def assert_could_not_run(result: subprocess.CompletedProcess[str], *expected: str) -> None:
    output = result.stdout + result.stderr
    assert result.returncode == CANNOT_RUN, output
    for text in expected:
        assert text in output, output
    assert "Traceback" not in output


@pytest.fixture(scope="module")
def exit_db(pg: PostgresServer) -> Iterator[Database]:
    with scratch_database(pg, "exit") as db:
        yield db


# --- could not run: usage errors ---------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
def test_an_unknown_option_exits_3_with_clicks_message(command: str):
    assert_could_not_run(lifeguard(command, "--no-such-option"), "No such option")


def test_an_unknown_command_exits_3():
    assert_could_not_run(lifeguard("no-such-command"), "No such command")


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["monitor", "--count", "0"], "leave --count out to run until Ctrl-C"),
        (["monitor", "--interval", "0"], "--interval"),
        (["check", "--prefix", ""], "is empty: give the application_name prefix"),
        (["monitor", "--prefix", ""], "is empty: give the application_name prefix"),
        (["check", "--prefix", "a:b"], "must not contain ':'"),
        (["check", "--connect-timeout", "0"], "--connect-timeout"),
        (["doctor", "-A", "x", "-c", "0"], "--concurrency"),
        (["validate", "-A", "x", "--task", "t", "--count", "0"], "--count"),
        (["validate", "-A", "x", "--task", "t", "--soak", "soon"], "not a duration"),
        (["demo", "--tasks", "-1"], "--tasks"),
        (["demo", "--tasks", "many"], "--tasks"),
        (["demo", "--seconds", "5"], "--seconds"),
        (
            ["migrate", "--database-url", "postgresql://127.0.0.1:1/x", "--prune-older-than", "0d"],
            "older",
        ),
    ],
)
def test_a_bad_value_is_refused_by_the_parser(args: list[str], message: str):
    """Refused before any connection: the message names the option."""
    assert_could_not_run(lifeguard(*args), "Invalid value", message)


# --- could not run: the database or broker ------------------------------------------------


def test_an_unreachable_database_exits_3_in_every_command():
    url = dead_url()
    for args in (
        ["check", "--database-url", url],
        ["monitor", "--database-url", url, "--count", "1"],
        ["demo", "--database-url", url],
        ["effects", "list", "--database-url", url],
    ):
        started = time.monotonic()
        result = lifeguard(*args)
        assert_could_not_run(result, "cannot connect to postgresql://ops:***@127.0.0.1:")
        assert "s3cret-pw" not in result.stdout + result.stderr
        assert time.monotonic() - started < 20, args
    unreached = doctor("clean", "--database-url", url)
    assert unreached.exit_code == CANNOT_RUN
    assert "Traceback" not in unreached.stderr


def test_validate_with_an_unreachable_broker_exits_3():
    closed = f"redis://127.0.0.1:{free_port()}"
    result = lifeguard(
        "validate", "-A", "lifeguard.demo.project.celery_app", "--task", "touch",
        env={"LIFEGUARD_SANDBOX_BROKER_URL": closed},
    )  # fmt: skip
    assert_could_not_run(result, "cannot ask the workers", "Connection refused")


@pytest.mark.parametrize("url", ["mysql://app@db/app", "postgresql://app@db:99999/app"])
@pytest.mark.parametrize("command", [["check", "--no-state"], ["monitor", "--count", "1"]])
def test_a_malformed_database_url_exits_3(command: list[str], url: str):
    assert_could_not_run(lifeguard(*command, "--database-url", url))


def test_demo_checks_the_servers_given_before_starting_anything(pg: PostgresServer):
    """A closed broker port, or URLs that are not URLs: one line, status 3, nothing
    started (no database of the demo's on the server: other tests' come and go)."""
    before = set(_databases(pg))
    admin = pg.url("postgres")
    closed = f"redis://127.0.0.1:{free_port()}"
    result = lifeguard("demo", "--database-url", admin, "--broker-url", closed)
    assert_could_not_run(result, f"cannot connect to {closed} (from --broker-url)")
    assert len(result.stderr.strip().splitlines()) == 1
    assert_could_not_run(lifeguard("demo", "--database-url", "notaurl"), "not a PostgreSQL URL")
    assert_could_not_run(
        lifeguard("demo", "--database-url", admin, "--broker-url", "http://x"), "not a Redis URL"
    )
    assert set(_databases(pg)) == before


def test_demo_accepts_servers_that_answer(pg: PostgresServer, redis_url: str):
    """The check before the demo starts lets working servers through (the full demo is
    test_demo.py's)."""
    from lifeguard.demo.runner import check_broker, check_database

    assert check_database(pg.url("postgres")).port == pg.port
    assert check_broker(f"{redis_url}/13/") == f"{redis_url}/13"


def _databases(pg: PostgresServer) -> list[str]:
    with pg.admin() as conn:
        rows = conn.execute("SELECT datname FROM pg_database WHERE datname LIKE 'lifeguard_demo_%'")
        return [row[0] for row in rows.fetchall()]


# --- ok, warning, critical ----------------------------------------------------------------


def test_check_and_monitor_exit_with_the_reports_status(pg: PostgresServer, exit_db: Database):
    """One idle session: OK by default, WARNING and CRITICAL with thresholds below it.
    ``monitor --count`` exits with its last report's status, as ``check`` does."""
    url = exit_db.url
    assert lifeguard("check", "--database-url", url, "--no-state").returncode == OK
    assert lifeguard("monitor", "--database-url", url, "--count", "1").returncode == OK
    with psycopg.connect(**pg.connect_kwargs(exit_db.name), autocommit=True) as idle:
        idle.execute("SELECT 1")
        warn = ["--idle-warning", "0"]
        critical = ["--idle-warning", "0", "--idle-critical", "0"]
        for thresholds, status in ((warn, WARNING), (critical, CRITICAL)):
            checked = lifeguard("check", "--database-url", url, "--no-state", *thresholds)
            assert checked.returncode == status, checked.stdout + checked.stderr
            watched = lifeguard(
                "monitor", "--database-url", url, "--count", "2", "--interval", "0.2", *thresholds
            )
            assert watched.returncode == status, watched.stdout + watched.stderr


@pytest.mark.parametrize(("app", "status"), [("clean", OK), ("bad_option", CRITICAL)])
def test_doctor_exits_with_its_worst_finding(app: str, status: int):
    run = doctor(app, "--no-database")
    assert run.exit_code == status, run.stdout + run.stderr


# --- Ctrl-C -------------------------------------------------------------------------------


def test_ctrl_c_ends_a_live_monitor_with_0_and_a_counted_one_with_3(exit_db: Database):
    """Without --count, Ctrl-C is the view's normal end; with one, the run is cut short."""
    for extra, status in (([], OK), (["--count", "1000"], CANNOT_RUN)):
        process = start_lifeguard(
            "monitor", "--database-url", exit_db.url, "--json", "--interval", "0.2", *extra
        )
        try:
            assert process.stdout is not None
            assert process.stdout.readline().startswith("{")  # the first report is out
            process.send_signal(signal.SIGINT)
            _, stderr = process.communicate(timeout=20)
        finally:
            process.kill()
        assert process.returncode == status, stderr
        assert "Traceback" not in stderr


# --- a worker refused by its configuration: 78 --------------------------------------------

BAD_INSTALL = """\
from celery import Celery

import lifeguard

app = Celery("badinstall", broker={broker!r})
guard = lifeguard.install(app, ping_afterr_idle=3)
"""


def _celery_worker(
    app: str, cwd: Path | None, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    environment = {k: v for k, v in os.environ.items() if not k.startswith("LIFEGUARD_SANDBOX")}
    environment.update(env)
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", app, "worker", "-P", "solo", "--without-gossip",
         "--without-mingle", "--without-heartbeat"],
        cwd=cwd, env=environment, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip


def test_a_bad_install_option_stops_the_worker_with_78(tmp_path: Path, redis_url: str):
    """At import under ``celery worker``: one line on stderr, 78, no "Unable to load
    celery application" and no traceback. Imported anywhere else (a script, Django's
    manage.py) the same typo raises ConfigurationError, a normal exception."""
    (tmp_path / "badinstall.py").write_text(BAD_INSTALL.format(broker=f"{redis_url}/14"))
    worker = _celery_worker("badinstall", tmp_path, {})
    assert worker.returncode == CONFIG, worker.stdout + worker.stderr
    message = (
        "lifeguard: Unknown lifeguard option 'ping_afterr_idle' in lifeguard.install(). "
        "Did you mean 'ping_after_idle'?"
    )
    assert message in worker.stderr
    assert "Traceback" not in worker.stdout + worker.stderr
    assert "Unable to load celery application" not in worker.stdout + worker.stderr

    imported = subprocess.run(
        [sys.executable, "-c", "import badinstall"],
        cwd=tmp_path, capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert imported.returncode == 1
    assert (
        "lifeguard.errors.ConfigurationError: Unknown lifeguard option 'ping_afterr_idle'"
        in imported.stderr
    )


@pytest.mark.parametrize(
    ("options", "message"),
    [
        (
            '{"ping_afterr_idle": 3}',
            "lifeguard: Unknown lifeguard option 'CELERY_LIFEGUARD_PING_AFTERR_IDLE' in the "
            "Celery configuration. Did you mean 'CELERY_LIFEGUARD_PING_AFTER_IDLE'?",
        ),
        (
            '{"cancel_timeout": "soon"}',
            "lifeguard: lifeguard option 'CELERY_LIFEGUARD_CANCEL_TIMEOUT' must be a number "
            "of seconds, not 'soon'",
        ),
    ],
)
def test_a_bad_django_setting_stops_the_worker_with_78(
    options: str, message: str, test_db: Database, redis_url: str
):
    """``CELERY_LIFEGUARD_*`` in Django settings (``namespace="CELERY"``): the message
    names the setting as the user wrote it."""
    worker = _celery_worker(
        "lifeguard.demo.project.celery_app",
        None,
        {
            "LIFEGUARD_SANDBOX_OPTIONS": options,
            "LIFEGUARD_SANDBOX_DB_URL": test_db.url,
            "LIFEGUARD_SANDBOX_BROKER_URL": f"{redis_url}/14",
            "LIFEGUARD_SANDBOX_QUEUE": "q-exit-codes",
        },
    )
    assert worker.returncode == CONFIG, worker.stdout + worker.stderr
    assert message in worker.stderr
    assert "Traceback" not in worker.stdout + worker.stderr
