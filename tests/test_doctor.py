"""``lifeguard doctor`` on small apps that each make one mistake: the rule for it fires,
with the fix, and stays silent once the mistake is corrected. Rules that need no
database run with ``--no-database``; the server rules are in test_doctor_server.py.

Every run is a real ``lifeguard doctor`` subprocess loading a real Celery app
(tests/doctor_apps), as an operator runs it.
"""

from __future__ import annotations

import json

import celery
import django as django_module
import pytest

from lifeguard.doctor.registry import FAILED
from tests.doctor_support import CRITICAL, OK, UNKNOWN, WARNING, doctor, manage_check
from tests.support import Database

CELERY = tuple(int(part) for part in celery.__version__.split(".")[:2])
NATIVE_POOL = django_module.VERSION >= (5, 1)
needs_native_pool = pytest.mark.skipif(not NATIVE_POOL, reason="Django's pool needs 5.1+")
OFFLINE = "--no-database"
SERVER_RULES = {"LG015", "LG016", "LG017", "LG018", "LG019", "LG020", "LG021"}


def no_rule_failed(run) -> None:  # type: ignore[no-untyped-def]
    assert not [reason for reason in run.skipped.values() if reason.startswith(FAILED)]


# --- a clean app --------------------------------------------------------------------------


@pytest.mark.compat
def test_a_clean_app_has_no_finding():
    run = doctor("clean", OFFLINE, "--pool", "prefork", "--concurrency", "4")

    assert run.exit_code == OK, run.stdout
    assert run.report["findings"] == []
    assert run.report["status"] == "OK"
    assert set(run.skipped) == SERVER_RULES  # only the rules that need the server
    assert run.report["context"]["lifeguard"]["installed"] is True


# --- lifeguard itself ---------------------------------------------------------------------


def test_lifeguard_not_installed():
    run = doctor("not_installed", OFFLINE)

    assert run.exit_code == WARNING
    finding = run.only("LG001")
    assert finding["severity"] == "warning"
    assert "lifeguard.install(app)" in finding["fix"]
    assert run.ids == ["LG001"]


def test_an_invalid_lifeguard_option_is_critical():
    run = doctor("bad_option", OFFLINE)

    assert run.exit_code == CRITICAL
    finding = run.only("LG002")
    assert "memory_limit" in finding["why"]
    assert "exit status 78" in finding["why"]


# --- recycling and memory -----------------------------------------------------------------


def test_recycling_settings_on_the_threads_pool():
    run = doctor("recycling", OFFLINE)

    finding = run.only("LG003")
    assert "threads" in finding["title"]
    assert finding["evidence"]["worker_max_tasks_per_child"] == "100 (app.conf)"
    assert finding["evidence"]["worker_max_memory_per_child"] == "400000 (app.conf)"
    assert "memory_growth_limit" in finding["fix"]


def test_recycling_settings_on_prefork_are_fine():
    # The same app started with -P prefork: the pool reads them.
    run = doctor("recycling", OFFLINE, "--pool", "prefork")

    assert "LG003" not in run.ids
    assert run.report["context"]["worker"]["pool_source"] == "--pool"


def test_celery_memory_limit_below_a_childs_birth_rss_is_critical():
    run = doctor("memory", OFFLINE)  # worker_max_memory_per_child = 512 (KiB)

    assert run.exit_code == CRITICAL
    finding = run.only("LG004")
    birth = run.report["context"]["birth_rss_estimate_bytes"]
    assert finding["evidence"]["birth_rss_estimate_bytes"] == birth > 20 * 1024 * 1024
    assert "celery#4125" in finding["why"]
    assert "estimate" in finding["why"]
    assert "in KiB: 512 means 0.5 MiB" in finding["why"]
    assert "write 524288" in finding["why"]


