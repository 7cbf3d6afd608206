"""``lifeguard doctor`` reading a real PostgreSQL (and a real PgBouncer): the server's
timeouts and keepalives, the connection budget against the real max_connections, a
pooler found by what the server says, and what happens when the database can't be read.

The server's configuration is never changed: each scenario's settings are per-role,
per-database settings (``ALTER ROLE r IN DATABASE d SET ...``) of roles made for it.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from lifeguard.demo.postgres import PostgresServer, free_port
from tests.doctor_support import (
    CRITICAL,
    OK,
    UNKNOWN,
    WARNING,
    DoctorRun,
    doctor,
    role,
    usable_slots,
)
from tests.pgbouncer_support import running_pgbouncer
from tests.support import Database, few_slots_server, scratch_database

TUNED = {
    "idle_in_transaction_session_timeout": "1min",
    "tcp_keepalives_idle": "60",
    "client_connection_check_interval": "1s",
}


@pytest.fixture(scope="module")
def doctor_db(pg: PostgresServer) -> Iterator[Database]:
    with scratch_database(pg, "d") as db:
        yield db


@pytest.fixture(scope="module")
def roles(pg: PostgresServer, doctor_db: Database) -> Iterator[dict[str, str]]:
    """Roles named for their settings in the doctor's database: ``bare`` has the server's
    defaults, ``tuned`` the brakes the rules ask for, ``idle`` adds idle_session_timeout."""
    tag = uuid.uuid4().hex[:6]
    with (
        role(pg, f"lgd_{tag}_bare", doctor_db.name) as bare,
        role(pg, f"lgd_{tag}_tuned", doctor_db.name, **TUNED) as tuned,
        role(pg, f"lgd_{tag}_idle", doctor_db.name, **TUNED, idle_session_timeout="30s") as idle,
    ):
        yield {"bare": bare, "tuned": tuned, "idle": idle}


def url(db: Database, user: str, scheme: str = "postgresql") -> str:
    return db.server.url(db.name, user=user, scheme=scheme)


def django_env(db: Database, user: str, **database: Any) -> dict[str, str]:
    """The Django project's DATABASES['default'] as ``user`` on the doctor's database."""
    env = {"DOCTOR_DB_URL": url(db, user)}
    if database:
        env["DOCTOR_DATABASE"] = json.dumps(database)
    return env


# --- server settings ----------------------------------------------------------------------


@pytest.mark.compat
def test_server_defaults_leave_every_brake_off(doctor_db: Database, roles: dict[str, str]):
    run = doctor("clean", "--database-url", url(doctor_db, roles["bare"]))

    assert run.exit_code == WARNING
    assert run.ids == ["LG017", "LG019", "LG020"]
    idle_in_transaction = run.only("LG017")
    assert (
        f'ALTER ROLE "{roles["bare"]}" SET idle_in_transaction_session_timeout'
        in (idle_in_transaction["fix"])
    )
    assert run.only("LG019")["evidence"]["source"] == "default"
    # The clean app's task has a hard time limit: a SIGKILLed child's query would run on.
    check = run.only("LG020")
    assert check["severity"] == "warning"
    assert check["evidence"]["hard_time_limit_tasks"] == ["tests.doctor_apps.clean.export"]
    database = run.report["context"]["database"]
    assert database["read"] is True
    assert database["role"] == roles["bare"]
    assert database["settings"]["idle_in_transaction_session_timeout"]["value"] == 0
    assert database["pooler"] is None


@pytest.mark.compat
def test_a_tuned_role_leaves_a_clean_app_without_findings(
    doctor_db: Database, roles: dict[str, str]
):
    run = doctor("clean", "--database-url", url(doctor_db, roles["tuned"]))

    assert run.exit_code == OK, run.report["findings"]
    assert run.ids == []
    assert run.skipped == {}
    settings = run.report["context"]["database"]["settings"]
    assert settings["idle_in_transaction_session_timeout"] == {
        "value": 60.0,
        "source": "database user",  # ALTER ROLE ... IN DATABASE ... SET
    }
    assert settings["client_connection_check_interval"]["value"] == 1.0


def test_client_connection_check_is_info_without_hard_time_limits(
    doctor_db: Database, roles: dict[str, str]
):
    run = doctor("acks_late", "--database-url", url(doctor_db, roles["bare"]), env={
        "DOCTOR_DECIDED": "1"
    })  # fmt: skip

    assert run.only("LG020")["severity"] == "info"


def test_client_keepalives_make_up_for_the_servers(doctor_db: Database, roles: dict[str, str]):
    bare = doctor("djproj", env=django_env(doctor_db, roles["bare"]))
    assert bare.only("LG019")["evidence"]["clients_without_keepalives"] == [
        "Django DATABASES['default']"
    ]
    options = {"keepalives_idle": 60, "keepalives_interval": 10, "keepalives_count": 6}
    covered = doctor("djproj", env=django_env(doctor_db, roles["bare"], OPTIONS=options))

    assert "LG019" not in covered.ids
    assert "LG017" in covered.ids  # the server's other defaults still count


# --- idle_session_timeout -----------------------------------------------------------------


THREADS_POOL = {"CONN_MAX_AGE": 0, "OPTIONS": {"pool": {"min_size": 1, "max_size": 8}}}


@pytest.mark.parametrize(
    ("database", "stock", "level", "named"),
    [
        # lifeguard keeps a connection as long as CONN_MAX_AGE=None allows, and replaces
        # one the server closed before a task uses it.
        ({"CONN_MAX_AGE": None}, False, "info", "replaced"),
        # Stock Celery keeps Django's native pool under threads, and checks nothing...
        (THREADS_POOL, True, "warning", "fails"),
        # ... unless CONN_HEALTH_CHECKS makes the pool check each connection it hands out.
        ({**THREADS_POOL, "CONN_HEALTH_CHECKS": True}, True, "info", "replaced"),
    ],
)
def test_idle_session_timeout_against_kept_django_connections(
    doctor_db: Database,
    roles: dict[str, str],
    *,
    database: dict[str, Any],
    stock: bool,
    level: str,
    named: str,
):
    environment = django_env(doctor_db, roles["idle"], **database)
    if stock:
        environment["DOCTOR_LIFEGUARD"] = "0"
    finding = doctor("djproj", "--pool", "threads", "-c", "8", env=environment).only("LG018")

    assert finding["severity"] == level
    assert finding["evidence"]["idle_session_timeout"] == 30.0
    assert finding["evidence"][named] == ["Django DATABASES['default']"]


def test_connections_kept_shorter_than_idle_session_timeout_are_fine(
    doctor_db: Database, roles: dict[str, str]
):
    run = doctor("djproj", env=django_env(doctor_db, roles["idle"], CONN_MAX_AGE=10))

    assert run.ids == []


@pytest.mark.parametrize(
    ("arguments", "level"),
    [({}, "warning"), ({"pool_pre_ping": True}, "info"), ({"pool_recycle": 20}, None)],
)
def test_idle_session_timeout_against_an_unmanaged_engine(
    doctor_db: Database, roles: dict[str, str], arguments: dict[str, Any], level: str | None
):
    env = {
        "DOCTOR_DB_URL": url(doctor_db, roles["idle"], "postgresql+psycopg"),
        "DOCTOR_ENGINE_ARGS": json.dumps(arguments),
    }
    run = doctor("sqla", "--ignore", "LG013", env=env)

    if level is None:
        assert run.ids == []
    else:
        assert run.only("LG018")["severity"] == level


# --- the connection budget ----------------------------------------------------------------


@pytest.mark.compat
@pytest.mark.parametrize(
    ("args", "total", "status"),
    [
        (["-c", "16", "--hosts", "1"], 16, OK),
        (["-c", "16", "--hosts", "4"], 64, WARNING),  # above 60 % of the usable slots
        (["-c", "16", "--hosts", "6"], 96, CRITICAL),  # above 85 %
        (["-c", "8", "--hosts", "2", "--web-processes", "50"], 66, WARNING),
    ],
)
def test_connection_budget_against_max_connections(
    doctor_db: Database, roles: dict[str, str], args: list[str], total: int, status: int
):
    run = doctor("djproj", *args, env=django_env(doctor_db, roles["tuned"], CONN_MAX_AGE=600))

    usable = usable_slots(doctor_db.server)
    assert usable == 97  # this machine's server: max_connections 100, 3 reserved
    budget = run.report["context"]["budget"]
    assert (budget["total"], budget["usable"]) == (total, usable)
    assert run.exit_code == status
    if status == OK:
        assert run.ids == []
        return
    finding = run.only("LG016")
    assert finding["severity"] == ("warning" if status == WARNING else "critical")
    assert f"{total} connections" in finding["title"]
    assert finding["evidence"]["total"] == total


def test_native_pool_min_size_counts_in_every_prefork_child(
    doctor_db: Database, roles: dict[str, str]
):
    pool = {"min_size": 4}
    env = django_env(doctor_db, roles["tuned"], CONN_MAX_AGE=0, OPTIONS={"pool": pool})
    run = doctor("djproj", "-c", "8", "--hosts", "2", "--ignore", "LG011", env=env)

    # 2 hosts x 8 children x 4 pooled connections = 64 of 97 usable.
    assert run.only("LG016")["evidence"]["total"] == 64
    assert "2 hosts x (8 x 4) = 64" in run.only("LG016")["why"]


# --- when the database can't be read -------------------------------------------------------


@pytest.mark.compat
def test_an_unreachable_database_skips_the_server_rules_and_exits_3():
    dead = f"postgresql://postgres:s3cret@127.0.0.1:{free_port()}/nowhere"
    run = doctor("clean", "--database-url", dead)

    assert run.exit_code == UNKNOWN
    assert run.report["status"] == "UNKNOWN"
    reason = run.report["context"]["database"]["reason"]
    assert reason.startswith("cannot connect to postgresql://postgres:***@127.0.0.1:")
    assert set(run.skipped) == {"LG015", "LG016", "LG017", "LG018", "LG019", "LG020", "LG021"}
    assert "s3cret" not in run.stdout + run.stderr
    assert "Traceback" not in run.stderr

    text = doctor("clean", "--database-url", dead, as_json=False)
    assert "database: not read (cannot connect to postgresql://postgres:***@" in text.flat
    assert (
        "SKIPPED LG015, LG016, LG017, LG018, LG019, LG020, LG021: the database was not read"
        in text.flat
    )
    assert text.stdout.rstrip().endswith("Exit status 3 (UNKNOWN)")


def test_a_critical_finding_wins_over_an_unreadable_database():
    dead = f"postgresql://postgres@127.0.0.1:{free_port()}/nowhere"

    assert doctor("bad_option", "--database-url", dead).exit_code == CRITICAL


def test_a_role_without_connect_privilege(pg: PostgresServer, roles: dict[str, str]):
    with scratch_database(pg, "locked") as locked:
        locked.admin(f'REVOKE CONNECT ON DATABASE "{locked.name}" FROM PUBLIC')
        run = doctor("clean", "--database-url", pg.url(locked.name, user=roles["bare"]))

    assert run.exit_code == UNKNOWN
    reason = run.report["context"]["database"]["reason"]
    assert "permission denied for database" in reason
    assert "\n" not in reason
    assert run.skipped["LG017"] == reason


def test_a_database_url_that_is_not_postgresql_is_refused():
    run = doctor("clean", "--database-url", "mysql://app@db/app")

    assert run.exit_code == UNKNOWN
    assert "uses the scheme 'mysql'" in run.report["error"]


def test_an_app_without_a_postgresql_database_skips_the_server_rules():
    env = {"DOCTOR_DATABASE": json.dumps({"ENGINE": "django.db.backends.sqlite3"})}
    run = doctor("djproj", env=env)

    assert run.exit_code == OK
    assert run.skipped["LG017"].startswith("no database to read")


def test_the_database_comes_from_the_apps_django_settings(
    doctor_db: Database, roles: dict[str, str]
):
    run = doctor("djproj", env=django_env(doctor_db, roles["tuned"]))

    database = run.report["context"]["database"]
    assert database["target"].endswith("(from Django DATABASES)")
    assert database["role"] == roles["tuned"]
    assert database["database"] == doctor_db.name


# --- PgBouncer ----------------------------------------------------------------------------


def asyncpg_app(pooler: str, **env: str) -> dict[str, str]:
    """The SQLAlchemy app with a registered asyncpg engine going through ``pooler``."""
    return {
        "DOCTOR_DB_URL": pooler.replace("postgresql://", "postgresql+asyncpg://").split("?")[0],
        "DOCTOR_ASYNC": "1",
        "DOCTOR_REGISTER": "1",
        **env,
    }


def test_pooler_found_by_its_backend_pid_mode_unknown(test_db: Database):
    with running_pgbouncer(test_db.server, test_db.name) as pooler:
        run = doctor("sqla", "--database-url", pooler, env=asyncpg_app(pooler))

    finding = run.only("LG015")
    assert finding["severity"] == "warning"  # the mode is unknown: its console is closed
    assert "pool mode unknown" in finding["title"]
    assert "announced at connection" in finding["evidence"]["pooler"]
    assert "statement_cache_size=0" in finding["fix"]
    assert run.report["context"]["database"]["pooler"]["mode"] is None
    # Behind a pooler the app's connections don't take server slots: said, not judged.
    assert run.only("LG016")["severity"] == "info"


@pytest.mark.compat
def test_pooler_in_transaction_mode_read_from_its_console(test_db: Database):
    with running_pgbouncer(test_db.server, test_db.name, admin=True) as pooler:
        run = doctor("sqla", "--database-url", pooler, env=asyncpg_app(pooler))
        profiled = doctor(
            "sqla", "--database-url", pooler, env=asyncpg_app(pooler, DOCTOR_PROFILE="1")
        )

    finding = run.only("LG015")
    assert finding["severity"] == "critical"
    assert "pool_mode=transaction" in finding["evidence"]["pooler"]
    assert run.exit_code == CRITICAL
    assert run.report["context"]["database"]["pooler"]["mode"] == "transaction"
    assert "LG016" not in run.ids  # 2 children against max_client_conn 100
    # lifeguard's profile (pgbouncer_transaction_mode) on the registered engine.
    assert "LG015" not in profiled.ids


def test_pooler_in_session_mode_is_fine(test_db: Database):
    with running_pgbouncer(test_db.server, test_db.name, admin=True, pool_mode="session") as p:
        run = doctor("sqla", "--database-url", p, env=asyncpg_app(p))

    assert run.report["context"]["database"]["pooler"]["mode"] == "session"
    assert "LG015" not in run.ids


def test_engine_connect_args_that_turn_prepares_off(test_db: Database):
    arguments = {"connect_args": {"statement_cache_size": 0, "prepared_statement_cache_size": 0}}
    with running_pgbouncer(test_db.server, test_db.name, admin=True) as pooler:
        env = asyncpg_app(pooler, DOCTOR_ENGINE_ARGS=json.dumps(arguments))
        run = doctor("sqla", "--database-url", pooler, env=env)

    assert "LG015" not in run.ids


def test_django_server_side_cursors_behind_transaction_pooling(test_db: Database):
    with running_pgbouncer(test_db.server, test_db.name, admin=True) as pooler:
        env = {"DOCTOR_DB_URL": pooler.split("?")[0]}
        run = doctor("djproj", env=env)
        env["DOCTOR_DATABASE"] = json.dumps({"DISABLE_SERVER_SIDE_CURSORS": True})
        fixed = doctor("djproj", env=env)

    finding = run.only("LG015")
    assert "server-side cursors" in finding["title"]
    assert finding["fix"] == "DATABASES['default']['DISABLE_SERVER_SIDE_CURSORS'] = True."
    assert "LG015" not in fixed.ids


def test_no_pooler_when_connected_to_postgresql_directly(test_db: Database):
    direct = test_db.url
    run = doctor("sqla", "--database-url", direct, env=asyncpg_app(direct))

    assert run.report["context"]["database"]["pooler"] is None
    assert "LG015" not in run.ids


def test_pgbouncer_mode_said_on_the_command_line():
    pooler = "postgresql://postgres@127.0.0.1:6432/app"
    run = doctor("sqla", "--no-database", "--pgbouncer", "transaction", env=asyncpg_app(pooler))

    assert run.only("LG015")["severity"] == "critical"
    assert run.only("LG015")["evidence"]["pooler"] == "--pgbouncer transaction"


def test_singleton_behind_transaction_pooling_needs_a_direct_url(test_db: Database):
    """A real PgBouncer in transaction mode: a singleton task locking on the pooled engine
    is critical; with singleton_database_url going straight to PostgreSQL it is fine."""
    with running_pgbouncer(test_db.server, test_db.name, admin=True) as pooler:
        env = {"DOCTOR_DB_URL": pooler.split("?")[0], "DOCTOR_SINGLETON": "1"}
        run = doctor("sqla", "--database-url", pooler, env=env)
        direct = doctor(
            "sqla", "--database-url", pooler, env={**env, "DOCTOR_SINGLETON_URL": test_db.url}
        )

    finding = run.only("LG023")
    assert finding["severity"] == "critical" and run.exit_code == CRITICAL
    assert finding["subject"] == "tests.doctor_apps.sqla.nightly_export"
    assert "singleton_database_url" in finding["fix"]
    assert "LG023" not in direct.ids


def test_singleton_with_the_pool_mode_said_on_the_command_line():
    pooled = {"DOCTOR_SINGLETON": "1"}
    transaction = doctor("sqla", "--no-database", "--pgbouncer", "transaction", env=pooled)
    session = doctor("sqla", "--no-database", "--pgbouncer", "session", env=pooled)

    assert transaction.only("LG023")["evidence"]["pooler"] == "--pgbouncer transaction"
    assert "LG023" not in session.ids


def test_green_workers_count_their_green_budget_not_their_concurrency(
    doctor_db: Database, roles: dict[str, str]
):
    """gevent -c 200 on 4 hosts: 800 sessions without the budget, 4 x 10 with it."""
    env = django_env(doctor_db, roles["tuned"], CONN_MAX_AGE=600)
    run = doctor("djproj", "--pool", "gevent", "-c", "200", "--hosts", "4", env=env)
    assert run.report["context"]["budget"]["total"] == 40
    assert "LG016" not in run.ids

    env["DOCTOR_SETTINGS"] = json.dumps({"CELERY_LIFEGUARD_GREEN_BUDGET": 30})  # 120 > 97
    run = doctor("djproj", "--pool", "gevent", "-c", "200", "--hosts", "4", env=env)
    assert run.only("LG016")["severity"] == "critical"
    assert "4 hosts x (1 x 30) = 120" in run.only("LG016")["why"]
    assert "green budget" in run.report["context"]["budget"]["workers"][0]["how"]


# --- gevent/eventlet: the green budget against the server's free slots ---------------------

GREEN_USABLE = 17  # max_connections 20 minus 3 reserved for superusers
GREEN_HELD = 8  # sessions another client keeps open


@pytest.fixture(scope="module")
def crowded_server() -> Iterator[PostgresServer]:
    """A private server with 17 usable slots, 8 of them taken by another client."""
    with few_slots_server(20, 3) as server:
        held = [psycopg.connect(**server.connect_kwargs("postgres")) for _ in range(GREEN_HELD)]
        try:
            yield server
        finally:
            for conn in held:
                conn.close()


def green_doctor(server: PostgresServer, *args: str, **settings: Any) -> DoctorRun:
    env = {"DOCTOR_DB_URL": server.url("postgres"), "DOCTOR_SETTINGS": json.dumps(settings)}
    return doctor("djproj", "--pool", "gevent", *args, env=env)


def test_green_budgets_of_every_host_against_the_free_slots(crowded_server: PostgresServer):
    """9 slots free (17 usable, 8 taken): 3 gevent hosts x green_budget 4 do not fit, 5
    hosts do not even fit the usable slots; a default budget is said to shrink."""
    over_free = green_doctor(
        crowded_server, "-c", "100", "--hosts", "3", CELERY_LIFEGUARD_GREEN_BUDGET=4
    )
    finding = over_free.only("LG022")
    assert finding["severity"] == "warning"
    assert finding["title"] == (
        "green workers may open 12 connections; the server has 9 free slots now (17 usable)"
    )
    assert finding["evidence"]["free_slots"] == 9
    assert "3 hosts x 4 (the green budget of DATABASES['default']) = 12" in finding["why"]
    assert "Lower CELERY_LIFEGUARD_GREEN_BUDGET to at most 3 per worker" in finding["fix"]

    over_usable = green_doctor(
        crowded_server, "-c", "100", "--hosts", "5", CELERY_LIFEGUARD_GREEN_BUDGET=4
    )
    assert over_usable.only("LG022")["severity"] == "critical"
    assert over_usable.exit_code == CRITICAL

    default = green_doctor(crowded_server, "-c", "100").only("LG022")
    assert default["severity"] == "info"
    assert default["title"].startswith("the default green budget will shrink: 9 slots")
    assert "CELERY_LIFEGUARD_GREEN_BUDGET" in default["fix"]


@pytest.mark.parametrize(
    ("concurrency", "settings", "level", "words"),
    [
        # 1,000 greenlets, 2 connections, 30 s: a burst fails past 60 ms per task.
        ("1000", {"CELERY_LIFEGUARD_GREEN_BUDGET": 2}, "warning", "keep a connection 60 ms"),
        ("50", {"CELERY_LIFEGUARD_GREEN_BUDGET": 80}, "info", "is above the concurrency"),
    ],
)
def test_green_budget_against_the_concurrency(
    concurrency: str, settings: dict[str, Any], level: str, words: str
):
    """Without a server: the budget is judged against the concurrency and the wait."""
    env = {"DOCTOR_SETTINGS": json.dumps(settings)}
    run = doctor("djproj", "--no-database", "--pool", "gevent", "-c", concurrency, env=env)

    finding = run.only("LG022")
    assert finding["severity"] == level
    assert words in finding["title"]
    assert "CELERY_LIFEGUARD_GREEN_BUDGET" in finding["fix"]