def test_celery_memory_limit_just_above_the_birth_rss_warns_and_far_above_is_silent():
    birth = doctor("memory", OFFLINE).report["context"]["birth_rss_estimate_bytes"]
    tight = str(int(birth * 1.12) // 1024)  # KiB, 12 % above

    assert (
        doctor("memory", OFFLINE, env={"DOCTOR_CELERY_LIMIT": tight}).only("LG004")["severity"]
        == "warning"
    )
    roomy = doctor("memory", OFFLINE, env={"DOCTOR_CELERY_LIMIT": str(4 * 1024 * 1024)})
    assert "LG004" not in roomy.ids
    assert roomy.exit_code == OK


def test_lifeguard_memory_limit_below_the_birth_rss():
    env = {"DOCTOR_CELERY_LIMIT": str(4 * 1024 * 1024), "DOCTOR_LIFEGUARD_LIMIT": "20MiB"}
    finding = doctor("memory", OFFLINE, env=env).only("LG004")

    assert finding["severity"] == "warning"
    assert "memory_limit=20.0 MiB" in finding["title"]
    assert "memory_growth_limit" in finding["fix"]

    env["DOCTOR_LIFEGUARD_LIMIT"] = "2GiB"
    assert "LG004" not in doctor("memory", OFFLINE, env=env).ids


# --- acknowledgement and prefetch ---------------------------------------------------------


def test_acks_late_for_the_whole_app_without_a_decision():
    run = doctor("acks_late", OFFLINE, env={"DOCTOR_APP_ACKS_LATE": "1"})

    finding = run.only("LG005")
    assert finding["title"].startswith("task_acks_late is on")
    assert sorted(finding["evidence"]["tasks"]) == [
        "tests.doctor_apps.acks_late.charge",
        "tests.doctor_apps.acks_late.notify",
    ]
    assert "task_reject_on_worker_lost = True" in finding["fix"]


def test_acks_late_on_one_task_without_a_decision():
    finding = doctor("acks_late", OFFLINE).only("LG005")

    assert finding["evidence"]["tasks"] == ["tests.doctor_apps.acks_late.charge"]
    assert "reject_on_worker_lost=True" in finding["fix"]


@pytest.mark.parametrize("app_level", ["", "1"])
def test_acks_late_with_a_decision_is_fine(app_level: str):
    env = {"DOCTOR_DECIDED": "1", "DOCTOR_APP_ACKS_LATE": app_level}
    run = doctor("acks_late", OFFLINE, env=env)

    assert "LG005" not in run.ids
    assert run.exit_code == OK


def test_default_prefetch_with_a_long_task():
    finding = doctor("prefetch", OFFLINE, "-c", "4").only("LG006")

    assert finding["evidence"]["worker_prefetch_multiplier"] == 4
    assert list(finding["evidence"]["tasks"]) == ["tests.doctor_apps.prefetch.rebuild_index"]
    assert "4 x 4 = 16 messages per worker" in finding["why"]
    assert finding["fix"].startswith("worker_prefetch_multiplier = 1")


def test_prefetch_of_one_is_fine():
    assert "LG006" not in doctor("prefetch", OFFLINE, env={"DOCTOR_PREFETCH": "1"}).ids


# --- Django -------------------------------------------------------------------------------

STOCK = {"DOCTOR_LIFEGUARD": "0"}


def django(*args: str, database: dict | None = None, settings: dict | None = None, **env: str):  # type: ignore[no-untyped-def]
    environment = dict(env)
    if database is not None:
        environment["DOCTOR_DATABASE"] = json.dumps(database)
    if settings is not None:
        environment["DOCTOR_SETTINGS"] = json.dumps(settings)
    run = doctor("djproj", OFFLINE, *args, env=environment)
    no_rule_failed(run)
    return run


@pytest.mark.compat
def test_conn_max_age_on_stock_celery_depends_on_its_version():
    run = django(**STOCK)  # CONN_MAX_AGE=600, lifeguard not installed

    if CELERY >= (5, 6):
        finding = run.only("LG007")  # ignored: a new session per task
        assert "has no effect" in finding["title"]
        assert "LG008" not in run.ids
    else:
        finding = run.only("LG008")  # reused blindly after a soft time limit
        assert finding["severity"] == "critical"  # psycopg 3 and a soft_time_limit task
        assert "#30646" in finding["why"]
        assert "sync_invoices" in finding["why"]
        assert "LG007" not in run.ids


@pytest.mark.compat
def test_conn_max_age_zero_on_stock_celery_is_not_a_mistake():
    run = django(database={"CONN_MAX_AGE": 0}, **STOCK)

    assert run.ids == ["LG001"]


def test_celery_db_reuse_max_without_lifeguard_is_critical_with_soft_time_limits():
    finding = django(settings={"CELERY_DB_REUSE_MAX": 1000}, **STOCK).only("LG008")

    assert finding["severity"] == "critical"
    assert "CELERY_DB_REUSE_MAX=1000" in finding["title"]
    assert "another command is already in progress" in finding["why"]


def test_celery_db_reuse_max_under_lifeguard_is_harmless():
    # lifeguard takes the connection duties over from Celery's fixup.
    run = django(settings={"CELERY_DB_REUSE_MAX": 1000})

    assert run.ids == []


def test_conn_max_age_zero_under_lifeguard_is_info():
    run = django(database={"CONN_MAX_AGE": 0})

    finding = run.only("LG009")
    assert finding["severity"] == "info"
    assert "e.g. 600" in finding["fix"]
    assert run.exit_code == OK  # info does not fail


def test_conn_max_age_zero_under_gevent_points_to_the_green_budget():
    finding = django("--pool", "gevent", database={"CONN_MAX_AGE": 0}).only("LG009")

    assert "e.g. 600" in finding["fix"] and "green_budget" in finding["fix"]


def test_conn_max_age_none_under_lifeguard_is_fine():
    assert django(database={"CONN_MAX_AGE": None}).ids == []


@needs_native_pool
def test_native_pool_with_conn_max_age_is_critical():
    run = django(database={"CONN_MAX_AGE": 600, "OPTIONS": {"pool": {"min_size": 1}}})

    finding = run.only("LG010")
    assert finding["severity"] == "critical"
    assert finding["fix"].startswith("Set CONN_MAX_AGE to 0")
    assert run.exit_code == CRITICAL


@pytest.mark.compat
@pytest.mark.skipif(NATIVE_POOL, reason="Django 5.1+ has the native pool")
def test_native_pool_on_django_without_one_is_critical():
    pool = {"CONN_MAX_AGE": 0, "OPTIONS": {"pool": {"min_size": 1, "max_size": 2}}}
    finding = django(database=pool).only("LG010")

    assert "runs on Django 4." in finding["title"]
    assert finding["fix"].startswith("Upgrade Django to 5.1")


@needs_native_pool
def test_native_pool_defaults_under_prefork_hold_four_connections_per_child():
    pool = {"CONN_MAX_AGE": 0, "OPTIONS": {"pool": True}}
    finding = django("--concurrency", "8", database=pool).only("LG011")

    assert "min_size=4" in finding["title"]
    assert "32 sessions per host instead of 8" in finding["why"]
    assert "'min_size': 1, 'max_size': 2" in finding["fix"]


@needs_native_pool
def test_native_pool_of_one_or_two_under_prefork_is_fine():
    pool = {"CONN_MAX_AGE": 0, "OPTIONS": {"pool": {"min_size": 1, "max_size": 2}}}

    assert django(database=pool).ids == []


@needs_native_pool
@pytest.mark.parametrize(("max_size", "fires"), [(2, True), (8, False)])
def test_native_pool_smaller_than_the_threads_concurrency(max_size: int, fires: bool):
    pool = {"CONN_MAX_AGE": 0, "OPTIONS": {"pool": {"min_size": 1, "max_size": max_size}}}
    run = django("--pool", "threads", "--concurrency", "8", database=pool)

    if fires:
        assert "PoolTimeout" in run.only("LG011")["why"]
    else:
        assert run.ids == []


@needs_native_pool
def test_native_pool_under_prefork_without_lifeguard():
    pool = {"CONN_MAX_AGE": 0, "OPTIONS": {"pool": {"min_size": 1, "max_size": 2}}}
    run = django(database=pool, **STOCK)

    finding = run.only("LG012")
    expected = "closes the whole pool after every task" if CELERY >= (5, 6) else "inherit"
    assert expected in finding["why"]
    # The same settings under the threads pool: Celery keeps the pool there.
    assert "LG012" not in django("--pool", "threads", database=pool, **STOCK).ids


# --- SQLAlchemy ---------------------------------------------------------------------------


def sqla(*args: str, **env: str):  # type: ignore[no-untyped-def]
    run = doctor("sqla", OFFLINE, *args, env=env)
    no_rule_failed(run)
    return run


def test_engine_created_at_import_and_not_registered():
    finding = sqla().only("LG013")

    assert finding["severity"] == "warning"
    assert finding["subject"] == "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    assert "guard.add_engine(create_engine(...))" in finding["fix"]


def test_engine_registered_with_lifeguard_is_fine():
    run = sqla(DOCTOR_REGISTER="1")

    assert run.ids == []
    assert run.report["context"]["sqlalchemy"][0]["registered"] is True


def test_engine_that_connected_at_import_is_critical(test_db: Database):
    url = test_db.server.url(test_db.name, scheme="postgresql+psycopg")
    finding = sqla(DOCTOR_DB_URL=url, DOCTOR_CONNECT="1").only("LG013")

    assert finding["severity"] == "critical"
    assert finding["evidence"]["connections_after_import"] == 1


def test_engine_without_a_pool_is_fork_safe():
    run = sqla(DOCTOR_ENGINE_ARGS='{"poolclass": "NullPool"}')

    assert run.ids == []
    assert run.report["context"]["sqlalchemy"][0]["pool_class"] == "NullPool"


def test_unmanaged_engine_under_threads_is_info():
    finding = sqla("--pool", "threads", "--concurrency", "4").only("LG013")

    assert finding["severity"] == "info"


def test_unmanaged_engine_without_lifeguard_says_how_to_dispose_it():
    run = sqla(DOCTOR_LIFEGUARD="0")

    assert "dispose(close=False)" in run.only("LG013")["fix"]
    assert "LG001" in run.ids


def test_async_engine_under_gevent_is_critical():
    url = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
    run = sqla("--pool", "gevent", DOCTOR_ASYNC="1", DOCTOR_DB_URL=url, DOCTOR_REGISTER="1")

    finding = run.only("LG014")
    assert finding["severity"] == "critical"
    assert "exit status 78" in finding["why"]


def test_pooled_async_engine_without_lifeguard():
    url = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
    finding = sqla(DOCTOR_ASYNC="1", DOCTOR_DB_URL=url, DOCTOR_LIFEGUARD="0").only("LG014")

    assert "asyncio.run()" in finding["why"]
    assert "@lifeguard.async_task(app)" in finding["fix"]


def test_async_engine_registered_under_prefork_is_fine():
    url = "postgresql+asyncpg://postgres@127.0.0.1:5432/postgres"
    assert sqla(DOCTOR_ASYNC="1", DOCTOR_DB_URL=url, DOCTOR_REGISTER="1").ids == []


@pytest.mark.parametrize(("pool_size", "fires"), [(2, True), (8, False)])
def test_engine_pool_smaller_than_the_threads_concurrency(pool_size: int, fires: bool):
    arguments = json.dumps({"pool_size": pool_size, "max_overflow": 0})
    run = sqla("-P", "threads", "-c", "8", DOCTOR_REGISTER="1", DOCTOR_ENGINE_ARGS=arguments)

    if fires:
        finding = run.only("LG014")
        assert "QueuePool limit of size 2 overflow 0" in finding["why"]
        assert "pool_size=8" in finding["fix"]
    else:
        assert run.ids == []


# --- ignoring rules, errors, exit codes, output ---------------------------------------------


def test_ignored_rules_are_left_out():
    run = doctor("not_installed", OFFLINE, "--ignore", "LG001,lg006")

    assert run.ids == []
    assert run.exit_code == OK


def test_an_unknown_rule_to_ignore_is_refused():
    run = doctor("clean", OFFLINE, "--ignore", "LG999")

    assert run.exit_code == UNKNOWN
    assert run.report == {
        "schema": "lifeguard.doctor/1",
        "status": "UNKNOWN",
        "exit_code": 3,
        "error": "--ignore: no rule LG999 (see --list-rules)",
    }


def test_an_app_that_cannot_be_loaded_exits_3_with_one_line():
    run = doctor("no_such_module", as_json=False)

    assert run.exit_code == UNKNOWN
    assert run.stdout == ""
    lines = run.stderr.strip().splitlines()
    assert len(lines) == 1, run.stderr
    assert lines[0].startswith("lifeguard doctor: cannot load the Celery app")
    assert "Traceback" not in run.stderr


def test_a_usage_error_exits_3_not_2():
    run = doctor("clean", "--pool", "fibers", as_json=False)

    assert run.exit_code == UNKNOWN
    assert "Invalid value for '-P' / '--pool'" in run.stderr


def test_json_report_schema():
    run = doctor(
        "memory", OFFLINE, "-c", "3", "--hosts", "2", env={"DOCTOR_LIFEGUARD_LIMIT": "20MiB"}
    )
    report = run.report

    assert set(report) == {
        "schema", "status", "exit_code", "app", "counts", "findings", "skipped", "context",
    }  # fmt: skip
    assert report["schema"] == "lifeguard.doctor/1"
    assert (
        (report["status"], report["exit_code"])
        == ("CRITICAL", CRITICAL)
        == (
            "CRITICAL",
            run.exit_code,
        )
    )
    assert report["counts"] == {"critical": 1, "warning": 1, "info": 0}
    assert [f["severity"] for f in report["findings"]] == ["critical", "warning"]  # worst first
    for finding in report["findings"]:
        assert set(finding) == {
            "id", "rule", "severity", "title", "subject", "why", "fix", "evidence",
        }  # fmt: skip
        assert finding["rule"] == "memory-limit-below-birth-rss"
    context = report["context"]
    assert context["worker"] == {
        "pool": "prefork",
        "pool_source": "Celery's default",
        "concurrency": 3,
        "concurrency_source": "--concurrency",
        "max_tasks_per_child": None,
        "max_memory_per_child_kib": 512,
        "hosts": 2,
        "web_processes": 0,
    }
    assert context["database"] == {"read": False, "target": None, "reason": "--no-database"}
    assert context["django"] is None and context["sqlalchemy"] is None
    assert context["celery_version"] == ".".join(map(str, CELERY))


def test_text_report_shows_each_finding_with_why_and_fix():
    run = doctor("memory", OFFLINE, as_json=False)

    assert run.exit_code == CRITICAL
    lines = run.stdout.splitlines()
    assert lines[0] == "lifeguard doctor: tests.doctor_apps.memory"
    head = next(line for line in lines if line.startswith("CRITICAL LG004 "))
    assert "worker_max_memory_per_child=512" in head
    assert any(line.startswith("    why  Celery compares") for line in lines)
    assert any(line.startswith("    fix  Set worker_max_memory_per_child") for line in lines)
    assert lines[-1].endswith("Exit status 2 (CRITICAL)")
    assert all(line == line.rstrip() for line in lines)  # no padding when piped


# --- Django's system checks -----------------------------------------------------------------


@pytest.mark.compat
def test_manage_py_check_shows_the_findings():
    run = manage_check(env=STOCK)

    assert "(lifeguard.LG001) lifeguard is not installed on the Celery app djproj" in run.stderr
    assert "HINT: Install lifeguard" in run.stderr
    if CELERY >= (5, 6):
        assert run.exit_code == 0  # warnings do not fail `check`
        assert "DATABASES['default']: (lifeguard.LG007)" in run.stderr
    else:
        # Celery 5.5 reuses what a soft time limit interrupted: critical, an Error.
        assert run.exit_code == 1
        assert "DATABASES['default']: (lifeguard.LG008)" in run.stderr


@needs_native_pool
def test_manage_py_check_errors_on_a_critical_finding():
    database = json.dumps({"CONN_MAX_AGE": 600, "OPTIONS": {"pool": {"min_size": 1}}})
    run = manage_check(env={"DOCTOR_DATABASE": database})

    assert run.exit_code == 1
    assert "SystemCheckError" in run.stderr
    assert "ERRORS:" in run.stderr
    assert "(lifeguard.LG010)" in run.stderr


@needs_native_pool
def test_manage_py_check_runs_pool_rules_only_when_the_pool_is_configured():
    database = json.dumps({"CONN_MAX_AGE": 0, "OPTIONS": {"pool": True}})

    assert "lifeguard.LG011" not in manage_check(env={"DOCTOR_DATABASE": database}).stderr
    settings = json.dumps({"CELERY_WORKER_POOL": "prefork"})
    run = manage_check(env={"DOCTOR_DATABASE": database, "DOCTOR_SETTINGS": settings})
    assert "(lifeguard.LG011)" in run.stderr


@pytest.mark.compat
def test_manage_py_check_silenced_findings():
    silenced = ["lifeguard.LG001", "lifeguard.LG007", "lifeguard.LG008"]
    settings = json.dumps({"SILENCED_SYSTEM_CHECKS": silenced})
    run = manage_check(env={**STOCK, "DOCTOR_SETTINGS": settings})

    assert run.exit_code == 0
    assert "lifeguard.LG00" not in run.stderr
    assert "System check identified no issues (2 silenced)." in run.stdout


@pytest.mark.compat
def test_a_clean_django_project_passes_manage_py_check():
    run = manage_check()

    assert run.exit_code == 0
    assert "System check identified no issues" in run.stdout


def test_a_worker_starts_with_the_check_app_installed(redis_url: str, prefix: str):
    # Celery's Django fixup runs the system checks while the worker imports its task
    # modules; lifeguard's check imports them too, and must neither recurse nor stop
    # the worker.
    from celery import Celery

    from lifeguard.demo.worker import CeleryWorker
    from tests.doctor_support import ROOT

    queue = f"q-{prefix}"
    settings = {
        "CELERY_BROKER_URL": f"{redis_url}/14",
        "CELERY_RESULT_BACKEND": f"{redis_url}/14",
        "CELERY_TASK_DEFAULT_QUEUE": queue,
        "CELERY_LIFEGUARD_APPLICATION_NAME_PREFIX": prefix,
    }
    env = {"DOCTOR_SETTINGS": json.dumps(settings), "DOCTOR_DATABASE": '{"CONN_MAX_AGE": 0}'}
    client = Celery("doctor-client", broker=f"{redis_url}/14", backend=f"{redis_url}/14")
    with CeleryWorker(
        "tests.doctor_apps.djproj", concurrency=1, queue=queue, env=env, cwd=ROOT
    ) as worker:
        result = client.send_task("tests.doctor_apps.djproj.tasks.send_mail", queue=queue)
        assert result.get(timeout=30) is None
    assert "lifeguard: managing Django connections" in worker.log
    assert "RecursionError" not in worker.log
